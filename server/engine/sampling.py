"""Token sampling on a [batch, vocab] logits tensor: penalties, temperature, top-k/top-p, seeds, logprobs.

Everything is vectorised over the vocabulary; the only Python loops run over the rows of the batch (one per
sequence that samples this step). Greedy rows without penalties take a single `argmax`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fitserve.server.engine.types import SamplingParams


@dataclass(frozen=True)
class SampledToken:
    """A sampled token with its log-probability and top alternatives (empty unless logprobs were asked for)."""

    token_id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request generator: seeded for reproducibility, or from fresh entropy when seed is None."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def apply_penalties(
    logits: torch.Tensor,
    output_token_ids: Sequence[Sequence[int]],
    presence: Sequence[float],
    frequency: Sequence[float],
) -> torch.Tensor:
    """OpenAI presence/frequency penalties over each row's generated tokens (in place; returns logits).

    logit[t] -= frequency * count(t) + presence * (count(t) > 0)
    """
    for row, ids in enumerate(output_token_ids):
        if not ids or (presence[row] == 0.0 and frequency[row] == 0.0):
            continue
        idx = torch.tensor(ids, dtype=torch.long, device=logits.device)
        counts = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        counts.index_add_(0, idx, torch.ones(len(ids), dtype=logits.dtype, device=logits.device))
        logits[row] -= frequency[row] * counts + presence[row] * (counts > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and nucleus top-p; always keeps the best token.

    top_k: [B] long (vocab size = no limit); top_p: [B] float (1.0 = no limit). Returns a new tensor.
    """
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    drop = ranks >= top_k.unsqueeze(1)
    probs = sorted_logits.softmax(dim=-1)
    cum_before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each token
    drop |= cum_before > top_p.unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def _needs_filter(p: SamplingParams, vocab: int) -> bool:
    return p.temperature > 0 and ((p.top_k is not None and 0 < p.top_k < vocab) or p.top_p < 1.0)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_token_ids: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
) -> list[SampledToken]:
    """Sample one token per row of `logits` [B, V] following each row's `SamplingParams`."""
    _rows, vocab = logits.shape
    greedy_only = all(p.temperature == 0 for p in params)
    penalised = any(p.presence_penalty or p.frequency_penalty for p in params)
    want_logprobs = any(p.logprobs is not None for p in params)
    if greedy_only and not penalised and not want_logprobs:
        return [SampledToken(t) for t in logits.argmax(dim=-1).tolist()]

    raw = logits.float()
    work = raw.clone() if penalised else raw
    if penalised:
        apply_penalties(
            work, output_token_ids, [p.presence_penalty for p in params], [p.frequency_penalty for p in params]
        )
    chosen = work.argmax(dim=-1)
    random_rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if random_rows:
        dev = logits.device
        temps = torch.tensor([params[i].temperature for i in random_rows], device=dev)
        sub = work[random_rows] / temps.unsqueeze(1)
        if any(_needs_filter(params[i], vocab) for i in random_rows):
            top_k = torch.tensor([min(params[i].top_k or vocab, vocab) for i in random_rows], device=dev)
            top_p = torch.tensor([params[i].top_p for i in random_rows], device=dev)
            sub = apply_top_k_top_p(sub, top_k, top_p)
        probs = sub.softmax(dim=-1)
        for j, i in enumerate(random_rows):
            chosen[i] = torch.multinomial(probs[j], 1, generator=generators[i]).item()

    tokens = chosen.tolist()
    if not want_logprobs:
        return [SampledToken(t) for t in tokens]
    logprobs = raw.log_softmax(dim=-1)
    out: list[SampledToken] = []
    for i, (p, tok) in enumerate(zip(params, tokens, strict=False)):
        if p.logprobs is None:
            out.append(SampledToken(tok))
            continue
        top: tuple[tuple[int, float], ...] = ()
        if p.logprobs > 0:
            values, ids = logprobs[i].topk(min(p.logprobs, vocab))
            top = tuple(zip(ids.tolist(), values.tolist(), strict=False))
        out.append(SampledToken(tok, logprobs[i, tok].item(), top))
    return out
