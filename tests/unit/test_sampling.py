"""Sampling helpers: greedy, seeds, top-k / top-p masks, penalties, logprobs."""

from __future__ import annotations

import math

import torch

from fitserve.server.engine.sampling import (
    FILTER_CANDIDATES,
    _filter_sorted,
    apply_logit_bias,
    apply_penalties,
    apply_top_k_top_p,
    draw_tokens,
    make_generator,
    sample,
    sample_sequences,
)
from fitserve.server.engine.types import GREEDY_TEMPERATURE, SampledToken, SampleFailure, SamplingParams

VOCAB = 50


def logits_batch(rows: int = 4, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=gen) * 3


def test_greedy_is_argmax() -> None:
    logits = logits_batch()
    params = [SamplingParams(max_tokens=1, temperature=0)] * 4
    out = sample(logits, params, [()] * 4, [None] * 4)
    assert [s.token_id for s in out] == logits.argmax(-1).tolist()


def test_greedy_bf16_ties_take_the_first_index_like_argmax() -> None:
    # bf16 logits tie often; greedy must pick what `argmax` (and `model.generate`) picks: the first maximal index
    vocab = 49_152  # the default model's: long enough for the vectorised reduction paths
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    logits[0, [7, 300, 40_000]] = 50.0
    logits[1, [12_345, 2]] = 50.0
    logits[2, -1] = 50.0
    params = [SamplingParams(max_tokens=1, temperature=0)] * 3
    out = sample(logits, params, [()] * 3, [None] * 3)
    assert [s.token_id for s in out] == [7, 2, vocab - 1] == logits.argmax(-1).tolist()


def test_seed_makes_sampling_reproducible() -> None:
    logits = logits_batch(rows=1) / 3  # unit-scale logits: no token takes most of the mass
    params = [SamplingParams(max_tokens=1, temperature=1.0, seed=1234)]

    def draw(seed: int | None) -> list[int]:
        gen = make_generator(seed)
        return [sample(logits, params, [()], [gen])[0].token_id for _ in range(30)]

    assert draw(1234) == draw(1234)
    assert draw(1234) != draw(4321)
    assert len(set(draw(1234))) > 1  # it really samples


def test_draws_follow_the_probabilities_and_never_pick_a_zero() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0]).repeat(20_000, 1)
    gen = make_generator(7)
    counts = torch.bincount(draw_tokens(probs, [gen] * len(probs)), minlength=5) / len(probs)
    assert counts[4] == 0
    assert torch.allclose(counts[:4], torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.015), counts
    # rows need not be normalised: a row scaled by 3 draws the same way
    assert torch.equal(
        draw_tokens(probs[:50] * 3, [make_generator(1)] * 50), draw_tokens(probs[:50], [make_generator(1)] * 50)
    )


def test_a_rows_draw_depends_only_on_its_own_generator() -> None:
    """A seeded row draws the same token alone or beside other rows (and whatever those rows' generators are)."""
    probs = logits_batch(rows=3, seed=5).softmax(-1)
    alone = draw_tokens(probs[1:2], [make_generator(99)])
    beside = draw_tokens(probs, [make_generator(None), make_generator(99), make_generator(3)])
    assert beside[1] == alone[0]


def test_top_k_keeps_exactly_k_best() -> None:
    logits = logits_batch(rows=2)
    masked = apply_top_k_top_p(logits, torch.tensor([3, VOCAB]), torch.tensor([1.0, 1.0]))
    kept = torch.isfinite(masked)
    assert kept[0].sum() == 3
    assert set(kept[0].nonzero().flatten().tolist()) == set(logits[0].topk(3).indices.tolist())
    assert kept[1].all()
    assert torch.equal(masked[0][kept[0]], logits[0][kept[0]])


def test_top_p_keeps_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    masked = apply_top_k_top_p(logits, torch.tensor([4]), torch.tensor([0.7]))
    assert torch.isfinite(masked).tolist() == [[True, True, False, False]]
    masked = apply_top_k_top_p(logits, torch.tensor([4]), torch.tensor([0.1]))
    assert torch.isfinite(masked).tolist() == [[True, False, False, False]]  # always keeps the best token


def test_filtering_the_best_candidates_first_keeps_what_a_full_sort_keeps() -> None:
    """Rows whose top-k / nucleus ends among the first FILTER_CANDIDATES tokens (peaked logits, small k) and rows
    where it does not (flat logits, p near 1) both keep exactly the tokens the whole-vocabulary sort keeps."""
    vocab = 3 * FILTER_CANDIDATES
    gen = torch.Generator().manual_seed(11)
    scales = torch.tensor([6.0, 6.0, 0.05, 0.05, 1.0, 0.05])
    logits = torch.randn(len(scales), vocab, generator=gen) * scales.unsqueeze(1)
    top_k = torch.tensor([vocab, 40, vocab, vocab, 2 * FILTER_CANDIDATES, 2000])
    top_p = torch.tensor([0.9, 1.0, 0.95, 0.3, 0.999, 1.0])
    filtered = apply_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(filtered, _filter_sorted(logits, top_k, top_p))
    kept = torch.isfinite(filtered).sum(dim=-1)
    assert kept[1] == 40 and (kept[[2, 4, 5]] > FILTER_CANDIDATES).all()  # both paths ran


def test_sampling_respects_top_k() -> None:
    logits = logits_batch(rows=1, seed=3)
    params = [SamplingParams(max_tokens=1, temperature=2.0, top_k=2, seed=0)]
    gen = make_generator(0)
    allowed = set(logits[0].topk(2).indices.tolist())
    seen = {sample(logits, params, [()], [gen])[0].token_id for _ in range(50)}
    assert seen == allowed


def test_presence_and_frequency_penalties() -> None:
    logits = torch.zeros(2, VOCAB)
    apply_penalties(logits, [[5, 5, 7], [5]], presence=[0.5, 0.0], frequency=[1.0, 0.0])
    assert logits[0, 5].item() == -(2 * 1.0 + 0.5)
    assert logits[0, 7].item() == -(1.0 + 0.5)
    assert logits[0, 6].item() == 0.0
    assert torch.count_nonzero(logits[1]) == 0


def test_penalty_changes_greedy_choice() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 3] = 1.0
    logits[0, 4] = 0.9
    params = [SamplingParams(max_tokens=1, temperature=0, frequency_penalty=0.5)]
    assert sample(logits, params, [[3]], [None])[0].token_id == 4
    assert sample(logits, params, [[]], [None])[0].token_id == 3


def test_logprobs_and_top_alternatives() -> None:
    logits = logits_batch(rows=2)
    params = [SamplingParams(max_tokens=1, temperature=0, logprobs=3), SamplingParams(max_tokens=1, temperature=0)]
    a, b = sample(logits, params, [(), ()], [None, None])
    ref = logits[0].log_softmax(-1)
    assert a.token_id == int(ref.argmax())
    assert math.isclose(a.logprob, ref.max().item(), rel_tol=1e-6)
    assert [t for t, _ in a.top] == ref.topk(3).indices.tolist()
    assert all(math.isclose(lp, ref[t].item(), rel_tol=1e-6) for t, lp in a.top)
    assert b.logprob is None and b.top == ()


def test_mixed_batch_greedy_rows_stay_greedy() -> None:
    logits = logits_batch(rows=3)
    params = [
        SamplingParams(max_tokens=1, temperature=0),
        SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9, seed=1),
        SamplingParams(max_tokens=1, temperature=0),
    ]
    out = sample(logits, params, [()] * 3, [None, make_generator(1), None])
    assert out[0].token_id == int(logits[0].argmax()) and out[2].token_id == int(logits[2].argmax())


def test_temperature_below_epsilon_is_greedy_and_never_overflows() -> None:
    logits = logits_batch(rows=3)
    params = [SamplingParams(max_tokens=1, temperature=t) for t in (1e-300, GREEDY_TEMPERATURE / 2, 0.0)]
    out = sample(logits, params, [()] * 3, [None] * 3)
    assert [s.token_id for s in out] == logits.argmax(-1).tolist()  # type: ignore[union-attr]
    assert SamplingParams(max_tokens=1, temperature=GREEDY_TEMPERATURE).is_greedy is False


def test_non_finite_logits_fail_only_their_row() -> None:
    logits = logits_batch(rows=3)
    params = [
        SamplingParams(max_tokens=1, temperature=1.0, seed=1),
        SamplingParams(max_tokens=1, temperature=1.0, presence_penalty=1e308, frequency_penalty=-1e308),
        SamplingParams(max_tokens=1, temperature=0),
    ]
    gens = [make_generator(1), make_generator(2), None]
    out = sample(logits, params, [[], [1, 2], []], gens)
    assert isinstance(out[0], SampledToken) and isinstance(out[2], SampledToken)
    assert isinstance(out[1], SampleFailure) and "not finite" in out[1].reason
    assert out[2].token_id == int(logits[2].argmax())
    # a greedy row whose penalties overflow fails too instead of returning an arbitrary argmax
    greedy_nan = [SamplingParams(max_tokens=1, temperature=0, frequency_penalty=1e308)]
    assert isinstance(sample(logits[:1], greedy_nan, [[3, 3]], [None])[0], SampleFailure)


def test_any_integer_seed_makes_a_generator() -> None:
    for seed in (2**70, -(2**80), 2**64, -(2**63) - 1, 2**64 - 1):
        assert isinstance(make_generator(seed), torch.Generator)  # built without raising
    assert torch.equal(
        torch.rand(3, generator=make_generator(2**64 + 5)), torch.rand(3, generator=make_generator(5))
    )  # folded modulo 2**64


def test_logit_bias_forces_and_bans_tokens() -> None:
    logits = logits_batch(rows=2)
    best = int(logits[0].argmax())
    forced = [SamplingParams(max_tokens=1, temperature=1.0, seed=3, logit_bias=((7, 100.0),))]
    draws = {sample(logits[:1], forced, [()], [make_generator(s)])[0].token_id for s in range(20)}  # type: ignore[union-attr]
    assert draws == {7}
    banned = [SamplingParams(max_tokens=1, temperature=0, logit_bias=((best, -100.0),))]
    assert sample(logits[:1], banned, [()], [None])[0].token_id != best  # type: ignore[union-attr]
    biased = apply_logit_bias(logits.clone(), [((1, 2.5), (4, -1.0)), ()])
    assert torch.allclose(biased[0, [1, 4]], logits[0, [1, 4]] + torch.tensor([2.5, -1.0]))
    assert torch.equal(biased[1], logits[1])


class _Seq:
    """Just what `sample_sequences` reads of a scheduler Sequence."""

    def __init__(self, request_id: str, params: SamplingParams) -> None:
        self.request_id = request_id
        self.params = params
        self.token_ids = [1, 2]
        self.num_prompt_tokens = 2
        self.sampling_state = None


def test_sample_sequences_attributes_a_raising_row() -> None:
    logits = logits_batch(rows=3)
    seqs = [_Seq(f"r{i}", SamplingParams(max_tokens=1, temperature=0.0 if i != 1 else 0.9)) for i in range(3)]
    out = sample_sequences(logits, seqs, fault_request_ids=frozenset({"r1"}))  # type: ignore[arg-type]
    assert isinstance(out[1], SampleFailure)
    assert [out[0].token_id, out[2].token_id] == [int(logits[0].argmax()), int(logits[2].argmax())]  # type: ignore[union-attr]
    assert seqs[1].sampling_state is not None  # its generator was made (any seed works)
