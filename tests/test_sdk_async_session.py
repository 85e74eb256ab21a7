"""AsyncSession: the Session's surface awaited inside a running event loop; cancellation stops the turn."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from codeact_sdk import AsyncSession, events
from codeact_sdk.testing import Fault, ScriptedModelServer


def async_session(model, local_sandbox, **options) -> AsyncSession:
    return AsyncSession(llm_url=model.url, sandbox_url=local_sandbox.url, sandbox_token=local_sandbox.token,
                        **options)


async def cancel_when(session: AsyncSession, message: str, kind: type, settle: float = 0.0) -> float:
    """Start a chat, cancel it once an event of `kind` was seen (and `settle` seconds more); the seconds the
    cancellation took to complete."""
    seen = asyncio.Event()

    def on_event(event: events.Event) -> None:
        if isinstance(event, kind):
            seen.set()

    task = asyncio.create_task(session.chat(message, on_event=on_event))
    await asyncio.wait_for(seen.wait(), 30)
    await asyncio.sleep(settle)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return time.monotonic() - started


def test_chat_stream_files_and_async_tools_on_the_callers_loop(model, local_sandbox):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        lock = asyncio.Lock()  # a loop-bound object, as an async client would hold

        async def quota(user: str) -> int:
            """Remaining quota of a user."""
            assert asyncio.get_running_loop() is loop
            async with lock:
                return {"ada": 3}.get(user, 0)

        model.enqueue("<execute>print(quota('ada'), open('in.txt').read())\nopen('out.txt', 'w').write('ok')</execute>",
                      "<solution>3</solution>", "<execute>print(1)</execute>", "<solution>1</solution>")
        async with async_session(model, local_sandbox, tools=[quota]) as session:
            await session.upload("in.txt", b"hello")
            reply = await session.chat("quota?")
            assert reply.solution == "3" and reply.executions[0].stdout == "3 hello\n", reply.executions[0].text
            assert await session.download("out.txt") == b"ok"
            assert {f["path"] for f in await session.files()} == {"in.txt", "out.txt"}
            kinds = [type(event).__name__ async for event in session.stream("again")]
            assert kinds[-1] == "ReplyFinished" and "ExecutionFinished" in kinds

    asyncio.run(main())


def test_cancelling_mid_execute_interrupts_the_kernel_and_keeps_the_session(model, local_sandbox):
    async def main() -> None:
        model.enqueue("<execute>kept = 42\nimport time\ntime.sleep(30)</execute>",
                      "<execute>print(kept)</execute>", "<solution>42</solution>")
        async with async_session(model, local_sandbox) as session:
            took = await cancel_when(session, "sleep", events.CodeStarted, settle=0.3)
            assert took < 5, "the cancelled turn did not stop promptly"
            assert len(model.requests) == 1  # stopped: the model was not asked again after the execute
            reply = await session.chat("what is kept?")  # the kernel was interrupted, not replaced
            assert reply.executions[0].stdout == "42\n" and not reply.executions[0].new_kernel
            roles = [message["role"] for message in session.messages]
            assert roles[:4] == ["system", "user", "assistant", "user"], roles
            # The stopped run's output goes with the next message: user and assistant still alternate.
            assert all(first != second for first, second in itertools.pairwise(roles[1:])), roles
            assert session.messages[3]["content"].startswith("Execution Output:")
            assert session.messages[3]["content"].endswith("what is kept?")

    asyncio.run(main())


def test_cancelling_mid_model_stream_cuts_the_stream_at_once(local_sandbox):
    async def main(model: ScriptedModelServer) -> None:
        model.enqueue(Fault(text="thinking " * 200, delay=3.0))  # three stream events, 3 s apart
        async with async_session(model, local_sandbox) as session:
            took = await cancel_when(session, "think", events.ModelDelta)
            assert took < 1.5, "waited for the next chunk instead of cutting the stream"
            assert session.messages[-1]["role"] == "assistant" and session.messages[-1]["content"].startswith("think")

    with ScriptedModelServer(chunk_size=600) as model:
        asyncio.run(main(model))
