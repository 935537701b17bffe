"""`/v1/chat/completions`: messages -> chat template -> engine requests -> a chat response or SSE chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fitserve.server.protocol.chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    Delta,
)
from fitserve.server.protocol.common import Usage, finish_reason_name, new_id, now_s
from fitserve.server.protocol.errors import APIError
from fitserve.server.serving.common import ChoiceAccumulator, GenerationServing, render_chat
from fitserve.server.serving.generation import ChoiceGeneration, ChoiceRequest
from fitserve.server.serving.logprobs import to_chat_logprobs
from fitserve.server.serving.transport import SSE_DONE, SSEResponse, run_until_disconnect, sse_data, sse_error


class ChatServing(GenerationServing):
    """Serves the chat completions endpoint against an `EngineClient`."""

    async def create(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        """Handle one request: JSON body, or an SSE stream when `stream` is true."""
        self.check_request(request, num_prompts=1)
        prompt_ids = await self._pool.run(render_chat, self._engine, request.template_messages())
        if not prompt_ids:
            raise APIError.invalid("the chat template produced an empty prompt", param="messages")
        response_id = new_id("chatcmpl")
        default_max_tokens = self._engine.max_model_len - len(prompt_ids)
        choices = [
            ChoiceRequest(
                index=i,
                prompt_token_ids=prompt_ids,
                params=request.to_params(default_max_tokens, seed_offset=i),
                request_id=f"{response_id}-{i}",
            )
            for i in range(request.n)
        ]
        generation = ChoiceGeneration(self._engine, choices, prompt_param="messages")
        if request.stream:
            await run_until_disconnect(raw_request, generation.start())
            return SSEResponse(self._stream(request, generation, response_id, len(prompt_ids)))
        body = await run_until_disconnect(raw_request, self._collect(request, generation, response_id, len(prompt_ids)))
        return JSONResponse(body.model_dump(mode="json"))

    async def _collect(
        self, request: ChatCompletionRequest, generation: ChoiceGeneration, response_id: str, prompt_tokens: int
    ) -> ChatCompletionResponse:
        accumulators = {i: ChoiceAccumulator() for i in range(request.n)}
        try:
            await generation.start()
            async for index, output in generation:
                accumulators[index].add(output)
        finally:
            generation.close()
        choices = [
            ChatChoice(
                index=index,
                message=AssistantMessage(content=acc.text),
                logprobs=to_chat_logprobs(acc.logprobs) if request.logprobs else None,
                finish_reason=finish_reason_name(acc.finish_reason),
            )
            for index, acc in sorted(accumulators.items())
        ]
        completion_tokens = sum(acc.completion_tokens for acc in accumulators.values())
        return ChatCompletionResponse(
            id=response_id,
            created=now_s(),
            model=self._engine.model_name,
            choices=choices,
            usage=Usage.of(prompt_tokens, completion_tokens),
        )

    async def _stream(
        self, request: ChatCompletionRequest, generation: ChoiceGeneration, response_id: str, prompt_tokens: int
    ) -> AsyncIterator[str]:
        created = now_s()
        model = self._engine.model_name

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            body = ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices, usage=usage)
            return sse_data(body.to_json())

        completion_tokens: dict[int, int] = {}
        try:
            for index in range(request.n):
                yield chunk([ChunkChoice(index=index, delta=Delta(role="assistant", content=""))])
            async for index, output in generation:
                completion_tokens[index] = output.completion_tokens
                if output.text_delta or output.logprobs_delta:
                    logprobs = to_chat_logprobs(output.logprobs_delta or ()) if request.logprobs else None
                    yield chunk([ChunkChoice(index=index, delta=Delta(content=output.text_delta), logprobs=logprobs)])
                if output.finished:
                    reason = finish_reason_name(output.finish_reason)
                    yield chunk([ChunkChoice(index=index, delta=Delta(), finish_reason=reason)])
            if request.include_usage:
                yield chunk([], Usage.of(prompt_tokens, sum(completion_tokens.values())))
        except APIError as error:
            yield sse_error(error)
        finally:
            generation.close()
        yield SSE_DONE
