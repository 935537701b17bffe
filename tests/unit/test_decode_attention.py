"""Batched decode attention over the paged cache: the compiled form (two reductions around a softmax) against SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fitserve.server.engine.kv_cache import DecodeGroup, _grouped_decode, _reduced_decode_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 6, 2, 16, 4


def _paged_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DecodeGroup]:
    """Three decodes (the last one a padding row with one key) over a cache of 9 blocks plus the scratch block."""
    gen = torch.Generator().manual_seed(0)
    slots = 10 * BLOCK
    k_cache = torch.randn(slots, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    v_cache = torch.randn(slots, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    query = torch.randn(1, HEADS, 3, HEAD_DIM, generator=gen).to(dtype)
    block_tables = torch.tensor([[3, 1, 7], [0, 9, 9], [9, 9, 9]])
    group = DecodeGroup(3, block_tables, torch.tensor([11, 2, 1]))
    return query, k_cache, v_cache, group


def _sdpa_reference(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup
) -> torch.Tensor:
    """Each row attended on its own over exactly its context, in fp32: [num, H, D]."""
    rows = []
    for row in range(group.num):
        slots = torch.cat([torch.arange(b * BLOCK, (b + 1) * BLOCK) for b in group.block_tables[row].tolist()])
        slots = slots[: int(group.context_lens[row])]
        k = k_cache[slots].float().transpose(0, 1).unsqueeze(0)  # [1, KVH, L, D]
        v = v_cache[slots].float().transpose(0, 1).unsqueeze(0)
        q = query[:, :, row : row + 1].float()  # [1, H, 1, D]
        rows.append(F.scaled_dot_product_attention(q, k, v, enable_gqa=True)[0, :, 0])
    return torch.stack(rows)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_reduced_decode_attention_equals_sdpa_per_row(dtype: torch.dtype, tol: float) -> None:
    query, k_cache, v_cache, group = _paged_inputs(dtype)
    k = k_cache.view(-1, BLOCK, KV_HEADS, HEAD_DIM)[group.block_tables].view(3, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = v_cache.view(-1, BLOCK, KV_HEADS, HEAD_DIM)[group.block_tables].view(3, -1, KV_HEADS, HEAD_DIM).transpose(1, 2)
    mask = torch.arange(k.shape[2]).unsqueeze(0) < group.context_lens.unsqueeze(1)
    q = query[0].transpose(0, 1).reshape(3, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    got = _reduced_decode_attention(q, k, v, mask, None)
    assert got.dtype is dtype and got.shape == (3, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    expected = _sdpa_reference(query, k_cache, v_cache, group)
    torch.testing.assert_close(got.reshape(3, HEADS, HEAD_DIM).float(), expected, rtol=tol, atol=tol)


def test_grouped_decode_runs_sdpa_eagerly_and_the_reductions_when_compiled() -> None:
    """Eagerly (and under CUDA graphs) one SDPA call; traced by torch.compile, no SDPA: inductor then fuses the
    block-table gather into the reductions. Both equal the per-row reference."""
    query, k_cache, v_cache, group = _paged_inputs(torch.float32)
    targets: list[str] = []

    def capture(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]) -> torch.fx.GraphModule:
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    def attend(q: torch.Tensor) -> torch.Tensor:
        return _grouped_decode(q, k_cache, v_cache, group, BLOCK, None)

    torch._dynamo.reset()
    with torch.inference_mode():
        eager = attend(query)
        compiled = torch.compile(attend, backend=capture, fullgraph=True)(query)
    expected = _sdpa_reference(query, k_cache, v_cache, group)
    torch.testing.assert_close(eager, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-5)
    assert targets and not any("scaled_dot_product_attention" in target for target in targets)
