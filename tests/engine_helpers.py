"""Helpers for tests that drive the real engine on the tiny random Llama."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch

from fitserve.server.engine.config import EngineConfig
from fitserve.server.engine.engine import Engine
from fitserve.server.engine.types import RequestOutput, RequestStats, SamplingParams, StepStats


def load_tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    """The tiny random Llama (fp32, eval) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


class ListSink:
    """A StatsSink that keeps everything."""

    def __init__(self) -> None:
        self.steps: list[StepStats] = []
        self.requests: list[RequestStats] = []

    def record_step(self, stats: StepStats) -> None:
        self.steps.append(stats)

    def record_request(self, stats: RequestStats) -> None:
        self.requests.append(stats)


def make_engine(tiny, sink: ListSink | None = None, **overrides: object) -> Engine:  # type: ignore[no-untyped-def]
    model, tokenizer = tiny
    base: dict[str, object] = dict(
        served_model_name="tiny", max_model_len=512, kv_capacity_tokens=2048, max_prefill_tokens=256
    )
    base.update(overrides)
    return Engine(model, tokenizer, EngineConfig(**base), stats_sink=sink)  # type: ignore[arg-type]


async def collect(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    return [out async for out in stream]


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)  # type: ignore[arg-type]
