"""`/tokenize` and `/detokenize` against the served model's tokenizer, on the CPU pool (never the event loop)."""

from __future__ import annotations

from fitserve.server.engine.types import EngineClient
from fitserve.server.protocol.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from fitserve.server.serving.common import check_model, check_token_ids, detokenize_ids, render_chat, tokenize_text
from fitserve.server.serving.cpu_pool import CPUWorkPool


class TokenizeServing:
    """Tokenizer endpoints; they never touch the engine loop."""

    def __init__(self, engine: EngineClient, pool: CPUWorkPool) -> None:
        self._engine = engine
        self._pool = pool

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """Text (or chat messages through the template) to token ids."""
        check_model(self._engine, request.model)
        if request.messages is not None:
            messages = [message.to_template() for message in request.messages]
            tokens = await self._pool.run(
                render_chat, self._engine, messages, add_generation_prompt=request.add_generation_prompt
            )
        else:
            tokens = await self._pool.run(
                tokenize_text, self._engine, request.prompt or "", add_special_tokens=request.add_special_tokens
            )
        return TokenizeResponse(count=len(tokens), max_model_len=self._engine.max_model_len, tokens=tokens)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """Token ids to text."""
        check_model(self._engine, request.model)
        check_token_ids(self._engine, request.tokens, param="tokens")
        text = await self._pool.run(detokenize_ids, self._engine, request.tokens, "tokens")
        return DetokenizeResponse(prompt=text)
