"""Fan-out and sampling-field limits at the HTTP layer: prompts x n cap, whole-group admission, logit_bias, seed."""

from __future__ import annotations

import json
import threading

import pytest

from tests.fakes import FakeEngine
from tests.fakes.routes import MODEL, assert_openai_error, make_client

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def one_mib_of_token_prompts() -> bytes:
    """A body just under the default 1 MiB limit: `[[1],[1],...]` with n=16 (millions of choices before)."""
    head, tail = b'{"model": "fake-model", "n": 16, "prompt": [', b"]}"
    count = (1024 * 1024 - len(head) - len(tail)) // 4
    return head + b",".join([b"[1]"] * count) + tail


def test_prompts_times_n_over_the_cap_is_400_before_any_engine_request() -> None:
    engine = FakeEngine(model_name=MODEL)
    body = one_mib_of_token_prompts()
    assert len(body) <= 1024 * 1024
    response = make_client(engine).post(COMPLETIONS, content=body, headers={"content-type": "application/json"})
    error = assert_openai_error(response, 400)
    prompts = body.count(b"[1]")
    assert (
        f"{prompts} prompt(s) x n=16 = {prompts * 16} choices" in error["message"] and "at most 64" in error["message"]
    )
    assert error["param"] == "prompt"
    assert engine.submitted == [] and engine.running == set()


def test_the_cap_is_a_setting_and_applies_to_chat_n() -> None:
    engine = FakeEngine(model_name=MODEL)
    client = make_client(engine, max_choices_per_request=3)
    error = assert_openai_error(client.post(CHAT, json={"model": MODEL, "messages": USER, "n": 4}), 400)
    assert error["param"] == "n" and "n=4" in error["message"]
    ok = client.post(COMPLETIONS, json={"model": MODEL, "prompt": ["a", "b", "c"], "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 3
    assert engine.submitted and all(s.request_id for s in engine.submitted)


@pytest.mark.parametrize("endpoint", [COMPLETIONS, CHAT])
def test_a_group_that_does_not_fit_is_429_while_a_good_request_completes(endpoint: str) -> None:
    engine = FakeEngine(model_name=MODEL, max_running=3, token_delay_s=0.02, reply_words=8)
    client = make_client(engine)
    good: dict[str, object] = {}

    def run_good() -> None:
        good["response"] = client.post(COMPLETIONS, json={"model": MODEL, "prompt": "x", "max_tokens": 8})

    thread = threading.Thread(target=run_good)
    thread.start()
    for _ in range(500):  # bounded: wait until the good request is running
        if engine.running:
            break
        threading.Event().wait(0.005)
    assert engine.running
    body = {"model": MODEL, "n": 3, "max_tokens": 2}
    body |= {"prompt": "y"} if endpoint == COMPLETIONS else {"messages": USER}
    refused = client.post(endpoint, json=body)
    assert_openai_error(refused, 429, "queue_full")
    assert refused.headers["retry-after"] == "2"
    assert len(engine.submitted) == 1  # only the good request: no choice of the refused group was admitted
    thread.join(timeout=30)
    response = good["response"]
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    assert response.json()["choices"][0]["finish_reason"] == "length"  # type: ignore[attr-defined]


@pytest.mark.parametrize("endpoint", [COMPLETIONS, CHAT])
def test_logit_bias_is_passed_to_the_engine_and_validated(endpoint: str) -> None:
    engine = FakeEngine(model_name=MODEL)
    client = make_client(engine)
    base: dict[str, object] = {"model": MODEL, "max_tokens": 2}
    base |= {"prompt": "x"} if endpoint == COMPLETIONS else {"messages": USER}
    ok = client.post(endpoint, json=base | {"logit_bias": {"5": 100, "07": -100.0}})
    assert ok.status_code == 200, ok.text
    assert engine.submitted[-1].params.logit_bias == ((5, 100.0), (7, -100.0))
    for bad in ({"256": 1}, {"-1": 1}, {"x": 1}, {"5": 100.5}, {"5": -101}):
        error = assert_openai_error(client.post(endpoint, json=base | {"logit_bias": bad}), 400)
        assert error["param"] == "logit_bias", (bad, error)


def test_seed_must_be_a_64_bit_integer() -> None:
    engine = FakeEngine(model_name=MODEL)
    client = make_client(engine)
    for seed in (2**63, -(2**63) - 1, 1180591620717411303424):
        body = json.dumps({"model": MODEL, "prompt": "x", "seed": seed})
        response = client.post(COMPLETIONS, content=body, headers={"content-type": "application/json"})
        assert assert_openai_error(response, 400)["param"] == "seed"
    for seed in (2**63 - 1, -(2**63)):
        assert client.post(COMPLETIONS, json={"model": MODEL, "prompt": "x", "seed": seed}).status_code == 200
    assert len(engine.submitted) == 2
