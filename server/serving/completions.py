"""`/v1/completions`: prompts -> engine requests -> a `text_completion` response or SSE chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fitserve.server.protocol.common import Usage, finish_reason_name, new_id, now_s
from fitserve.server.protocol.completions import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
)
from fitserve.server.protocol.errors import APIError
from fitserve.server.serving.common import (
    ChoiceAccumulator,
    GenerationServing,
    check_token_ids,
    detokenize_ids,
    tokenize_text,
)
from fitserve.server.serving.generation import ChoiceGeneration, ChoiceRequest
from fitserve.server.serving.logprobs import to_completion_logprobs
from fitserve.server.serving.transport import SSE_DONE, SSEResponse, run_until_disconnect, sse_data, sse_error


class CompletionServing(GenerationServing):
    """Serves the legacy completions endpoint against an `EngineClient`."""

    async def create(self, request: CompletionRequest, raw_request: Request) -> Response:
        """Handle one request: JSON body, or an SSE stream when `stream` is true."""
        self.check_request(request, num_prompts=len(request.prompts()))
        prompt_ids, echo_texts = await self._pool.run(self._prepare_prompts, request)
        response_id = new_id("cmpl")
        choices = [
            ChoiceRequest(
                index=p * request.n + i,
                prompt_token_ids=ids,
                params=request.to_params(DEFAULT_COMPLETION_MAX_TOKENS, seed_offset=i),
                request_id=f"{response_id}-{p * request.n + i}",
            )
            for p, ids in enumerate(prompt_ids)
            for i in range(request.n)
        ]
        generation = ChoiceGeneration(self._engine, choices, prompt_param="prompt")
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        echo_by_choice = {choice.index: echo_texts[choice.index // request.n] for choice in choices}
        if request.stream:
            await run_until_disconnect(raw_request, generation.start())
            return SSEResponse(self._stream(request, generation, response_id, prompt_tokens, echo_by_choice))
        body = await run_until_disconnect(
            raw_request, self._collect(request, generation, response_id, prompt_tokens, echo_by_choice)
        )
        return JSONResponse(body.model_dump(mode="json"))

    def _prepare_prompts(self, request: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """Prompt token ids and, with `echo`, their texts (blocking: runs in the CPU pool)."""
        prompt_ids = self._prompt_token_ids(request)
        echo_texts = [detokenize_ids(self._engine, ids, "prompt") if request.echo else "" for ids in prompt_ids]
        return prompt_ids, echo_texts

    def _prompt_token_ids(self, request: CompletionRequest) -> list[list[int]]:
        prompts: list[list[int]] = []
        for prompt in request.prompts():
            if isinstance(prompt, str):
                ids = tokenize_text(self._engine, prompt)
            else:
                check_token_ids(self._engine, prompt, param="prompt")
                ids = list(prompt)
            if not ids:
                raise APIError.invalid("the prompt is empty after tokenization", param="prompt")
            prompts.append(ids)
        return prompts

    async def _collect(
        self,
        request: CompletionRequest,
        generation: ChoiceGeneration,
        response_id: str,
        prompt_tokens: int,
        echo_by_choice: dict[int, str],
    ) -> CompletionResponse:
        accumulators = {index: ChoiceAccumulator() for index in echo_by_choice}
        try:
            await generation.start()
            async for index, output in generation:
                accumulators[index].add(output)
        finally:
            generation.close()
        choices = []
        for index, acc in sorted(accumulators.items()):
            echo = echo_by_choice[index]
            logprobs = to_completion_logprobs(acc.logprobs, len(echo)) if request.logprobs is not None else None
            choices.append(
                CompletionChoice(
                    index=index,
                    text=echo + acc.text,
                    logprobs=logprobs,
                    finish_reason=finish_reason_name(acc.finish_reason),
                )
            )
        completion_tokens = sum(acc.completion_tokens for acc in accumulators.values())
        return CompletionResponse(
            id=response_id,
            created=now_s(),
            model=self._engine.model_name,
            choices=choices,
            usage=Usage.of(prompt_tokens, completion_tokens),
        )

    async def _stream(
        self,
        request: CompletionRequest,
        generation: ChoiceGeneration,
        response_id: str,
        prompt_tokens: int,
        echo_by_choice: dict[int, str],
    ) -> AsyncIterator[str]:
        created = now_s()
        model = self._engine.model_name
        completion_tokens: dict[int, int] = {}
        offsets = {index: len(echo) for index, echo in echo_by_choice.items()}
        pending_echo = {index: echo for index, echo in echo_by_choice.items() if echo}
        try:
            async for index, output in generation:
                completion_tokens[index] = output.completion_tokens
                text = pending_echo.pop(index, "") + output.text_delta
                if not text and not output.finished and not output.logprobs_delta:
                    continue
                logprobs = None
                if request.logprobs is not None:
                    logprobs = to_completion_logprobs(output.logprobs_delta or (), offsets[index])
                offsets[index] += len(output.text_delta)
                choice = CompletionChoice(
                    index=index,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=finish_reason_name(output.finish_reason) if output.finished else None,
                )
                chunk = CompletionResponse(id=response_id, created=created, model=model, choices=[choice])
                yield sse_data(chunk.model_dump_json())
            if request.include_usage:
                usage = Usage.of(prompt_tokens, sum(completion_tokens.values()))
                chunk = CompletionResponse(id=response_id, created=created, model=model, choices=[], usage=usage)
                yield sse_data(chunk.model_dump_json())
        except APIError as error:
            yield sse_error(error)
        finally:
            generation.close()
        yield SSE_DONE
