"""Engine `TokenLogprob`s to the two OpenAI logprobs layouts."""

from __future__ import annotations

from collections.abc import Sequence

from fitserve.server.engine.types import TokenLogprob
from fitserve.server.protocol.chat import ChatLogprobs, LogprobEntry, TopLogprobEntry
from fitserve.server.protocol.completions import CompletionLogprobs


def to_completion_logprobs(entries: Sequence[TokenLogprob], text_offset_start: int) -> CompletionLogprobs:
    """Legacy layout; `text_offset_start` is the character offset of the first token in the choice's text."""
    result = CompletionLogprobs()
    offset = text_offset_start
    for entry in entries:
        result.tokens.append(entry.token)
        result.token_logprobs.append(entry.logprob)
        result.top_logprobs.append({alt.token: alt.logprob for alt in entry.top})
        result.text_offset.append(offset)
        offset += len(entry.token)
    return result


def to_chat_logprobs(entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    """Chat layout: one entry per generated token with its alternatives and UTF-8 bytes."""
    return ChatLogprobs(
        content=[
            LogprobEntry(
                token=entry.token,
                logprob=entry.logprob,
                bytes=list(entry.token.encode("utf-8")),
                top_logprobs=[
                    TopLogprobEntry(token=alt.token, logprob=alt.logprob, bytes=list(alt.token.encode("utf-8")))
                    for alt in entry.top
                ],
            )
            for entry in entries
        ]
    )
