"""What the load test sends: prompts (built-in or from a JSONL dataset) and per-request lengths.

Everything is deterministic for a given seed: request `i` of a workload is always the same prompt with the
same `max_tokens`, so two servers driven with the same arguments see exactly the same requests.
"""

from __future__ import annotations

import enum
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A fixed pool of questions; the built-in prompts pad one of them with filler sentences up to the wanted length.
_QUESTIONS: tuple[str, ...] = (
    "What is the capital of France?",
    "Explain how a bicycle stays upright while moving.",
    "Write a short poem about the sea.",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
    "Describe how to make a cup of tea.",
    "What are the planets of the solar system?",
    "Summarise the story of Little Red Riding Hood.",
    "How does a refrigerator keep food cold?",
    "Give two tips for learning a new language.",
    "What is the difference between weather and climate?",
    "Explain what a prime number is.",
    "Why do leaves change colour in autumn?",
    "Describe a busy market in the morning.",
    "How do bees make honey?",
    "What is photosynthesis?",
)

_FILLER: tuple[str, ...] = (
    "The morning was quiet and the streets were still wet from the rain.",
    "A small dog followed the baker down the road towards the river.",
    "Children gathered in the square to watch the musicians play.",
    "The old library smelled of paper, dust and polished wood.",
    "Far away, a train whistled as it crossed the long stone bridge.",
    "The gardener planted rows of beans, carrots and bright yellow flowers.",
    "Clouds drifted slowly over the hills as the wind changed direction.",
    "In the kitchen, a pot of soup simmered on the stove all afternoon.",
)


class Endpoint(enum.StrEnum):
    """Which OpenAI endpoint the load test calls."""

    CHAT = "chat"
    COMPLETIONS = "completions"

    @property
    def path(self) -> str:
        """The URL path of this endpoint, relative to the server root."""
        return "/v1/chat/completions" if self is Endpoint.CHAT else "/v1/completions"


@dataclass(frozen=True)
class LengthSpec:
    """A length in tokens: fixed (`low == high`) or drawn uniformly from `[low, high]`."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> LengthSpec:
        """Parse `"64"` (fixed) or `"32:128"` (uniform between the two, inclusive)."""
        parts = text.split(":")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"expected N or MIN:MAX (positive integers), got {text!r}")
        low, high = int(parts[0]), int(parts[-1])
        if low < 1 or high < low:
            raise ValueError(f"expected 1 <= MIN <= MAX, got {text!r}")
        return cls(low, high)

    @property
    def is_fixed(self) -> bool:
        """True when every draw gives the same length."""
        return self.low == self.high

    def draw(self, rng: random.Random) -> int:
        """One length from this spec."""
        return self.low if self.is_fixed else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.is_fixed else f"{self.low}:{self.high}"


@dataclass(frozen=True)
class Prompt:
    """One prompt: chat messages, or a plain text (converted to the other form when the endpoint needs it)."""

    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    max_tokens: int | None = None  # per-prompt override from a dataset line

    def as_messages(self) -> list[dict[str, str]]:
        """The prompt as chat messages."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.text or ""}]

    def as_text(self) -> str:
        """The prompt as one plain text (messages are flattened as `role: content` lines)."""
        if self.text is not None:
            return self.text
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages or ()) + "\nassistant:"


@dataclass(frozen=True)
class WorkItem:
    """One request to send."""

    index: int
    prompt: Prompt
    max_tokens: int

    def body(self, endpoint: Endpoint, model: str, stream: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON body of the request for `endpoint`."""
        body: dict[str, Any] = {"model": model, "max_tokens": self.max_tokens, "stream": stream}
        if endpoint is Endpoint.CHAT:
            body["messages"] = self.prompt.as_messages()
        else:
            body["prompt"] = self.prompt.as_text()
        if stream:
            body["stream_options"] = {"include_usage": True}
        body.update(extra or {})
        return body


def builtin_prompt(index: int, length_words: int) -> Prompt:
    """Built-in prompt `index`: filler sentences then a question, about `length_words` words long.

    Words are a rough stand-in for tokens (the client has no tokenizer); the question is always included.
    """
    question = _QUESTIONS[index % len(_QUESTIONS)]
    words: list[str] = []
    budget = max(0, length_words - len(question.split()))
    k = index
    while len(words) < budget:
        words.extend(_FILLER[k % len(_FILLER)].split())
        k += 1
    context = " ".join(words[:budget])
    return Prompt(text=f"{context}\n\n{question}" if context else question)


def load_dataset(path: Path) -> list[Prompt]:
    """Read a JSONL dataset: each line a JSON string, or an object with `prompt` or `messages` (+ `max_tokens`).

    Raises ValueError naming the first bad line.
    """
    prompts: list[Prompt] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                prompts.append(_parse_dataset_line(json.loads(line)))
            except (json.JSONDecodeError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no}: {exc}") from exc
    if not prompts:
        raise ValueError(f"{path}: no prompts in the dataset")
    return prompts


def _parse_dataset_line(obj: Any) -> Prompt:
    if isinstance(obj, str):
        return Prompt(text=obj)
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON string or object")
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError("max_tokens must be a positive integer")
    if isinstance(obj.get("prompt"), str):
        return Prompt(text=obj["prompt"], max_tokens=max_tokens)
    messages = obj.get("messages")
    if isinstance(messages, list) and messages:
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError("messages must be a list of {role, content} objects with string values")
        return Prompt(
            messages=tuple({"role": m["role"], "content": m["content"]} for m in messages), max_tokens=max_tokens
        )
    raise ValueError("expected a 'prompt' string or a non-empty 'messages' list")


class Workload:
    """A deterministic, endless sequence of work items.

    With a dataset, item `i` uses prompt `i mod len(dataset)`; without one, the built-in prompts with a
    length drawn from `prompt_words`. `max_tokens` comes from the dataset line when set, else is drawn.
    """

    def __init__(
        self,
        max_tokens: LengthSpec,
        prompt_words: LengthSpec = LengthSpec(64, 64),
        dataset: list[Prompt] | None = None,
        seed: int = 0,
    ) -> None:
        self.max_tokens = max_tokens
        self.prompt_words = prompt_words
        self.dataset = dataset
        self.seed = seed

    def item(self, index: int) -> WorkItem:
        """Work item `index` (the same for the same seed, whatever else was drawn before)."""
        rng = random.Random(self.seed * 1_000_003 + index)
        if self.dataset:
            prompt = self.dataset[index % len(self.dataset)]
        else:
            prompt = builtin_prompt(index, self.prompt_words.draw(rng))
        max_tokens = prompt.max_tokens if prompt.max_tokens is not None else self.max_tokens.draw(rng)
        return WorkItem(index=index, prompt=prompt, max_tokens=max_tokens)

    def max_request_tokens(self, prompt_tokens: int) -> int:
        """Prompt tokens plus the largest `max_tokens` this workload may ask for."""
        biggest = max((p.max_tokens or 0 for p in self.dataset or ()), default=0)
        return prompt_tokens + max(biggest, self.max_tokens.high)
