"""The preallocated paged KV cache and the attention function that reads and writes it.

Layout: per layer one K and one V tensor of shape [(num_blocks + 1) * block_size, num_kv_heads, head_dim]
("slots"), on the device of that layer (several GPUs: each layer's KV lives beside its weights, sized by the plan's
split). A sequence owns a list of blocks (its block table); token position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`. The last block (`scratch_block`) belongs to no
sequence: the padding rows of a fixed-shape decode step write their K/V there and padded block-table entries
point at it, so padding never touches a block the pool hands out or keeps for prefix caching.

The attention function is registered with `transformers.AttentionInterface` under `ATTENTION_NAME`. The HF model
runs on a packed batch (`input_ids` [1, total_tokens], per-token `position_ids`) and receives the step's
`PackedBatch` through the forward `**kwargs`; each attention layer writes its new K/V into the cache (indexed by
`module.layer_idx`) and computes attention per sequence over its cached keys. Because the name is not a known mask
implementation, transformers builds no 4D mask at all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fitserve.quant.matvec import realized_fp32

ATTENTION_NAME = "fitserve_paged"
BATCH_KWARG = "fitserve_batch"


@dataclass
class SeqSlice:
    """One sequence's chunk inside the packed batch: packed rows [row, row+length), positions from `start`."""

    row: int
    length: int
    start: int
    slots: torch.Tensor | None  # [start + length] cache slots of positions 0 .. start+length-1; None when start == 0
    mask: torch.Tensor | None  # [length, start + length] bool for a chunk on top of a cached prefix, else None
    first_slot: int | None = None  # set when those slots are consecutive: the context is a view, not a gather


@dataclass
class DecodeGroup:
    """The first `num` packed tokens are single-token decodes attended in one padded, masked SDPA call per layer.

    Only tensors besides `num`, so a compiled decode step sees the same shapes at every replay of its bucket.
    """

    num: int
    block_tables: torch.Tensor  # [num, context_blocks] long; entries past a sequence's blocks: the scratch block
    context_lens: torch.Tensor  # [num] long: keys each decode attends to (its position + 1); >= 1 for padding too


@dataclass
class PackedBatch:
    """Per-step metadata shared by every layer: where to write new K/V and what each query attends to."""

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [total_tokens] cache slot of each packed token
    slices: list[SeqSlice]  # chunks attended one by one (all of them unless `decode_group` is set)
    decode_group: DecodeGroup | None = None
    # Single-query attention is microseconds of work: on CPU an OpenMP fork/join costs more than it saves, and
    # under CPU contention a 2-thread barrier can cost milliseconds. Decode slices then run on one thread.
    single_thread_decode: bool = False


class PagedKVCache:
    """K/V tensors for every layer, allocated once from the block count, each on its layer's device."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | Sequence[torch.device | str],
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks  # one extra block, never handed out: padding rows write here
        devices = [device] * num_layers if isinstance(device, str | torch.device) else list(device)
        if len(devices) != num_layers:
            raise ValueError(f"{len(devices)} devices given for {num_layers} layers")
        shape = ((num_blocks + 1) * block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=dev) for dev in devices]
        self.v = [torch.zeros(shape, dtype=dtype, device=dev) for dev in devices]

    @property
    def scratch_slot(self) -> int:
        """The first slot of the scratch block."""
        return self.scratch_block * self.block_size

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache."""
        return sum(self.nbytes_by_device().values())

    def nbytes_by_device(self) -> dict[str, int]:
        """Bytes held by the cache on each device."""
        out: dict[str, int] = {}
        for tensor in (*self.k, *self.v):
            out[str(tensor.device)] = out.get(str(tensor.device), 0) + tensor.numel() * tensor.element_size()
        return out


def layer_devices(model: torch.nn.Module, num_layers: int, default: torch.device) -> list[torch.device]:
    """The device of each attention layer (by its `layer_idx`), `default` for a layer without weights."""
    devices = [default] * num_layers
    for module in model.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int) and 0 <= index < num_layers:
            weight = next(module.parameters(recurse=True), None)
            if weight is not None:
                devices[index] = weight.device
    return devices


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device` (itself when already there: the one-device case costs nothing)."""
    return tensor if tensor.device == device else tensor.to(device, non_blocking=True)


def _paged_context(cache: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """Each row's cached K or V through its block table: [rows, KVH, context_blocks * block_size, D]."""
    rows, blocks = block_tables.shape
    paged = cache.view(-1, block_size, *cache.shape[1:])  # [num_blocks + 1, block_size, KVH, D]
    return paged[block_tables].view(rows, blocks * block_size, *cache.shape[1:]).transpose(1, 2)


def _grouped_decode(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: DecodeGroup,
    block_size: int,
    scaling: float | None,
) -> torch.Tensor:
    """All decodes in one masked attention over padded contexts -> [num, H, D] (faster, not bit-exact): one SDPA
    call eagerly (and under CUDA graphs), `_reduced_decode_attention` while inductor compiles the step."""
    n = group.num
    block_tables = _on(group.block_tables, k_cache.device)
    k = _paged_context(k_cache, block_tables, block_size)
    v = _paged_context(v_cache, block_tables, block_size)
    num_heads, head_dim = query.shape[1], query.shape[3]
    kv_heads = k.shape[1]
    context_lens = _on(group.context_lens, k.device)
    mask = torch.arange(k.shape[2], device=k.device).unsqueeze(0) < context_lens.unsqueeze(1)
    # query heads sharing a KV head become rows of one "head": [n, KVH, H/KVH, D] (transformers' pack_gqa)
    q = query[0, :, :n].transpose(0, 1).reshape(n, kv_heads, num_heads // kv_heads, head_dim)
    if torch.compiler.is_compiling():
        out = _reduced_decode_attention(q, k, v, mask, scaling)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.view(n, 1, 1, -1), scale=scaling)
    return out.reshape(n, num_heads, head_dim)


def _reduced_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Masked attention of one query row per sequence written as two multiply-and-sum reductions around a softmax,
    in fp32: q [n, KVH, G, D], k/v [n, KVH, L, D] (views through the block tables), mask [n, L] -> [n, KVH, G, D].

    Only for compiled steps: inductor fuses the block-table gather into the reductions (no gathered copy of the
    context) and runs a layer's attention as a few fused loops instead of two gathers and an SDPA call. The default
    model's 30 layers in bf16 on the 2-core VM: 1.21 -> 0.57 ms at batch 1 over 128 keys, 49.9 -> 24.0 ms at batch
    16 over 512 (`benchmarks/attention_decode.py`). Eagerly it would materialise [n, KVH, G, L, D] products: SDPA there.
    """
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    # realised first: inductor would otherwise recompute the query's RoPE inside the loop over keys (batch 16 over
    # 128 keys, whole step: 43 ms with it inlined, 28-31 ms realised, 36 ms with SDPA)
    row = realized_fp32(q)
    scores = (row.unsqueeze(3) * k.float().unsqueeze(2)).sum(dim=-1) * scale  # [n, KVH, G, L]
    scores = scores.masked_fill(~mask.view(mask.shape[0], 1, 1, -1), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = (weights.unsqueeze(-1) * v.float().unsqueeze(2)).sum(dim=-2)  # [n, KVH, G, D]
    return out.to(q.dtype)


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """One decode token over its whole context, q [1, H, 1, D] and k/v [1, KVH, L, D] -> [1, H, 1, D], with the
    query heads that share a KV head as rows of one head (transformers' pack_gqa).

    For 16-bit queries this is 3-6x faster on CPU than SDPA's `enable_gqa` over one row per head (the default
    model in bf16 on 2 cores: 61 -> 18 us at 90 keys, 364 -> 66 us at 600; one layer's call per sequence, so at 16
    running sequences it was 60% of a decode step). It rounds differently in the last bit now and then, so greedy
    output may differ from `model.generate` at a near-tie (the equivalence test's rule). fp32 keeps transformers'
    own call: SDPA is fast there and the result exact."""
    num_heads, head_dim = q.shape[1], q.shape[3]
    kv_heads = k.shape[1]
    packed = q.reshape(1, kv_heads, num_heads // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(packed, k, v, scale=scaling)
    return out.reshape(1, num_heads, 1, head_dim)


def _context(cache: torch.Tensor, s: SeqSlice) -> torch.Tensor:
    """A sequence's cached K or V for positions 0 .. start+length-1 as [1, KVH, L, D]."""
    if s.first_slot is not None:
        ctx = cache[s.first_slot : s.first_slot + s.start + s.length]
    elif s.slots is not None:
        ctx = cache.index_select(0, _on(s.slots, cache.device))
    else:
        raise ValueError("a slice on top of a cached context needs its slots or its first slot")
    return ctx.transpose(0, 1).unsqueeze(0)


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run a block with `n` torch intra-op threads (None: unchanged)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention over the paged cache for a packed batch. query [1, H, T, D], key/value [1, KVH, T, D].

    Returns the attention output as [1, T, H, D] (the layout transformers' attention modules expect).
    Without a `PackedBatch` in kwargs (e.g. a plain `model.generate`) it falls back to transformers' SDPA.
    """
    batch = kwargs.get(BATCH_KWARG)
    if not isinstance(batch, PackedBatch):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    layer = module.layer_idx  # transformers' attention modules number their layer
    if not isinstance(layer, int):
        raise TypeError(f"{type(module).__name__} has no integer layer_idx; paged attention needs one")
    return paged_attention(layer, query, key, value, batch, scaling), None


def paged_attention(
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    batch: PackedBatch,
    scaling: float | None,
) -> torch.Tensor:
    """Write the new K/V of `layer` into the cache and attend every packed token to its sequence's context.

    query [1, H, T, D], key/value [1, KVH, T, D] -> [1, T, H, D]."""
    k_cache, v_cache = batch.cache.k[layer], batch.cache.v[layer]
    new_k = key[0].transpose(0, 1)  # [T, KVH, D]
    new_v = value[0].transpose(0, 1)
    slot_mapping = _on(batch.slot_mapping, k_cache.device)
    k_cache.index_copy_(0, slot_mapping, new_k)
    v_cache.index_copy_(0, slot_mapping, new_v)

    # Each sequence is attended on its own, with exactly the SDPA call transformers makes for a lone sequence
    # (causal prefill without a mask; a decode token over its whole context without a mask; GQA inside SDPA), so
    # a token's output does not depend on what else is in the batch.
    pieces: list[torch.Tensor] = []  # each [tokens, H, D], in packing order
    if batch.decode_group is not None:
        pieces.append(_grouped_decode(query, k_cache, v_cache, batch.decode_group, batch.cache.block_size, scaling))
    for s in batch.slices:
        q = query[:, :, s.row : s.row + s.length]  # [1, H, c, D]
        if s.slots is None:  # the chunk is the whole context so far
            k = key[:, :, s.row : s.row + s.length]
            v = value[:, :, s.row : s.row + s.length]
            out = F.scaled_dot_product_attention(q, k, v, is_causal=s.length > 1, scale=scaling, enable_gqa=True)
        else:
            k, v = _context(k_cache, s), _context(v_cache, s)  # [1, KVH, L, D]
            with _threads(1 if s.length == 1 and batch.single_thread_decode else None):
                if s.length == 1 and q.dtype != torch.float32:
                    out = _single_query_attention(q, k, v, scaling)
                else:
                    mask = None if s.mask is None else _on(s.mask, k.device)
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        pieces.append(out[0].transpose(0, 1))  # [c, H, D]
    attn = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
    return attn.unsqueeze(0)


def register_attention() -> str:
    """Register the paged attention function with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME
