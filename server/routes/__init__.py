"""One APIRouter per file: completions, chat, models, tokenize, health, metrics."""
