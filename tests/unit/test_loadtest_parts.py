"""Workload, percentiles, /metrics parsing and the level verdict (pure, no HTTP)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from fitserve.loadtest.scrape import MetricsSample, parse_metrics, summarize_samples
from fitserve.loadtest.stats import percentile, summarize
from fitserve.loadtest.verdict import FailureReason, LevelEvidence, Objectives, judge
from fitserve.loadtest.workload import Endpoint, LengthSpec, Workload, builtin_prompt, load_dataset


def test_length_spec_parses_fixed_and_ranges() -> None:
    assert LengthSpec.parse("64") == LengthSpec(64, 64)
    spec = LengthSpec.parse("8:12")
    rng = random.Random(1)
    assert {spec.draw(rng) for _ in range(200)} == {8, 9, 10, 11, 12}
    for bad in ("0", "12:8", "x", "1:2:3", "-3"):
        with pytest.raises(ValueError):
            LengthSpec.parse(bad)


def test_workload_is_deterministic_per_index_and_seed() -> None:
    w1 = Workload(max_tokens=LengthSpec(4, 64), prompt_words=LengthSpec(10, 200), seed=7)
    w2 = Workload(max_tokens=LengthSpec(4, 64), prompt_words=LengthSpec(10, 200), seed=7)
    assert [w1.item(i) for i in (5, 0, 3)] == [w2.item(i) for i in (5, 0, 3)]
    other = Workload(max_tokens=LengthSpec(4, 64), prompt_words=LengthSpec(10, 200), seed=8)
    assert [w1.item(i).max_tokens for i in range(20)] != [other.item(i).max_tokens for i in range(20)]
    lengths = {len(w1.item(i).prompt.as_text().split()) for i in range(30)}
    assert min(lengths) >= 10 and max(lengths) <= 200 and len(lengths) > 5


def test_builtin_prompt_length_and_question() -> None:
    prompt = builtin_prompt(0, 100).as_text()
    assert len(prompt.split()) == 100
    assert prompt.endswith("What is the capital of France?")


def test_request_bodies_for_both_endpoints() -> None:
    item = Workload(max_tokens=LengthSpec(9, 9), prompt_words=LengthSpec(5, 5)).item(1)
    chat = item.body(Endpoint.CHAT, "m", stream=True, extra={"temperature": 0.0})
    assert chat["messages"][0]["role"] == "user" and chat["max_tokens"] == 9
    assert chat["stream_options"] == {"include_usage": True} and chat["temperature"] == 0.0
    plain = item.body(Endpoint.COMPLETIONS, "m", stream=False)
    assert isinstance(plain["prompt"], str) and "stream_options" not in plain and "messages" not in plain


def test_dataset_lines_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "d.jsonl"
    good.write_text(
        json.dumps("just text")
        + "\n\n"
        + json.dumps({"prompt": "p", "max_tokens": 3})
        + "\n"
        + json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]})
        + "\n"
    )
    prompts = load_dataset(good)
    assert len(prompts) == 3
    w = Workload(max_tokens=LengthSpec(50, 50), dataset=prompts)
    assert w.item(1).max_tokens == 3 and w.item(0).max_tokens == 50
    assert w.item(5).prompt.as_messages()[0] == {"role": "system", "content": "s"}  # 5 mod 3 == 2
    assert w.item(2).prompt.as_text().endswith("assistant:")
    assert w.max_request_tokens(10) == 60
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps("ok") + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_dataset(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_dataset(tmp_path / "empty.jsonl")


def test_percentiles_interpolate() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0
    s = summarize([float(x) for x in range(1, 101)])
    assert s.count == 100 and s.p50 == pytest.approx(50.5) and s.p99 == pytest.approx(99.01) and s.max == 100.0
    assert summarize([]).p50 is None


EXPOSITION = """\
# HELP fitserve_memory_budget_bytes Memory budget.
# TYPE fitserve_memory_budget_bytes gauge
fitserve_memory_budget_bytes{device="cuda:0"} 1000.0
fitserve_memory_budget_bytes{device="cuda:1"} 500.0
# TYPE fitserve_kv_cache_capacity_tokens gauge
fitserve_kv_cache_capacity_tokens 4096.0
# TYPE fitserve_kv_cache_usage_ratio gauge
fitserve_kv_cache_usage_ratio 0.25
# TYPE fitserve_oom_events_total counter
fitserve_oom_events_total 3.0
fitserve_oom_events_created 1.7e9
# TYPE fitserve_engine_current_max_batch_size gauge
fitserve_engine_current_max_batch_size 8.0
# TYPE fitserve_batch_size histogram
fitserve_batch_size_bucket{le="1.0"} 2.0
fitserve_batch_size_count 2.0
fitserve_batch_size_sum 2.0
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.0
"""


def test_parse_metrics_reads_fitserve_series() -> None:
    s = parse_metrics(EXPOSITION, t_s=0.0)
    assert s is not None
    assert s.memory_budget_bytes == 1500.0  # summed over devices
    assert s.kv_capacity_tokens == 4096.0 and s.kv_usage_ratio == 0.25
    assert s.oom_events_total == 3.0  # counter sample keeps its _total name; _created is ignored
    assert s.max_batch_size == 8.0  # the gauge, not the histogram
    assert s.requests_waiting is None and s.preemptions_total is None
    assert parse_metrics("# TYPE other gauge\nother 1\n") is None


def test_summarize_samples_peaks_deltas_and_waiting_window() -> None:
    before = MetricsSample(t_s=0, oom_events_total=1, preemptions_total=0, requests_waiting=0, kv_capacity_tokens=100)
    during = [
        MetricsSample(
            t_s=1,
            device_memory_used_bytes=10,
            kv_usage_ratio=0.5,
            requests_running=2,
            requests_waiting=0,
            kv_capacity_tokens=100,
            kv_used_tokens=50,
            kv_reserved_tokens=60,
        ),
        MetricsSample(
            t_s=2,
            device_memory_used_bytes=30,
            kv_usage_ratio=0.9,
            requests_running=4,
            requests_waiting=3,
            kv_capacity_tokens=100,
            kv_used_tokens=90,
            kv_reserved_tokens=95,
        ),
    ]
    after = MetricsSample(t_s=3, oom_events_total=1, preemptions_total=2, requests_waiting=0, kv_capacity_tokens=100)
    m = summarize_samples(before, during, after)
    assert m.samples == 4 and m.peak_memory_used_bytes == 30 and m.peak_running == 4 and m.peak_waiting == 3
    assert m.oom_events_delta == 0 and m.preemptions_delta == 2
    assert m.peak_kv_usage_ratio_while_waiting == 0.9 and m.min_kv_free_tokens_while_waiting == 5


def _evidence(metrics=None, failures=None, concurrency=4, request_tokens=30, ttft=(0.1,)) -> LevelEvidence:
    return LevelEvidence(
        concurrency, failures or {}, summarize(list(ttft)), summarize([0.01]), summarize([1.0]), metrics, request_tokens
    )


def test_judge_classifies_errors() -> None:
    reasons = {
        f.reason
        for f in judge(_evidence(failures={"429": 2, "503": 1, "400": 1, "connection": 1, "timeout": 3}), Objectives())
    }
    assert reasons == {
        FailureReason.HTTP_429,
        FailureReason.HTTP_5XX,
        FailureReason.HTTP_4XX,
        FailureReason.CONNECTION,
        FailureReason.TIMEOUT,
    }
    assert judge(_evidence(), Objectives()) == []


def test_judge_kv_saturation_beats_queueing_and_respects_allow_queueing() -> None:
    full = summarize_samples(
        MetricsSample(t_s=0, oom_events_total=0, preemptions_total=0),
        [
            MetricsSample(
                t_s=1,
                requests_running=2,
                requests_waiting=1,
                kv_capacity_tokens=100,
                kv_used_tokens=60,
                kv_reserved_tokens=80,
                kv_usage_ratio=0.6,
            )
        ],
        MetricsSample(t_s=2, oom_events_total=0, preemptions_total=0),
    )
    # 20 free tokens < 30 needed by one request: the cache is what keeps the waiting request out.
    assert [f.reason for f in judge(_evidence(full), Objectives())] == [FailureReason.KV_SATURATED]
    roomy = summarize_samples(
        None,
        [
            MetricsSample(
                t_s=1,
                requests_running=2,
                requests_waiting=1,
                kv_capacity_tokens=1000,
                kv_used_tokens=60,
                kv_usage_ratio=0.06,
            )
        ],
        None,
    )
    assert [f.reason for f in judge(_evidence(roomy), Objectives())] == [FailureReason.QUEUEING]
    assert judge(_evidence(roomy), Objectives(allow_queueing=True)) == []
    assert judge(_evidence(roomy, concurrency=2), Objectives()) == []  # all 2 ran: a transient wait is fine


def test_judge_objectives() -> None:
    slow = _evidence(ttft=(0.1,) * 90 + (2.0,) * 10)
    assert [f.reason for f in judge(slow, Objectives(ttft_p95_s=1.0))] == [FailureReason.SLO_TTFT]
    assert judge(slow, Objectives(ttft_p95_s=3.0, itl_p95_s=0.02, e2e_p95_s=1.5)) == []
    assert [f.reason for f in judge(slow, Objectives(itl_p95_s=0.005, e2e_p95_s=0.5))] == [
        FailureReason.SLO_ITL,
        FailureReason.SLO_E2E,
    ]
