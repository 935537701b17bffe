"""The meta-device estimator against the real footprint of the tiny random Llama, loaded for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from fitserve.quant.estimate import (
    CPU_RUNTIME_BYTES,
    CUDA_CONTEXT_BYTES,
    ModelShape,
    inspect_model,
    kv_bytes_per_token,
    overhead,
    shape_to_json,
    weights_bytes,
)
from fitserve.quant.load import measure_quant_state_bytes
from fitserve.quant.schemes import DType, Precision, handler_for


@pytest.fixture(scope="module")
def tiny_shape(tiny_model_dir: Path) -> ModelShape:
    return inspect_model(tiny_model_dir, use_cache=False)


def test_shape_read_from_config_and_skeleton(tiny_shape: ModelShape) -> None:
    assert (tiny_shape.num_layers, tiny_shape.hidden_size, tiny_shape.num_kv_heads, tiny_shape.head_dim) == (
        2,
        64,
        2,
        16,
    )
    assert tiny_shape.tie_word_embeddings and tiny_shape.prequantized is None
    assert len(tiny_shape.linears) == 2 * 7  # q k v o gate up down per layer; lm_head stays dense


def test_tied_embeddings_counted_once(tiny_model_dir: Path, tiny_shape: ModelShape) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tiny_shape.total_params == sum(p.numel() for p in model.parameters())
    assert tiny_shape.dense_params + tiny_shape.converted_params == tiny_shape.total_params


def test_kv_bytes_per_token_is_gqa_aware(tiny_shape: ModelShape) -> None:
    assert kv_bytes_per_token(tiny_shape, DType.BFLOAT16) == 2 * 2 * 2 * 16 * 2  # K+V x layers x kv_heads x dim x 2
    assert kv_bytes_per_token(tiny_shape, DType.FLOAT32) == 2 * 2 * 2 * 16 * 4


def _load(tiny_model_dir: Path, precision: Precision, double_quant: bool = False):  # -> PreTrainedModel
    from transformers import AutoModelForCausalLM

    kwargs = handler_for(precision, double_quant=double_quant).load_kwargs(
        DType.FLOAT32 if precision is Precision.FP32 else DType.BFLOAT16
    )
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, device_map="cpu", **kwargs)


@pytest.mark.parametrize(
    ("precision", "double_quant"),
    [
        (Precision.FP32, False),
        (Precision.BF16, False),
        (Precision.INT8, False),
        (Precision.NF4, False),
        (Precision.NF4, True),
    ],
)
def test_prediction_matches_real_footprint(
    tiny_model_dir: Path, tiny_shape: ModelShape, precision: Precision, double_quant: bool
) -> None:
    model = _load(tiny_model_dir, precision, double_quant)
    predicted, predicted_state = weights_bytes(tiny_shape, precision, DType.BFLOAT16, double_quant)
    measured = model.get_memory_footprint()
    assert abs(predicted - measured) / measured < 0.03, (predicted, measured)
    assert predicted == measured  # the arithmetic is exact for these schemes
    assert predicted_state == measure_quant_state_bytes(model)


def test_overhead_parts(tiny_shape: ModelShape) -> None:
    over = overhead(tiny_shape, Precision.BF16, DType.BFLOAT16, max_batch_tokens=128, max_num_seqs=8, max_model_len=256)
    assert over.activation_bytes == 128 * max(2 * 64 + 3 * 128, 2 * 64 + (2 * 4 + 2 * 2) * 16) * 2
    assert over.attention_bytes == 4 * 128 * 256 * 4
    assert over.logits_bytes == 8 * tiny_shape.vocab_size * 4 * 2
    assert over.dequant_bytes == 0 and over.cuda_context_bytes == 0
    assert over.cpu_runtime_bytes == CPU_RUNTIME_BYTES  # on CPU the process's own runtime is in the budget
    quant = overhead(
        tiny_shape,
        Precision.NF4,
        DType.BFLOAT16,
        max_batch_tokens=128,
        max_num_seqs=8,
        max_model_len=256,
        n_cuda_devices=2,
    )
    assert quant.dequant_bytes == 128 * 64 * 2  # largest converted weight (gate/up/down) in bf16
    assert quant.cuda_context_bytes == 2 * CUDA_CONTEXT_BYTES
    assert quant.cpu_runtime_bytes == 0  # host memory is not what a GPU budget covers


def test_shape_cache_round_trip(tiny_model_dir: Path, tiny_shape: ModelShape, tmp_path: Path) -> None:
    first = inspect_model(tiny_model_dir, cache_dir=tmp_path)
    (entry,) = list(tmp_path.glob("*.json"))
    assert first == tiny_shape
    second = inspect_model(tiny_model_dir, cache_dir=tmp_path)  # served from the cache
    assert second == tiny_shape and shape_to_json(second) == shape_to_json(tiny_shape)
    entry.write_text("{not json")
    assert inspect_model(tiny_model_dir, cache_dir=tmp_path) == tiny_shape  # unreadable entry: rebuilt


def test_shape_cache_key_follows_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    cache = tmp_path / "cache"
    inspect_model(copy, cache_dir=cache)
    config = (copy / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    (copy / "config.json").write_text(config)
    assert inspect_model(copy, cache_dir=cache).num_layers == 3
    assert len(list(cache.glob("*.json"))) == 2
