"""OpenAI-compatible request/response schemas, one module per endpoint family (no torch, no engine)."""
