"""`ReplicaEngineClient`: the `EngineClient` the ingress's FastAPI app talks to, forwarding to engine replicas.

Tokenisation runs here with the model's own tokenizer (the HTTP layer calls it synchronously); generation goes
through the Serve deployment handle, whose request router picks the replica. A replica that dies before it
streamed anything is retried on another; after the first output its failure ends the stream with a clean
`EngineUnavailableError` (the serving layer turns that into an OpenAI error).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fitserve.server.engine.types import EngineError, EngineUnavailableError, RequestOutput, SamplingParams
from fitserve.server.scaleout.errors import ReplicaEngineError
from fitserve.server.scaleout.request import ReplicaRequest

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a request that streamed nothing yet is retried when its replica died


class ReplicaEngineClient:
    """An EngineClient over a Ray Serve deployment handle to `EngineReplica`s."""

    def __init__(self, handle: Any, tokenizer: Any, model_name: str, max_model_len: int) -> None:
        self._handle = handle.options(stream=True)
        self._tokenizer = tokenizer
        self._model_name = model_name
        self._max_model_len = max_model_len

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
        """Stream outputs from the replica the router picks; retry on a dead replica before the first output."""
        request = ReplicaRequest(tuple(prompt_token_ids), params, request_id)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            response = self._handle.generate.remote(request)
            streamed = False
            try:
                async for output in response:
                    streamed = True
                    yield output
                return
            except EngineError:
                raise
            except Exception as error:
                engine_error = _engine_error(error)
                if engine_error is not None:
                    raise engine_error from error
                if streamed or attempt == MAX_ATTEMPTS or not _replica_gone(error):
                    logger.warning("request %s failed on its replica: %s", request_id, error)
                    raise EngineUnavailableError(
                        f"The replica serving this request failed: {type(error).__name__}"
                    ) from error
                logger.info("request %s: replica gone before the first token, retrying (%s)", request_id, error)
            finally:
                response.cancel()

    async def abort(self, request_id: str) -> None:
        """Aborts happen by cancelling the stream (the replica's generator then aborts the request)."""

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


def _engine_error(error: BaseException) -> EngineError | None:
    """The replica's own EngineError inside a Ray task error (queue full, prompt too long, ...), if any."""
    for candidate in (error, getattr(error, "cause", None)):
        if isinstance(candidate, ReplicaEngineError):
            return candidate.unwrap()
    return None


def _replica_gone(error: BaseException) -> bool:
    """True for the errors Ray raises when the replica's actor died or became unreachable."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(error, ActorDiedError | ActorUnavailableError | RayActorError)
