"""Incremental detokenization: UTF-8 characters split across tokens, stop strings across token boundaries."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from fitserve.server.engine.detokenizer import IncrementalDetokenizer


class ByteTokenizer:
    """Each token id is a byte chunk; decoding joins the bytes and replaces incomplete UTF-8 with U+FFFD."""

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self.chunks = list(chunks)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.chunks[i] for i in token_ids).decode("utf-8", errors="replace")


def stream(detok: IncrementalDetokenizer, ids: Sequence[int]) -> tuple[list[str], bool]:
    deltas = []
    stopped = False
    for i in ids:
        d = detok.add(i)
        deltas.append(d.text)
        if d.stopped:
            stopped = True
            break
    if not stopped:
        deltas.append(detok.flush())
    return deltas, stopped


def test_multibyte_character_split_across_tokens_is_held_back() -> None:
    globe = "🌍".encode()  # 4 bytes
    tok = ByteTokenizer([b"hi ", globe[:1], globe[1:3], globe[3:], b" ok"])
    detok = IncrementalDetokenizer(tok)
    deltas, _ = stream(detok, [0, 1, 2, 3, 4])
    assert deltas[:4] == ["hi ", "", "", "🌍"]
    assert "".join(deltas) == "hi 🌍 ok"
    assert all("\ufffd" not in d for d in deltas)


def test_incomplete_bytes_at_the_end_are_flushed_like_a_full_decode() -> None:
    tok = ByteTokenizer([b"a", "é".encode()[:1]])
    detok = IncrementalDetokenizer(tok)
    deltas, _ = stream(detok, [0, 1])
    assert "".join(deltas) == tok.decode([0, 1]) == "a\ufffd"


def test_stop_string_across_token_boundaries_never_leaks() -> None:
    tok = ByteTokenizer([b"Hello", b" wo", b"rld", b", and", b" more"])
    detok = IncrementalDetokenizer(tok, stop=("o world",))
    deltas, stopped = stream(detok, [0, 1, 2, 3, 4])
    assert stopped
    assert "".join(deltas) == "Hell"
    assert detok.text == "Hell"


def test_partial_stop_string_is_released_when_it_does_not_complete() -> None:
    tok = ByteTokenizer([b"ab", b"c", b"x", b"yz"])
    detok = IncrementalDetokenizer(tok, stop=("cxw",))
    deltas, stopped = stream(detok, [0, 1, 2, 3])
    assert not stopped
    assert "".join(deltas) == "abcxyz"
    assert deltas[1] == ""  # "c" could have started "cxw": held back until disproved


def test_earliest_of_several_stop_strings_wins() -> None:
    tok = ByteTokenizer([b"one two three"])
    detok = IncrementalDetokenizer(tok, stop=("three", "two"))
    deltas, stopped = stream(detok, [0])
    assert stopped and "".join(deltas) == "one "


@pytest.fixture(scope="module")
def real_tokenizer(default_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_real_tokenizer_stream_equals_full_decode(real_tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "Grüße aus Köln! 日本語のテキスト 🌍🚀 naïve café — «quotes»"
    ids = real_tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(real_tokenizer)
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == real_tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas)
    assert any(d == "" for d in deltas)  # some emoji/CJK byte pieces were genuinely held back


def test_real_tokenizer_stop_string(real_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = real_tokenizer.encode("The capital of France is Paris. It is big.", add_special_tokens=False)
    detok = IncrementalDetokenizer(real_tokenizer, stop=("Paris",))
    deltas, stopped = stream(detok, ids)
    assert stopped and "".join(deltas) == "The capital of France is "
