"""`fitserve serve --replicas 1 --max-replicas 2` for real: a local loopback Ray, CPU engine replicas of the tiny
test model, the official `openai` client through one port, autoscaling up under KV pressure and down when idle,
the memory-aware router splitting a burst, a replica killed mid-load, a real Prometheus scraping both replicas,
and a SIGTERM that leaves no Ray process behind.

Runs in the `ray` venv (`make test-ray`). The tests share one server and run in file order; the last one
stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.prometheus_process import start_prometheus
from tests.ray.helpers import API_KEY, ScaleOutServer, scale_out_server, wait_for

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[ScaleOutServer]:
    args = ["--replicas", "1", "--max-replicas", "2", "--model", str(tiny_model_dir), "--served-model-name", MODEL]
    args += ["--memory-budget", "1GiB", "--max-kv-tokens", "4096", "--max-batch-size", "8", "--api-key", API_KEY]
    with scale_out_server(args) as running:
        print(f"\nfitserve serve --replicas 1 --max-replicas 2 (tiny model): ready after {running.ready_after_s:.1f} s")
        yield running


def client(server: ScaleOutServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def router_decisions(server: ScaleOutServer) -> dict[str, float]:
    """fitserve_router_decisions_total summed per replica, from the ingress's /metrics."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text):
        if family.name == "fitserve_router_decisions":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    replica = sample.labels["replica"]
                    totals[replica] = totals.get(replica, 0.0) + sample.value
    return totals


def router_idle(server: ScaleOutServer) -> bool:
    """True when the router counts no request in flight on any replica."""
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text):
        if family.name == "fitserve_router_in_flight_requests":
            return all(sample.value == 0 for sample in family.samples)
    return True


def targets(server: ScaleOutServer) -> list[dict]:
    return httpx.get(f"{server.url}/metrics/targets", timeout=10).json()


def test_local_ray_binds_loopback_only() -> None:
    """The launcher's local Ray registers its node on 127.0.0.1 (traffic to other addresses is not allowed here)."""
    code = (
        "from fitserve.server.scaleout.launch import start_local_ray\n"
        "start_local_ray()\n"
        "import ray\n"
        "print('NODE', ray.nodes()[0]['NodeManagerAddress'])\n"
        "ray.shutdown()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "NODE 127.0.0.1" in result.stdout, result.stdout + result.stderr[-3000:]


def test_openai_client_through_one_port(server: ScaleOutServer) -> None:
    api = client(server)
    chat = api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content and chat.usage is not None and chat.usage.completion_tokens > 0
    chunks = list(api.completions.create(model=MODEL, prompt="Once upon", max_tokens=6, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert [model.id for model in api.models.list().data] == [MODEL]
    # the choices of one request go to one replica as a group (admitted together, one stream each)
    choices = api.completions.create(model=MODEL, prompt="Twice", max_tokens=5, n=2, seed=1).choices
    assert sorted(choice.index for choice in choices) == [0, 1] and all(c.finish_reason for c in choices)
    # every replica's metrics target is on loopback
    assert all(address.startswith("127.0.0.1:") for entry in targets(server) for address in entry["targets"])


def test_errors_and_auth_are_the_same_as_fitserve_serve(server: ScaleOutServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as raised:
        client(server).completions.create(model=MODEL, prompt="Hi", max_tokens=100_000)
    assert raised.value.status_code == 400
    body = httpx.post(
        f"{server.url}/v1/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 3000},
        timeout=30,
    )
    assert body.status_code == 400 and body.json()["error"]["code"] == "context_length_exceeded"


def autoscaler_events(server: ScaleOutServer) -> dict[str, float]:
    """fitserve_autoscaler_scale_events_total by direction, from the ingress's /metrics."""
    events: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text):
        if family.name == "fitserve_autoscaler_scale_events":
            for sample in family.samples:
                events[sample.labels["direction"]] = sample.value
    return events


async def keep_busy(server: ScaleOutServer, concurrency: int, until: Callable[[], bool], limit_s: float) -> tuple:
    """`concurrency` clients sending long requests back to back until `until()` (polled every 0.5 s) or `limit_s`.

    Returns (seconds until `until()` held, or None; 5xx responses seen). Requests still running are cancelled.
    """
    api = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    started = time.monotonic()
    server_errors = 0

    async def worker(i: int) -> None:
        nonlocal server_errors
        while True:
            try:
                await api.completions.create(
                    model=MODEL, prompt=f"Chapter {i}:", max_tokens=500, extra_body={"ignore_eos": True}
                )
            except openai.APIStatusError as error:
                server_errors += error.status_code >= 500

    workers = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    held_after_s = None
    try:
        while time.monotonic() - started < limit_s:
            if await asyncio.to_thread(until):
                held_after_s = time.monotonic() - started
                break
            await asyncio.sleep(0.5)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return held_after_s, server_errors


def test_a_second_replica_starts_under_kv_pressure_without_flapping(server: ScaleOutServer) -> None:
    """12 clients on one replica (8 run, the rest queue): the autoscaler adds one replica, and only one."""
    assert len(targets(server)) == 1
    scaled_after_s, errors = asyncio.run(keep_busy(server, 12, lambda: len(targets(server)) == 2, limit_s=120))
    print(f"\nsecond replica registered {scaled_after_s} s after the load began")
    assert scaled_after_s is not None and errors == 0
    _, errors = asyncio.run(keep_busy(server, 12, lambda: False, limit_s=12))  # steady load at max: no new event
    assert errors == 0
    assert autoscaler_events(server) == {"up": 1.0, "down": 0.0}


def test_a_burst_of_long_requests_is_split_over_both_replicas(server: ScaleOutServer) -> None:
    """Eight simultaneous long requests with equal stats: no replica gets more than 5 (router decisions)."""
    wait_for(lambda: len(targets(server)) == 2 and router_idle(server), 60, "both replicas idle in the router's view")
    time.sleep(3.0)  # a few routing-stats periods: both replicas' stats now show the idle state
    before = router_decisions(server)

    async def burst() -> None:
        api = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        await asyncio.gather(
            *(
                api.completions.create(
                    model=MODEL, prompt=f"Story {i}:", max_tokens=400, extra_body={"ignore_eos": True}
                )
                for i in range(8)
            )
        )

    asyncio.run(burst())
    after = router_decisions(server)
    split = sorted(after.get(replica, 0) - before.get(replica, 0) for replica in after)
    gauges = [line for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines() if "router_" in line]
    assert sum(split) == 8 and len(split) == 2 and split[0] >= 3, (before, after, gauges)


def test_prometheus_scrapes_both_replicas_with_distinct_labels(
    server: ScaleOutServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A real Prometheus, given the ingress's http_sd endpoint, scrapes each replica's ledger under its own label
    within 30 s of its start.

    It runs while both replicas are up (right after the burst), with steady load: an idle replica is removed after
    the downscale delay, and when this test ran after the replica kill, the pair had sat idle long enough for the
    autoscaler to remove one before Prometheus had scraped both (once in CI). The load keeps both wanted.
    """
    workdir = tmp_path_factory.mktemp("prometheus-ray")
    config = {
        "global": {"scrape_interval": "2s", "scrape_timeout": "2s"},  # replicas answer /metrics under load
        "scrape_configs": [
            {
                "job_name": "fitserve-replicas",
                "http_sd_configs": [{"url": f"{server.url}/metrics/targets", "refresh_interval": "2s"}],
            },
            {"job_name": "fitserve-ingress", "static_configs": [{"targets": [server.url.removeprefix("http://")]}]},
        ],
    }
    url, process, log_path = start_prometheus(workdir, config)
    seen: set[str] = set()

    def query(expression: str) -> list[dict]:
        try:
            result = httpx.get(f"{url}/api/v1/query", params={"query": expression}, timeout=5)
        except httpx.HTTPError:  # Prometheus still starting
            return []
        return result.json()["data"]["result"] if result.status_code == 200 else []

    def both_replicas_seen() -> bool:
        labels = {series["metric"].get("replica") for series in query("fitserve_memory_budget_bytes")}
        if len(labels) == 2 and None not in labels:
            seen.update(labels)  # type: ignore[arg-type]
        return bool(seen)

    try:
        seen_after_s, errors = asyncio.run(keep_busy(server, 20, both_replicas_seen, limit_s=30))
        diagnosis = (targets(server), autoscaler_events(server), query("up"))
        assert seen_after_s is not None, f"Prometheus never saw both replicas at once: {diagnosis}"
        assert errors == 0
        print(f"\nPrometheus saw both replicas {sorted(seen)} {seen_after_s:.1f} s after it started")
        # the ingress is its own scrape target: its first scrape may come after the replicas'
        wait_for(lambda: query("fitserve_router_decisions_total"), 30, "router decisions to reach Prometheus")
    except BaseException:
        print(log_path.read_text()[-3000:])
        raise
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_killing_a_replica_mid_load_fails_only_its_requests_and_ray_replaces_it(server: ScaleOutServer) -> None:
    replicas = server.processes_named("ServeReplica:fitserve:EngineReplica")
    assert len(replicas) == 2, replicas
    victim = replicas[0]
    old_names = {entry["labels"]["replica"] for entry in targets(server)}

    async def one(api: openai.AsyncOpenAI, i: int) -> str:
        try:
            stream = await api.completions.create(
                model=MODEL, prompt=f"Tale {i}:", max_tokens=300, stream=True, extra_body={"ignore_eos": True}
            )
            async for _ in stream:
                pass
            return "ok"
        except openai.APIStatusError as error:  # a clean OpenAI error before the stream began
            assert error.status_code in (429, 503), error
            return f"error {error.status_code}"
        except openai.APIError as error:  # an error event inside the stream after it began
            return f"stream error: {error.message}"

    async def load() -> list[str]:
        api = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        tasks = [asyncio.create_task(one(api, i)) for i in range(8)]
        await asyncio.sleep(2.0)
        victim.kill()
        killed.append(time.monotonic())
        return await asyncio.gather(*tasks)

    killed: list[float] = []
    outcomes = asyncio.run(load())
    print(f"\noutcomes with a replica killed mid-load: {outcomes}")
    assert outcomes.count("ok") >= 1  # the other replica's requests finished
    killed_at = killed[0]

    def replaced() -> bool:
        names = {entry["labels"]["replica"] for entry in targets(server)}
        return len(names) == 2 and bool(names - old_names)

    wait_for(replaced, 60, "Ray to replace the killed replica")
    new_name = ({entry["labels"]["replica"] for entry in targets(server)} - old_names).pop()

    def new_replica_serves() -> bool:
        client(server).completions.create(model=MODEL, prompt="Again", max_tokens=4)
        return router_decisions(server).get(new_name, 0) > 0

    wait_for(new_replica_serves, max(1.0, 60 - (time.monotonic() - killed_at)), "the new replica to serve")
    print(f"replacement serving {time.monotonic() - killed_at:.1f} s after the kill")
    server.remember_descendants()


def test_an_idle_replica_is_removed(server: ScaleOutServer) -> None:
    idle_since = time.monotonic()
    wait_for(lambda: len(targets(server)) == 1, 90, "the autoscaler to remove the idle replica")
    print(f"\nidle replica gone {time.monotonic() - idle_since:.1f} s after the last request")
    events = autoscaler_events(server)
    # every replica the autoscaler added it removed again once idle (one up/down pair unless a load re-added one)
    assert events["down"] >= 1 and events["up"] == events["down"], events


def test_sigterm_stops_everything_with_no_stray_ray_process(server: ScaleOutServer) -> None:
    server.remember_descendants()
    rss = 0
    for pid in [server.process.pid, *server.descendants]:
        with contextlib.suppress(psutil.Error):
            rss += psutil.Process(pid).memory_info().rss
    print(f"\ntotal RSS of the server and every process it started: {rss / 2**20:.0f} MiB")
    server.process.terminate()
    assert server.process.wait(timeout=90) == 0, server.log_tail()
    wait_for(
        lambda: (
            not [
                pid
                for pid in server.descendants
                if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            ]
        ),
        30,
        "every Ray process to exit",
    )
