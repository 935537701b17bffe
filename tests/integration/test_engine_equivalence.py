"""THE engine test: 16 concurrent greedy requests through the engine equal `model.generate` on each prompt alone.

Requests of mixed prompt lengths and max_tokens arrive at different times, so they join a running batch
mid-flight (continuous batching, packed prefill + decode in one step). With temperature 0 every request must
produce token for token what `model.generate` (greedy) gives for its prompt alone, in the same precision.

Each precision runs twice: `compile_mode=off` (the eager packed path, decodes attended in one batched call per layer;
what `fitserve serve` runs on CPU) and `compile_mode=eager` (the fixed-shape decode step over bucket-padded block
tables, the forward CUDA graphs replay on a GPU). Both are held to the same rule: token-identical, except a
divergence at a near-tie of the reference (`NEAR_TIE_LOGIT_MARGIN`), counted and printed.
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


def reference(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


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
        spare_bytes=1 << 30,  # as `fitserve serve` with spare budget: fp32 packs the tied lm_head too
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


# The one relaxation (issue 11): batched kernels may round differently from a lone `model.generate`, so a request may
# diverge, but only at a token where the reference's top-2 logits were within this margin (a near-tie). bf16 keeps 8
# bits of mantissa (logits of 16-32 are rounded to steps of 0.125): on CPUs with native bf16 (AVX512-BF16/AMX) its
# matmul kernels depend on the batch's row count, and near-ties flip there; the margin is two such steps. NF4 gets
# bf16's margin although this test loads it with fp32 compute: on a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a
# 4-bit weight at its first eval-mode forward (`Linear4bit.forward`, `packing_format_for_cpu`) and from then on runs
# every matmul through its fused CPU kernel, which casts the activations to bf16 and returns bf16 ("cpu fused op only
# support bf16 for now", backends/cpu/ops.py), engine and reference alike. A last-bit difference in an attention
# output (batched decode attention) can therefore flip a bf16 rounding in the next Linear, as in bf16 itself.
# (Measured with fp32's margin: a flip at a gap of 0.1024, the long-unexplained eager-nf4 failure.) fp32 gets a
# margin five times smaller.
NEAR_TIE_LOGIT_MARGIN = {Precision.BF16: 0.25, Precision.FP32: 0.05, Precision.NF4: 0.25, Precision.INT8: 0.05}


def near_tie_at(model: Any, prompt: list[int], expected: list[int], got: list[int], margin: float) -> str | None:
    """None when the first divergence of `got` from `expected` is an accepted near-tie, else why it is not."""
    import torch

    j = next((k for k, (g, e) in enumerate(zip(got, expected, strict=False)) if g != e), None)
    if j is None:
        return f"lengths differ without a token divergence ({len(got)} vs {len(expected)})"
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + expected[:j]])).logits[0, -1].float()
    top = torch.topk(logits, 2)
    gap = float(top.values[0] - top.values[1])
    if gap > margin:
        return f"at token {j} the reference's top-2 gap is {gap:.4f} > margin {margin}"
    print(f"near-tie divergence at token {j}: reference top-2 gap {gap:.4f} <= {margin}")
    return None


def check_equivalence(
    model_dir: Path, precision: Precision, compile_mode: str, n: int = 16
) -> tuple[int, int, list[str], int, int, int]:
    """(exactly equal requests, total, diffs not explained by a near-tie, prompt tokens served from the prefix cache,
    Linears the engine prepacked for oneDNN, near-tie divergences accepted) for one precision and decode mode."""
    model, tokenizer = load(model_dir, precision)
    requests = make_requests(tokenizer, n)
    expected = [reference(model, prompt, max_tokens) for prompt, max_tokens, _ in requests]
    got, cached_tokens = run_engine(model, tokenizer, requests, compile_mode)
    diffs, near_ties, exact = [], 0, 0
    for i, (r, g, e) in enumerate(zip(requests, got, expected, strict=False)):
        if g == e:
            exact += 1
            continue
        why = near_tie_at(model, r[0], e, g, NEAR_TIE_LOGIT_MARGIN[precision])
        if why is None:
            near_ties += 1
        else:
            diffs.append(f"request {i} (prompt {len(r[0])} tokens): {why}; engine {g} != generate {e}")
    packed = sum(type(m).__name__ == "PackedLinear" for m in model.modules())
    print(
        f"{precision.value} compile_mode={compile_mode}: {exact}/{len(requests)} token-identical, "
        f"{near_ties} near-tie divergences accepted"
    )
    return exact, len(requests), diffs, cached_tokens, packed, near_ties


CASES = [
    pytest.param("off", Precision.BF16, id="off-bf16"),
    pytest.param("off", Precision.FP32, id="off-fp32"),
    pytest.param("off", Precision.NF4, id="off-nf4"),
    pytest.param("eager", Precision.BF16, id="eager-bf16"),
    pytest.param("eager", Precision.FP32, id="eager-fp32"),
    pytest.param("eager", Precision.NF4, id="eager-nf4"),
]


@pytest.mark.timeout(1800)
# INT8 is left out on purpose: bitsandbytes' LLM.int8() picks outlier columns over the whole batch, so a row's
# result depends on its batch neighbours (measured: 3 of 6 requests diverge).
@pytest.mark.parametrize(("compile_mode", "precision"), CASES)
def test_engine_equals_generate_token_for_token(
    default_model_dir: Path, precision: Precision, compile_mode: str, record_property: Any
) -> None:
    exact, total, diffs, cached_tokens, packed, near_ties = check_equivalence(
        default_model_dir, precision, compile_mode
    )
    record_property("near_tie_divergences", near_ties)
    assert not diffs, "\n".join(diffs)
    # fp32 runs on oneDNN-prepacked Linears (121: each of the 30 layers' q/k/v and gate/up joined, so 4 a layer, and
    # the tied lm_head) while the reference ran plain sgemm over 7 separate Linears a layer; NF4 here has fp32 dense
    # layers, so its one plain Linear (lm_head) is packed; bitsandbytes' 4-bit ones are neither packed nor joined;
    # bf16 is packed where the CPU has native bf16 (bit-identical to `F.linear` there)
    import torch

    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert packed == {Precision.FP32: 121, Precision.NF4: 1, Precision.BF16: 121 if native_bf16 else 0}[precision]
    assert total == 16 and exact + near_ties == total
    assert cached_tokens >= 16 * 4, "prefix-cache hits are part of what this test checks"


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("precision", ["int8", "int4", "bf16", "fp32"])
def test_auto_compiled_decode_equals_generate(
    default_model_dir: Path, precision: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_property: Any
) -> None:
    """What `fitserve serve --precision P` runs on CPU with room to spare: AUTO compiles the batch-1 decode step
    (inductor) over torch's weight-only kernels (int8, int4) or as `matvec` reductions over the dense weights kept
    beside oneDNN's packed ones (bf16, fp32). One request at a time (every decode step is a batch of one, so every
    step replays the compiled graph) against `model.generate` on the same loaded model, held to the rule above with
    fp32's margin for fp32 and bf16's for the rest (the weight-only kernels take 16-bit activations)."""
    import torch

    from fitserve.server.engine.compile_mode import CompileMode
    from fitserve.server.engine.engine import Engine
    from fitserve.server.engine.types import SamplingParams
    from fitserve.server.serve import engine_config, load_serving, plan_serving, use_compile_cache
    from fitserve.server.settings import Settings

    if precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no native bf16: the plan does not run bf16 on oneDNN, so AUTO compiles nothing")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile"))  # a cold cache: this test compiles
    use_compile_cache()
    settings = Settings(model=str(default_model_dir), precision=precision, memory_budget="4GiB", max_model_len=1024)
    planned = plan_serving(settings)
    assert planned.compile.mode is CompileMode.INDUCTOR and planned.compile.max_compiled_batch_size == 1
    assert (planned.compile.dense_copy_bytes > 0) is (precision in ("bf16", "fp32"))
    loaded = load_serving(planned, settings)
    model, tokenizer = loaded.loaded.model, loaded.loaded.tokenizer
    requests = make_requests(tokenizer, n=6)
    expected = [reference(model, prompt, max_tokens) for prompt, max_tokens, _ in requests]

    async def main() -> tuple[list[list[int]], int]:
        engine = Engine(model, tokenizer, engine_config(loaded, settings))
        compiled = engine.runner.compiled_decode
        assert engine.runner.compile_mode is CompileMode.INDUCTOR and compiled is not None
        assert compiled.buckets.batch_sizes == (1,)
        replayed = 0
        run = compiled.run

        def counted(rows):  # type: ignore[no-untyped-def]
            nonlocal replayed
            logits = run(rows)
            replayed += logits is not None
            return logits

        compiled.run = counted  # type: ignore[method-assign]
        await engine.start()
        try:
            outputs = []
            for i, (prompt, max_tokens, _) in enumerate(requests):
                params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
                outputs.append(
                    [t async for out in engine.generate(prompt, params, f"ind-{i}") for t in out.token_ids_delta]
                )
            return outputs, replayed
        finally:
            await engine.stop(timeout_s=10)

    got, replayed = asyncio.run(main())
    assert replayed >= sum(len(g) - 1 for g in got) > 0  # every decode step (the first token comes from prefill)
    diffs, near_ties = [], 0
    for i, (r, g, e) in enumerate(zip(requests, got, expected, strict=True)):
        if g == e:
            continue
        margin = NEAR_TIE_LOGIT_MARGIN[Precision.FP32 if precision == "fp32" else Precision.BF16]
        why = near_tie_at(model, r[0], e, g, margin)
        if why is None:
            near_ties += 1
        else:
            diffs.append(f"request {i} (prompt {len(r[0])} tokens): {why}; engine {g} != generate {e}")
    print(
        f"{precision} auto-compiled: {len(requests) - len(diffs) - near_ties}/{len(requests)} token-identical, "
        f"{near_ties} near-tie divergences accepted, {replayed} compiled steps"
    )
    record_property("near_tie_divergences", near_ties)
    assert not diffs, "\n".join(diffs)
