"""Where each decoder layer, its KV cache and its share of the overhead go, one device or several.

Pure arithmetic over per-device budgets, unit-tested with fake devices. On one device everything is on it.
On several GPUs the layers are split in order (layers 0..k-1 on the first GPU, and so on); the embeddings,
the final norm and `lm_head` stay on the first GPU. Every layer's KV cache lives on the layer's device and
holds the same number of tokens (the engine's block tables are shared by all layers), so the KV capacity is
the largest token count at which every device holds its layers' weights, its layers' KV and its overhead.
The split is chosen to make that count as large as possible (docs/memory-model.md, "Several GPUs").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# The engine's KV cache holds one block more than its capacity: the scratch block, which no sequence owns (the
# padding rows of a fixed-shape decode step write their K/V there; padded block-table entries point at it).
KV_SCRATCH_BLOCKS = 1


def kv_cache_tokens(capacity_tokens: int, block_size_tokens: int) -> int:
    """Token slots the engine's KV cache allocates for `capacity_tokens` of capacity (the scratch block added)."""
    return capacity_tokens + KV_SCRATCH_BLOCKS * block_size_tokens


@dataclass(frozen=True)
class DeviceShare:
    """One device's part of the plan."""

    device: str  # "cpu" or "cuda:N"
    budget_bytes: int
    first_layer: int
    num_layers: int
    weights_bytes: int  # weights + quantization state placed here
    overhead_bytes: int
    kv_bytes_per_token: int  # K+V of this device's layers for one token
    kv_capacity_tokens: int  # the same on every device
    block_size_tokens: int  # the engine's KV page (the cache adds one scratch block to the capacity)

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the KV cache allocated on this device: the capacity plus the scratch block."""
        return self.kv_bytes_per_token * kv_cache_tokens(self.kv_capacity_tokens, self.block_size_tokens)

    @property
    def spare_bytes(self) -> int:
        """Budget this device keeps after weights, overhead and its KV cache (never below zero)."""
        return max(self.budget_bytes - self.weights_bytes - self.overhead_bytes - self.kv_cache_bytes, 0)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (also the `device_split` entries of `fitserve plan --json`)."""
        return {
            "device": self.device,
            "budget_bytes": self.budget_bytes,
            "layers": [self.first_layer, self.first_layer + self.num_layers],
            "weights_bytes": self.weights_bytes,
            "overhead_bytes": self.overhead_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_cache_bytes": self.kv_cache_bytes,
            "spare_bytes": self.spare_bytes,
        }


@dataclass(frozen=True)
class LayerCosts:
    """What a model costs, cut the way placement needs it."""

    num_layers: int
    layer_bytes: int  # weights + quant state of one decoder layer (rounded up)
    head_bytes: int  # everything outside the decoder layers: embeddings, final norm, lm_head, buffers
    kv_bytes_per_layer_token: int  # K+V of one layer for one token
    first_overhead_bytes: int  # overhead on the device with the embeddings and lm_head (logits live there)
    other_overhead_bytes: int  # overhead on any other device (its context, one layer's activations)


def align_down(tokens: int, block_size_tokens: int) -> int:
    """`tokens` rounded down to whole KV blocks."""
    return max(tokens, 0) // block_size_tokens * block_size_tokens


def _layers_that_fit(budget_bytes: int, base_bytes: int, costs: LayerCosts, tokens: int) -> int:
    per_layer = costs.layer_bytes + costs.kv_bytes_per_layer_token * tokens
    room = budget_bytes - base_bytes
    return max(room // per_layer, 0) if per_layer > 0 else costs.num_layers


def _fits(budgets: Sequence[int], costs: LayerCosts, tokens: int) -> list[int] | None:
    """Layers per device (in order, filling each before the next) at `tokens` KV slots (scratch included), or
    None."""
    left = costs.num_layers
    counts = []
    for index, budget in enumerate(budgets):
        base = costs.head_bytes + costs.first_overhead_bytes if index == 0 else costs.other_overhead_bytes
        if budget < base:
            if index == 0:
                return None  # the embeddings and lm_head must fit on the first device
            counts.append(0)
            continue
        take = min(_layers_that_fit(budget, base, costs, tokens), left)
        counts.append(take)
        left -= take
    return counts if left == 0 else None


def split_layers(
    devices: Sequence[tuple[str, int]], costs: LayerCosts, max_tokens: int, block_size_tokens: int
) -> tuple[DeviceShare, ...] | None:
    """Spread the layers over `devices` ((name, budget) pairs) for the most KV tokens, at most `max_tokens`.

    The capacity is found by bisection over whole blocks: at T tokens device d holds
    floor((budget_d - base_d) / (layer_bytes + (T + scratch) x kv_bytes_per_layer_token)) layers (scratch: the
    cache's scratch block, `kv_cache_tokens`); T is feasible when the
    devices together hold every layer. Returns None when even an empty KV cache does not fit.
    """
    budgets = [budget for _name, budget in devices]
    lo, hi = 0, align_down(max_tokens, block_size_tokens) // block_size_tokens
    if _fits(budgets, costs, kv_cache_tokens(0, block_size_tokens)) is None:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(budgets, costs, kv_cache_tokens(mid * block_size_tokens, block_size_tokens)) is not None:
            lo = mid
        else:
            hi = mid - 1
    tokens = lo * block_size_tokens
    counts = _fits(budgets, costs, kv_cache_tokens(tokens, block_size_tokens))
    assert counts is not None  # feasible at lo by the bisection
    shares = []
    first = 0
    for index, ((name, budget), count) in enumerate(zip(devices, counts, strict=True)):
        head = costs.head_bytes if index == 0 else 0
        over = costs.first_overhead_bytes if index == 0 else (costs.other_overhead_bytes if count else 0)
        shares.append(
            DeviceShare(
                device=name,
                budget_bytes=budget,
                first_layer=first,
                num_layers=count,
                weights_bytes=head + count * costs.layer_bytes,
                overhead_bytes=over,
                kv_bytes_per_token=count * costs.kv_bytes_per_layer_token,
                kv_capacity_tokens=tokens,
                block_size_tokens=block_size_tokens,
            )
        )
        first += count
    return tuple(shares)


def layer_costs(
    *,
    num_layers: int,
    weights_bytes: int,
    layer_weights_bytes: int,
    kv_bytes_per_token: int,
    overhead_parts: Any,  # estimate.Overhead
    num_devices: int,
) -> LayerCosts:
    """Cut a precision's estimate into per-layer and per-device costs.

    Every device pays for its CUDA context and for one layer's transient activations, attention scores and
    dequantized weight (layers run one after another on whichever device holds them); the logits buffer and
    the CPU runtime belong to the first device only.
    """
    per_device = (
        overhead_parts.activation_bytes
        + overhead_parts.attention_bytes
        + overhead_parts.dequant_bytes
        + overhead_parts.cuda_context_bytes // max(num_devices, 1)
    )
    first = per_device + overhead_parts.logits_bytes + overhead_parts.cpu_runtime_bytes
    layer = math.ceil(layer_weights_bytes / num_layers) if num_layers else 0
    return LayerCosts(
        num_layers=num_layers,
        layer_bytes=layer,
        head_bytes=max(weights_bytes - layer * num_layers, 0),
        kv_bytes_per_layer_token=kv_bytes_per_token // num_layers if num_layers else 0,
        first_overhead_bytes=first,
        other_overhead_bytes=per_device,
    )


def device_map_for(shares: Sequence[DeviceShare], layers_module: str) -> dict[str, Any]:
    """A `from_pretrained` device_map: each decoder layer on its device, everything else on the first GPU."""
    first = _index(shares[0].device)
    device_map: dict[str, Any] = {"": first}
    for share in shares:
        for layer in range(share.first_layer, share.first_layer + share.num_layers):
            device_map[f"{layers_module}.{layer}"] = _index(share.device)
    return device_map


def _index(device: str) -> int | str:
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else device
