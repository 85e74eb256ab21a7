"""AsyncSession: the Session for asyncio code (FastAPI-style services, a running Jupyter loop).

One turn loop, the Session's: it runs on a worker thread and its events cross to the caller's loop through a
queue, so the two can never drift apart. Cancelling the task that awaits `chat` or iterates `stream` calls
`Session.stop()`: the model's stream is cut, a running execute is interrupted, and the worker is waited for
before the cancellation goes on. Async host tools run on the caller's loop (they may hold loop-bound
clients); sync ones on the Session's tool threads.

Usage:
    async with AsyncSession(llm_url=..., sandbox_url=..., tools=[lookup]) as session:
        reply = await session.chat("How many orders shipped late?")
        async for event in session.stream("And by whom?"):
            ...
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

from . import events
from .session import Reply, Session

STOP_WAIT = 30.0  # seconds a cancelled turn's worker may take to wind down (an interrupt, a closing stream)


class AsyncSession:
    def __init__(self, *args, **kwargs) -> None:
        """The arguments of `Session`."""
        self.session = Session(*args, **kwargs)

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.session.messages

    async def open(self) -> AsyncSession:
        self.session.host_tools.loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.session.open)
        return self

    async def close(self) -> None:
        await asyncio.to_thread(self.session.close)

    async def __aenter__(self) -> AsyncSession:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def chat(self, message: str, on_event: Callable[[events.Event], None] | None = None) -> Reply:
        async for event in self.stream(message):
            if on_event is not None:
                on_event(event)
            if isinstance(event, events.ReplyFinished):
                return event.reply
        raise AssertionError("stream ended without a reply")

    async def stream(self, message: str) -> AsyncIterator[events.Event]:
        """The Session's events for one message, as they happen; the last is ReplyFinished."""
        loop = asyncio.get_running_loop()
        self.session.host_tools.loop = loop
        queue: asyncio.Queue = asyncio.Queue()
        finished = asyncio.Event()
        end = object()

        def work() -> None:
            try:
                for event in self.session.stream(message):
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except BaseException as error:  # raised in the caller's task instead
                loop.call_soon_threadsafe(queue.put_nowait, error)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, end)
                loop.call_soon_threadsafe(finished.set)

        threading.Thread(target=work, name="codeact-turn", daemon=True).start()
        try:
            while (item := await queue.get()) is not end:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not finished.is_set():  # cancelled, or the caller stopped iterating: stop the turn, then wait
                self.session.stop()
                await asyncio.shield(asyncio.wait_for(finished.wait(), STOP_WAIT))

    def stop(self) -> None:
        """Stop the reply in progress (as cancelling it does)."""
        self.session.stop()

    async def upload(self, path: str, data: bytes) -> None:
        await asyncio.to_thread(self.session.upload, path, data)

    async def download(self, path: str) -> bytes:
        return await asyncio.to_thread(self.session.download, path)

    async def files(self) -> list[dict]:
        return await asyncio.to_thread(self.session.files)

    async def reset(self) -> None:
        await asyncio.to_thread(self.session.reset)

    def export(self, destination: str | None = None) -> dict:
        return self.session.export(destination)
