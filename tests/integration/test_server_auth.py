"""Acceptance: `--api-key` guards every /v1 route; health probes stay open."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.live_server import live_server

pytestmark = pytest.mark.integration


def test_api_key_from_flag_and_environment(default_model_dir: Path) -> None:
    args = [
        "--model",
        str(default_model_dir),
        "--max-model-len",
        "256",
        "--max-kv-tokens",
        "4096",
        "--served-model-name",
        "smol",
    ]
    with live_server(args, env={"FITSERVE_API_KEY": "from-env"}) as base_url:
        anonymous = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            anonymous.models.list()
        assert caught.value.body["code"] == "invalid_api_key"  # type: ignore[index]
        with httpx.Client(base_url=base_url) as http:
            assert http.post("/v1/chat/completions", json={}).status_code == 401
            assert http.get("/health").status_code == 200
        keyed = openai.OpenAI(base_url=f"{base_url}/v1", api_key="from-env", max_retries=0)
        reply = keyed.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")
