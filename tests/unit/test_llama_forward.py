"""The direct Llama layer loop gives bit-identical logits to transformers' `model(...)`, step by step, and is used
only for the exact transformers Llama classes on one device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fitserve.server.engine.config import EngineConfig
from fitserve.server.engine.joined_projections import QKV_NAME
from fitserve.server.engine.llama_forward import supports_direct_forward
from fitserve.server.engine.runner import ModelRunner
from fitserve.server.engine.scheduler import Scheduler, Sequence
from fitserve.server.engine.types import SamplingParams


def load_tiny(tiny_model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()


def engine_config(direct: bool, join: bool = True) -> EngineConfig:
    return EngineConfig(
        served_model_name="tiny",
        max_model_len=512,
        kv_capacity_tokens=2048,
        max_prefill_tokens=48,  # long prompts prefill in chunks on top of their cached context
        direct_forward=direct,
        join_projections=join,
    )


def workload(seed: int) -> list[Sequence]:
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(100, 40000, (40,), generator=gen).tolist()  # a common prefix: prefix-cache hits
    seqs = []
    for i in range(6):
        own = torch.randint(100, 40000, (int(torch.randint(2, 70, (1,), generator=gen)),), generator=gen).tolist()
        prompt = shared + own if i % 2 else own
        params = SamplingParams(max_tokens=6 + i, temperature=0, ignore_eos=True)
        seqs.append(Sequence(f"s{i}", prompt, len(prompt), params, 0.0))
    return seqs


@pytest.mark.parametrize("join", [True, False], ids=["joined", "separate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_direct_logits_equal_transformers_bit_for_bit(tiny_model_dir: Path, dtype: torch.dtype, join: bool) -> None:
    """Prefills (whole, chunked, on a cached prefix) and decodes (batched attention) step by step, both ways; the
    direct loop with its projections joined (the default) or separate, transformers on an untouched model."""
    sides = []
    for direct in (True, False):
        runner = ModelRunner(load_tiny(tiny_model_dir, dtype), engine_config(direct, join))
        assert runner.direct_forward is direct
        layers = runner.model.model.layers
        assert all(hasattr(layer.self_attn, QKV_NAME) is (direct and join) for layer in layers)
        sides.append((runner, Scheduler(runner.config), workload(seed=3)))
    steps = 0
    while any(sched.has_work for _, sched, _ in sides) or steps == 0:
        for i in range(len(sides[0][2])):  # requests arrive over the first steps, the same way on both sides
            if steps == i:
                for _, sched, seqs in sides:
                    sched.add(seqs[i])
        batches = [sched.schedule() for _, sched, _ in sides]
        logits = [runner.forward_logits(batch) for (runner, _, _), batch in zip(sides, batches, strict=True)]
        assert torch.equal(logits[0], logits[1]), f"step {steps}: direct and transformers logits differ"
        tokens = logits[0].argmax(-1).tolist()
        for (_, sched, _), batch in zip(sides, batches, strict=True):
            sched.postprocess(batch, tokens)
        steps += 1
    assert [s.output_token_ids for s in sides[0][2]] == [s.output_token_ids for s in sides[1][2]]
    assert steps > 10


def test_only_exact_llama_classes_on_one_device_take_the_direct_loop(tiny_model_dir: Path) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    model = load_tiny(tiny_model_dir, torch.float32)
    assert supports_direct_forward(model)

    mistral = MistralForCausalLM(
        MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    )
    assert not supports_direct_forward(mistral)

    class Hook:  # what accelerate's dispatch leaves on a module of a model spread over devices
        pass

    model.model.layers[1]._hf_hook = Hook()
    assert not supports_direct_forward(model)
    del model.model.layers[1]._hf_hook

    class PatchedLayerNorm(type(model.model.norm)):  # type: ignore[misc]
        pass

    model.model.layers[0].input_layernorm.__class__ = PatchedLayerNorm
    assert not supports_direct_forward(model)
    assert not ModelRunner(model, engine_config(direct=True)).direct_forward
