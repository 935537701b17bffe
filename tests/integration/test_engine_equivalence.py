"""THE engine test: 16 concurrent greedy requests through the engine equal `model.generate` on each prompt alone.

Requests of mixed prompt lengths and max_tokens arrive at different times, so they join a running batch
mid-flight (continuous batching, packed prefill + decode in one step). With temperature 0 every request must
produce token for token what `model.generate` (greedy) gives for its prompt alone, in the same precision.

With `compile_mode=off` (per-sequence attention; what `fitserve serve` runs on CPU) the match must be exact. With
the fixed-shape decode step (`compile_mode=eager` here; CUDA graphs replay the same forward on a GPU: one batched
attention call per layer over padded block tables) float rounding differs in the last bits, so one relaxation is
allowed and counted: a request may leave the reference at a token
where the reference's own top-2 logits were within `NEAR_TIE_LOGITS[precision]` of each other and the engine
picked the runner-up. Nothing after that token is compared (the contexts differ from there on).
"""

from __future__ import annotations

import asyncio
import enum
import random
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

TOPICS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a hash map works.",
    "List five fruits and one fact about each.",
    "Tell me a story about a robot who learns to paint.",
    "What are the main causes of the French Revolution?",
    "How do I make a cup of tea?",
    "Describe the water cycle for a ten year old.",
]
LONG_CONTEXT = (
    "The following notes describe a small town. The town has a bakery, a library, a river with two bridges, "
    "a school with three hundred pupils and a market every Saturday where farmers sell vegetables and cheese. "
)


# Largest gap between the reference's best and second-best logit at which the engine may pick the second:
# fp32 compute (fp32, and NF4 with fp32 compute) differs by ~1e-5 between kernels; bf16 logits have ~3 significant
# digits (a step of 0.06 at magnitude 16), so a batched kernel can flip bf16 ties up to a few of those steps.
NEAR_TIE_LOGITS = {"bf16": 0.25, "fp32": 0.02, "int8": 0.02, "nf4": 0.02}


class Precision(enum.StrEnum):
    """The precisions this test loads the default model in."""

    BF16 = "bf16"
    FP32 = "fp32"
    INT8 = "int8"
    NF4 = "nf4"


def load(model_dir: Path, precision: Precision) -> tuple[Any, Any]:
    """The default model and tokenizer in the given precision (bitsandbytes for INT8/NF4, on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    kwargs: dict[str, Any] = {}
    if precision is Precision.BF16:
        kwargs["dtype"] = torch.bfloat16
    elif precision is Precision.FP32:
        kwargs["dtype"] = torch.float32
    elif precision is Precision.INT8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = torch.float32
    else:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        kwargs["dtype"] = torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def make_requests(tokenizer: Any, n: int = 16, seed: int = 0) -> list[tuple[list[int], int, float]]:
    """(prompt ids, max_tokens, arrival delay) for n requests of mixed prompt lengths."""
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        content = TOPICS[i % len(TOPICS)]
        if i % 3 == 1:
            content = LONG_CONTEXT * rng.randint(1, 6) + content
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        requests.append((list(ids), rng.choice([8, 16, 24, 32, 48]), rng.uniform(0.0, 3.0)))
    return requests


def reference(model: Any, prompt: list[int], max_tokens: int) -> tuple[list[int], list[tuple[int, float]]]:
    """Greedy tokens of `model.generate`, and per token the runner-up token and its gap to the best logit."""
    import torch

    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    runner_up = []
    for logits in out.logits:
        top = logits[0].float().topk(2)
        runner_up.append((int(top.indices[1]), float(top.values[0] - top.values[1])))
    return out.sequences[0, len(prompt) :].tolist(), runner_up


def compare(got: list[int], expected: list[int], runner_up: list[tuple[int, float]], margin: float | None) -> str:
    """ "equal", "near-tie" (left the reference at a near-tie, to its runner-up, when `margin` allows) or "differs"."""
    if got == expected:
        return "equal"
    if margin is None:
        return "differs"
    i = next((i for i, (g, e) in enumerate(zip(got, expected, strict=False)) if g != e), None)
    if i is None:  # one is a prefix of the other: the shorter stopped (EOS) where the other did not
        i = min(len(got), len(expected))
        if i >= len(runner_up):
            return "differs"
        second, gap = runner_up[i]
        return "near-tie" if gap <= margin and len(got) > i and got[i] == second else "differs"
    second, gap = runner_up[i]
    return "near-tie" if gap <= margin and got[i] == second else "differs"


def run_engine(
    model: Any, tokenizer: Any, requests: list[tuple[list[int], int, float]], compile_mode: str
) -> tuple[list[list[int]], int]:
    """Each request's greedy tokens through one engine (prefix caching on), and the prompt tokens it served from
    cached blocks."""
    from fitserve.server.engine.compile_mode import CompileMode
    from fitserve.server.engine.config import EngineConfig
    from fitserve.server.engine.engine import Engine
    from fitserve.server.engine.types import SamplingParams

    config = EngineConfig(
        served_model_name="smollm2-135m-instruct",
        max_model_len=2048,
        kv_capacity_tokens=16384,
        max_batch_size=None,
        max_waiting=256,
        max_prefill_tokens=512,
        compile_mode=CompileMode(compile_mode),
        shared_weight_copy_bytes=1 << 30,  # as `fitserve serve` with spare budget: fp32 packs the tied lm_head too
    )

    async def main() -> tuple[list[list[int]], int]:
        engine = Engine(model, tokenizer, config)
        await engine.start()

        async def one(i: int, prompt: list[int], max_tokens: int, delay_s: float) -> list[int]:
            await asyncio.sleep(delay_s)
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
            return [t async for out in engine.generate(prompt, params, f"eq-{i}") for t in out.token_ids_delta]

        try:
            outputs = list(await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests))))
            return outputs, engine.snapshot().prefix_cache_hits_total
        finally:
            await engine.stop(timeout_s=10)

    return asyncio.run(main())


def check_equivalence(
    model_dir: Path, precision: Precision, compile_mode: str, n: int = 16
) -> tuple[int, int, list[str], int, int, int]:
    """(exactly equal requests, total, diffs, near-tie divergences, prompt tokens served from the prefix cache,
    Linears the engine prepacked for oneDNN) for one precision and decode mode."""
    model, tokenizer = load(model_dir, precision)
    requests = make_requests(tokenizer, n)
    expected = [reference(model, prompt, max_tokens) for prompt, max_tokens, _ in requests]
    got, cached_tokens = run_engine(model, tokenizer, requests, compile_mode)
    margin = None if compile_mode == "off" else NEAR_TIE_LOGITS[precision.value]
    verdicts = [compare(g, e, up, margin) for g, (e, up) in zip(got, expected, strict=True)]
    diffs = [
        f"request {i} (prompt {len(r[0])} tokens): engine {g} != generate {e[0]}"
        for i, (r, g, e, v) in enumerate(zip(requests, got, expected, verdicts, strict=True))
        if v == "differs"
    ]
    packed = sum(type(m).__name__ == "PackedLinear" for m in model.modules())
    return verdicts.count("equal"), len(requests), diffs, verdicts.count("near-tie"), cached_tokens, packed


@pytest.mark.timeout(1800)
# INT8 is left out on purpose: bitsandbytes' LLM.int8() picks outlier columns over the whole batch, so a row's
# result depends on its batch neighbours (measured: 3 of 6 requests diverge). NF4 dequantizes weights and stays exact.
@pytest.mark.parametrize("precision", [Precision.BF16, Precision.FP32, Precision.NF4], ids=lambda p: p.value)
@pytest.mark.parametrize("compile_mode", ["off", "eager"])
def test_engine_equals_generate_token_for_token(
    default_model_dir: Path, precision: Precision, compile_mode: str, record_property: Any
) -> None:
    exact, total, diffs, near_ties, cached_tokens, packed = check_equivalence(
        default_model_dir, precision, compile_mode
    )
    record_property("near_tie_divergences", near_ties)
    print(f"{precision.value} compile_mode={compile_mode}: {exact}/{total} equal, {near_ties} near-tie divergences")
    assert not diffs, "\n".join(diffs)
    # fp32 runs on oneDNN-prepacked Linears (all 211, the tied lm_head too) while the reference ran plain sgemm;
    # NF4 here has fp32 dense layers, so its one plain Linear (lm_head) is packed; bitsandbytes' 4-bit ones are not
    assert packed == {Precision.FP32: 211, Precision.NF4: 1, Precision.BF16: 0}[precision]
    assert exact + near_ties == total == 16
    if compile_mode == "off":
        assert near_ties == 0
    assert cached_tokens >= 16 * 4, "prefix-cache hits are part of what this test checks"
