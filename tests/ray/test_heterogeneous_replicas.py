"""Replicas of unequal KV capacity for real: `fitserve serve --replica-budgets ... --replica-max-kv-tokens ...`.

Two CPU replicas of the tiny test model, each planning within its own budget (by Serve replica rank) with KV
capacities 1:3; a saturating burst (twice what both hold, so both run full and queue) is served in that ratio,
counted by each replica's own `fitserve_requests_total`, with no 5xx. Runs in the `ray` venv (`make test-ray`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.ray.helpers import API_KEY, ScaleOutServer, scale_out_server, wait_for

MODEL = "tiny-llama"
BUDGETS = ("800MiB", "1GiB")
KV_TOKENS = (512, 1536)  # 1:3
MAX_TOKENS = 48  # with the short prompts, at most 64 KV tokens (4 blocks) a request
BURST = 2 * sum(KV_TOKENS) // 64  # twice what both replicas hold at once: both run full and queue


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[ScaleOutServer]:
    args = ["--model", str(tiny_model_dir), "--served-model-name", MODEL, "--api-key", API_KEY]
    args += ["--replica-budgets", ",".join(BUDGETS), "--replica-max-kv-tokens", ",".join(map(str, KV_TOKENS))]
    args += ["--max-model-len", "256", "--max-batch-size", "32"]
    with scale_out_server(args) as running:
        print(f"\nfitserve serve --replica-budgets (tiny model, 2 replicas): ready after {running.ready_after_s:.1f} s")
        yield running


def replica_metrics(server: ScaleOutServer) -> dict[str, dict[str, float]]:
    """Each live replica's own series (scraped from its metrics target), keyed by its Serve rank."""
    found: dict[str, dict[str, float]] = {}
    for entry in httpx.get(f"{server.url}/metrics/targets", timeout=10).json():
        text = httpx.get(f"http://{entry['targets'][0]}/metrics", timeout=10).text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "fitserve_requests_total":
                    values[f"requests_{sample.labels['status']}"] = sample.value
                elif sample.name in ("fitserve_kv_cache_capacity_tokens", "fitserve_memory_budget_bytes"):
                    values[sample.name] = sample.value
        found[entry["labels"]["rank"]] = values
    return found


def served(metrics: dict[str, float]) -> float:
    return sum(value for name, value in metrics.items() if name.startswith("requests_"))


def test_each_replica_plans_within_its_own_budget(server: ScaleOutServer) -> None:
    metrics = wait_for(lambda: (found := replica_metrics(server)) and len(found) == 2 and found, 60, "both replicas")
    assert metrics["0"]["fitserve_kv_cache_capacity_tokens"] == KV_TOKENS[0]
    assert metrics["1"]["fitserve_kv_cache_capacity_tokens"] == KV_TOKENS[1]
    assert metrics["0"]["fitserve_memory_budget_bytes"] == 800 * 2**20
    assert metrics["1"]["fitserve_memory_budget_bytes"] == 2**30


def test_a_saturating_burst_is_served_in_the_capacity_ratio_with_no_5xx(server: ScaleOutServer) -> None:
    before = replica_metrics(server)

    async def burst() -> list[int]:
        api = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=180)

        async def one(i: int) -> int:
            try:
                await api.completions.create(
                    model=MODEL, prompt=f"Item {i}:", max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True}
                )
                return 200
            except openai.APIStatusError as error:
                return error.status_code

        return await asyncio.gather(*(one(i) for i in range(BURST)))

    statuses = asyncio.run(burst())
    assert statuses.count(200) == BURST, sorted(statuses)  # no 5xx, nothing refused
    after = replica_metrics(server)
    small, big = (served(after[rank]) - served(before[rank]) for rank in ("0", "1"))
    print(f"\nburst of {BURST} over KV capacities {KV_TOKENS}: served {small:.0f} / {big:.0f}")
    assert small + big == BURST
    assert 3 * 0.9 <= big / small <= 3 * 1.1, (small, big)
