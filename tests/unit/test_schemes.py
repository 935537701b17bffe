"""Per-scheme byte arithmetic and the precision enum."""

from __future__ import annotations

import pytest

from fitserve.quant.schemes import (
    DType,
    GptqParams,
    KernelBackend,
    LinearShape,
    Precision,
    backend_for,
    dense_dtype_for,
    four_bit_precision,
    handler_for,
    int4_fits,
    parse_precision,
)

Q_PROJ = LinearShape(out_features=576, in_features=576)  # one SmolLM2 q_proj: 331,776 weights


def test_precision_values_and_parsing() -> None:
    assert [p.value for p in Precision] == ["fp32", "fp16", "bf16", "int8", "int4", "nf4", "gptq"]
    assert parse_precision("auto") is None
    assert parse_precision("NF4") is Precision.NF4
    assert parse_precision(Precision.INT8) is Precision.INT8
    with pytest.raises(ValueError, match="choose one of"):
        parse_precision("int3")


def test_dense_schemes_keep_every_weight() -> None:
    bf16 = handler_for(Precision.BF16)
    assert not bf16.converts_linears()
    assert bf16.linear_footprint_bytes(Q_PROJ, DType.BFLOAT16) == 331_776 * 2
    assert bf16.linear_side_bytes(Q_PROJ) == 0


def test_int8_one_byte_per_weight_plus_row_scales_outside_the_footprint() -> None:
    int8 = handler_for(Precision.INT8)
    assert int8.linear_footprint_bytes(Q_PROJ, DType.BFLOAT16) == 331_776
    assert int8.linear_side_bytes(Q_PROJ) == 576 * 4  # fp32 SCB per output row
    with_bias = LinearShape(576, 576, has_bias=True)
    assert int8.linear_footprint_bytes(with_bias, DType.BFLOAT16) == 331_776 + 576 * 2


def test_nf4_half_byte_per_weight_and_absmax() -> None:
    nf4 = handler_for(Precision.NF4)
    assert nf4.linear_footprint_bytes(Q_PROJ, DType.BFLOAT16) == 165_888
    assert nf4.linear_side_bytes(Q_PROJ) == 5184 * 4 + 16 * 4  # fp32 absmax per 64 + code book


def test_nf4_double_quant_shrinks_absmax() -> None:
    dq = handler_for(Precision.NF4, double_quant=True)
    assert dq.linear_footprint_bytes(Q_PROJ, DType.BFLOAT16) == 165_888
    # 5184 uint8 absmax + 21 fp32 nested absmax + 16 + 256 fp32 code books
    assert dq.linear_side_bytes(Q_PROJ) == 5184 + 21 * 4 + 16 * 4 + 256 * 4


def test_gptq_4bit_group_128() -> None:
    gptq = handler_for(Precision.GPTQ, gptq=GptqParams(bits=4, group_size=128))
    lin = LinearShape(out_features=256, in_features=512)
    qweight = 512 * 4 // 32 * 256 * 4
    qzeros = 4 * (256 * 4 // 32) * 4
    scales = 4 * 256 * 2
    g_idx = 512 * 4
    shifts = 2 * 8 * 4
    assert gptq.linear_footprint_bytes(lin, DType.FLOAT16) == qweight + qzeros + scales + g_idx + shifts


def test_dense_dtype_per_precision() -> None:
    assert dense_dtype_for(Precision.FP32, DType.BFLOAT16) is DType.FLOAT32
    assert dense_dtype_for(Precision.FP16, DType.BFLOAT16) is DType.FLOAT16
    assert dense_dtype_for(Precision.INT8, DType.FLOAT16) is DType.FLOAT16
    assert DType.BFLOAT16.bytes == 2 and DType.FLOAT32.bytes == 4


def test_load_kwargs_build_bitsandbytes_configs() -> None:
    import torch

    kwargs = handler_for(Precision.NF4, double_quant=True).load_kwargs(DType.BFLOAT16)
    cfg = kwargs["quantization_config"]
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16 and kwargs["dtype"] == torch.bfloat16
    assert handler_for(Precision.INT8).load_kwargs(DType.FLOAT16)["quantization_config"].load_in_8bit
    assert "quantization_config" not in handler_for(Precision.BF16).load_kwargs(DType.BFLOAT16)


def test_torch_int8_keeps_row_scales_in_the_footprint() -> None:
    int8 = handler_for(Precision.INT8, backend=KernelBackend.TORCH)
    assert int8.linear_footprint_bytes(Q_PROJ, DType.BFLOAT16) == 331_776 + 576 * 2  # int8 + bf16 scale per row
    assert int8.linear_side_bytes(Q_PROJ) == 0
    # prefill-sized matmuls convert one (joined gate/up: twice the largest) weight to bf16 for the call
    assert int8.largest_dequant_bytes([Q_PROJ], DType.BFLOAT16) == 2 * 331_776 * 2
    assert "quantization_config" not in int8.load_kwargs(DType.BFLOAT16)


def test_torch_int4_half_byte_per_weight_plus_group_scales_and_zeros() -> None:
    int4 = handler_for(Precision.INT4)
    assert int4.linear_footprint_bytes(Q_PROJ, DType.BFLOAT16) == 165_888 + (576 // 32) * 576 * 2 * 2
    assert handler_for(Precision.INT4, int4_group_size=64).linear_footprint_bytes(Q_PROJ, DType.BFLOAT16) == (
        165_888 + 9 * 576 * 2 * 2
    )
    odd = LinearShape(out_features=8, in_features=576)  # rows not a multiple of 16: the kernel cannot take it
    assert not int4_fits(8, 576, 32) and int4.linear_footprint_bytes(odd, DType.BFLOAT16) == 8 * 576 * 2
    assert not int4_fits(576, 576, 128) and int4_fits(1536, 576, 64)


def test_backend_per_precision_and_device() -> None:
    assert backend_for(Precision.INT8, on_cuda=False) is KernelBackend.TORCH
    assert backend_for(Precision.INT8, on_cuda=True) is KernelBackend.BITSANDBYTES
    bnb = KernelBackend.BITSANDBYTES
    assert backend_for(Precision.INT8, on_cuda=False, requested=bnb) is bnb
    assert backend_for(Precision.NF4, on_cuda=False) is bnb
    assert backend_for(Precision.INT4, on_cuda=False) is KernelBackend.TORCH
    assert backend_for(Precision.BF16, on_cuda=False) is None
    with pytest.raises(ValueError, match="CPU"):
        backend_for(Precision.INT4, on_cuda=True)
    assert four_bit_precision(KernelBackend.TORCH) is Precision.INT4 and four_bit_precision(bnb) is Precision.NF4
