"""`ReplicaEngineClient`: the `EngineClient` the ingress's FastAPI app talks to, forwarding to engine replicas.

Tokenisation runs here with the model's own tokenizer (the HTTP layer calls it synchronously); generation goes
through the Serve deployment handle, whose request router picks the replica: the choices of one HTTP request go
to one replica as a group (`group_call.py`: admission, retries on a dead replica, one stream per choice).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

from fitserve.server.engine.types import GenerationRequest, RequestOutput, SamplingParams
from fitserve.server.scaleout.group_call import GroupCall
from fitserve.server.scaleout.request import ReplicaRequest


class ReplicaEngineClient:
    """An EngineClient over a Ray Serve deployment handle to `EngineReplica`s."""

    def __init__(self, handle: Any, tokenizer: Any, model_name: str, max_model_len: int) -> None:
        self._handle = handle.options(stream=True)
        self._tokenizer = tokenizer
        self._model_name = model_name
        self._max_model_len = max_model_len
        self._calls: weakref.WeakValueDictionary[str, GroupCall] = weakref.WeakValueDictionary()  # live ones

    @property
    def model_name(self) -> str:
        """The served model name."""
        return self._model_name

    @property
    def max_model_len(self) -> int:
        """The replicas' context length."""
        return self._max_model_len

    @property
    def is_ready(self) -> bool:
        """The ingress is built once a replica answered `info()`."""
        return True

    async def generate(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs from the replica the router picks (a group of one)."""
        (stream,) = await self._start([GenerationRequest(prompt_token_ids, params, request_id)])
        async with contextlib.aclosing(stream):
            async for output in stream:
                yield output

    async def generate_group(self, requests: Sequence[GenerationRequest]) -> list[AsyncIterator[RequestOutput]]:
        """Send the requests to one replica, which admits all or none (else raises its error); one stream each."""
        return list(await self._start(requests))

    async def _start(self, requests: Sequence[GenerationRequest]) -> list[AsyncGenerator[RequestOutput]]:
        call = GroupCall(self._handle, ReplicaRequest(tuple(requests)))
        await call.admit()
        for request_id in call.request_ids:
            self._calls[request_id] = call
        return call.streams()

    async def abort(self, request_id: str) -> None:
        """Release the request's stream; the replica aborts the group's call once none of its streams is left."""
        call = self._calls.get(request_id)
        if call is not None:
            call.release(call.request_ids.index(request_id))

    async def check_health(self) -> None:
        """Healthy while the deployment is reachable; Serve itself replaces dead replicas."""

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text to token ids."""
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Token ids to text."""
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=False))

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Messages to prompt token ids with the model's chat template."""
        encoded = self._tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])
