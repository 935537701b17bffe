"""Several engine output streams as one (a replica streams a request group through one Ray call); no Ray here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from fitserve.server.engine.types import RequestOutput
from fitserve.server.scaleout.request import ChoiceOutput


async def merge_streams(streams: Sequence[AsyncIterator[RequestOutput]]) -> AsyncIterator[ChoiceOutput]:
    """Yield every stream's outputs as they arrive, tagged with the stream's index; re-raise the first error.

    Closing the merged stream (or an error) closes every input stream, which aborts its engine request.
    """
    if len(streams) == 1:  # the common case: no tasks needed
        async for output in streams[0]:
            yield ChoiceOutput(0, output)
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        except Exception as error:  # noqa: BLE001 - re-raised by the consumer
            await queue.put((index, error))
        else:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            index, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield ChoiceOutput(index, item)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
