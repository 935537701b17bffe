"""The shapes torch's int4 weight-only CPU kernel takes (no torch import): shared by the scheme handler, which
predicts bytes, and `quant/weight_only.py`, which converts."""

from __future__ import annotations

INT4_GROUP_SIZES = (32, 64, 128)  # what torch's int4 CPU kernel accepts
# one scale and zero per 32 weights: on the default model the most accurate of the three and, measured on this
# CPU, the fastest (docs/memory-model.md); 128 does not divide its 576-wide rows anyway
DEFAULT_INT4_GROUP_SIZE = 32
INT4_ROW_MULTIPLE = 16  # `_convert_weight_to_int4pack_for_cpu` packs rows in blocks of 16


def int4_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """True when torch's int4 kernel takes an out x in Linear in groups of `group_size` (rows in multiples of
    16, groups that tile each row); other Linears stay dense under INT4."""
    return group_size in INT4_GROUP_SIZES and in_features % group_size == 0 and out_features % INT4_ROW_MULTIPLE == 0
