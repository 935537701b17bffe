"""Incremental detokenization with stop strings. No torch.

Byte-level BPE tokens can end in the middle of a UTF-8 character; decoding such a prefix yields U+FFFD. The
detokenizer decodes a small window of recent tokens (the prefix/read offsets of vLLM and TGI) and holds text back
while it ends in U+FFFD. Stop strings are searched in the decoded text; a tail of the text that could still grow
into a stop string is held back too, so a stop string never reaches the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """The slice of a tokenizer this module needs."""

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str:
        """Token ids to text."""
        ...


@dataclass(frozen=True)
class DetokenizedDelta:
    """What a new token added to the visible text, and whether a stop string ended the sequence."""

    text: str
    stopped: bool


class IncrementalDetokenizer:
    """Turns one sequence's generated tokens into text deltas, one token at a time."""

    def __init__(self, tokenizer: Decoder | Any, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.skip_special_tokens = skip_special_tokens
        self._hold_chars = max((len(s) for s in self.stop), default=1) - 1
        self._tokens: list[int] = []
        self._prefix_offset = 0  # start of the decode window (gives the tokenizer context for spaces)
        self._read_offset = 0  # tokens before this are already turned into text
        self._text = ""  # all decoded text so far (stop-string search space)
        self._emitted = 0  # chars of _text already handed out
        self.stopped = False

    @property
    def text(self) -> str:
        """The visible text so far (emitted and held back; excluding any stop string)."""
        return self._text

    def _decode_new(self) -> str:
        window = self._tokens[self._prefix_offset :]
        prefix_text = self.tokenizer.decode(
            self._tokens[self._prefix_offset : self._read_offset], skip_special_tokens=self.skip_special_tokens
        )
        full_text = self.tokenizer.decode(window, skip_special_tokens=self.skip_special_tokens)
        if full_text.endswith(_REPLACEMENT) or len(full_text) < len(prefix_text):
            return ""  # an incomplete UTF-8 character: wait for the next token
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return full_text[len(prefix_text) :]

    def add(self, token_id: int) -> DetokenizedDelta:
        """Append a token; returns the text now safe to show, and whether a stop string was hit."""
        if self.stopped:
            return DetokenizedDelta("", True)
        self._tokens.append(token_id)
        new = self._decode_new()
        if not new:
            return DetokenizedDelta("", False)
        search_from = max(0, len(self._text) - self._hold_chars)
        self._text += new
        if self.stop:
            hit = self._find_stop(search_from)
            if hit is not None:
                self._text = self._text[:hit]
                self.stopped = True
                return DetokenizedDelta(self._take(len(self._text)), True)
            return DetokenizedDelta(self._take(len(self._text) - self._partial_stop_len()), False)
        return DetokenizedDelta(self._take(len(self._text)), False)

    def _find_stop(self, search_from: int) -> int | None:
        hits = [i for s in self.stop if (i := self._text.find(s, search_from)) >= 0]
        return min(hits) if hits else None

    def _partial_stop_len(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string (held back)."""
        for k in range(min(self._hold_chars, len(self._text)), 0, -1):
            tail = self._text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def _take(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        out = self._text[self._emitted : upto]
        self._emitted = upto
        return out

    def flush(self) -> str:
        """Text still held back (call once when the sequence finishes for a reason other than a stop string)."""
        if self.stopped:
            return ""
        # Tokens that never completed a character are decoded as they are (with U+FFFD), like a full decode would.
        if self._read_offset < len(self._tokens):
            prefix_text = self.tokenizer.decode(
                self._tokens[self._prefix_offset : self._read_offset], skip_special_tokens=self.skip_special_tokens
            )
            full_text = self.tokenizer.decode(
                self._tokens[self._prefix_offset :], skip_special_tokens=self.skip_special_tokens
            )
            self._text += full_text[len(prefix_text) :]
            self._read_offset = len(self._tokens)
        return self._take(len(self._text))
