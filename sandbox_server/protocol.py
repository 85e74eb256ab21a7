"""The Jupyter messaging protocol as far as an execute needs it, independent of the transport.

Both backends (ZMQ to a local kernel, websocket to a gateway) feed the messages they receive through
`ExecuteState.on_message` and ask `ExecuteState.verdict` whether the execute has settled, so the deadline,
the interrupt and its grace behave the same on both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .execution import ERROR, OK, TIMEOUT, OutputCollector, strip_ansi

Message = dict[str, Any]

# Statuses only the kernel layer uses: the session turns UNRESPONSIVE into `restarted`, and answers NOT_RUN
# (the kernel was found gone before it received the code) by running the code on a fresh kernel.
UNRESPONSIVE = "unresponsive"
NOT_RUN = "not_run"

STRIP_SLICE = 64 * 1024  # characters stripped of ANSI codes between two returns to the event loop
EXPENSIVE = 0.002  # seconds: a message that cost the loop more than this is paced (see Pacer)
IDLE_AFTER_REPLY = 2.0  # after the reply, how long to wait for the idle status (lost if a message was dropped)


@dataclass
class ExecuteState:
    """Tracks one execute request: its outputs, its reply and whether the kernel went idle."""

    msg_id: str
    collector: OutputCollector
    deadline: float  # monotonic time at which the execute is interrupted
    grace: float  # after the interrupt, how long the kernel has to go idle
    reply: Message | None = None
    idle: bool = False
    started: bool = False  # any message answering this request arrived: the kernel received the code
    interrupted: bool = False
    replied_at: float | None = None
    lost_idle: bool = False  # settled by the reply alone: a message was lost, the iopub connection may be too

    async def verdict(self, now: float, interrupt: Callable[[], Awaitable[None]]) -> str | None:
        """The execute's status once it is settled, else None. Settled: complete (reply and idle); or replied
        with the idle status lost for IDLE_AFTER_REPLY (marked truncated: the dropped message may have held
        output too); or UNRESPONSIVE, past the deadline and the interrupt's grace."""
        if self.complete:
            return self.outcome
        if self.reply is not None:
            if self.replied_at is None:
                self.replied_at = now
            elif now - self.replied_at > IDLE_AFTER_REPLY:
                self.collector.execution.truncated = True
                self.lost_idle = True
                return self.outcome
        if await self.enforce_deadline(now, interrupt):
            return UNRESPONSIVE
        return None

    @property
    def complete(self) -> bool:
        return self.idle and self.reply is not None

    async def enforce_deadline(self, now: float, interrupt: Callable[[], Awaitable[None]]) -> bool:
        """At the deadline interrupt once and allow `grace` more; True when that has run out too."""
        if now < self.deadline:
            return False
        if self.interrupted:
            return True
        await interrupt()
        self.interrupted = True
        self.deadline = now + self.grace
        return False

    def wait(self, now: float, longest: float) -> float:
        return min(max(self.deadline - now, 0.0), longest)

    @property
    def outcome(self) -> str:
        """ok or error for a completed execute; timeout when it completed only after an interrupt."""
        status = ERROR if self.failed else OK
        return TIMEOUT if self.interrupted else status

    def on_message(self, channel: str, message: Message) -> None:
        """Record a message; input requests go to the event sink for the client to answer."""
        if message.get("parent_header", {}).get("msg_id") != self.msg_id:
            return  # left over from an earlier (interrupted) execute
        self.started = True
        kind = message["header"]["msg_type"]
        content = message["content"]
        if channel == "shell" and kind == "execute_reply":
            self.reply = content
        elif channel == "stdin" and kind == "input_request":
            self.collector.emit({"type": "input_request", "prompt": content.get("prompt", ""),
                                 "password": bool(content.get("password"))})
        elif channel != "iopub":
            return
        elif kind == "stream":
            self.collector.on_stream(content.get("name", "stdout"), content.get("text", ""))
        elif kind in ("execute_result", "display_data"):
            result_kind = "result" if kind == "execute_result" else "display"
            self.collector.on_result(result_kind, content.get("data", {}), content.get("metadata", {}))
        elif kind == "error":
            self.collector.on_error(content.get("ename", ""), content.get("evalue", ""),
                                    content.get("traceback", []))
        elif kind == "status" and content.get("execution_state") == "idle":
            self.idle = True

    @property
    def execution_count(self) -> int | None:
        return self.reply.get("execution_count") if self.reply else None

    @property
    def failed(self) -> bool:
        return bool(self.reply and self.reply.get("status") != "ok") or self.collector.execution.error is not None


class Pacer:
    """Keeps one execute's message handling from holding the event loop: it returns to the loop after every
    EXPENSIVE seconds of work, and after an expensive message (a kernel flooding large ones) it stays away
    as long as that message cost. A flooding kernel gets at most half of the loop, and a request of another
    session finishes between two of its messages instead of advancing one step per message. Cheap messages
    (the usual five of an execute) cost no extra turn of the loop."""

    def __init__(self) -> None:
        self.since_yield = time.monotonic()

    async def step(self, received: float) -> None:
        """Call after handling a message that arrived (before decoding) at `received`."""
        now = time.monotonic()
        if now - received > EXPENSIVE:
            await asyncio.sleep(now - received)
        elif now - self.since_yield > EXPENSIVE:
            await asyncio.sleep(0)
        else:
            return
        self.since_yield = time.monotonic()


async def clean(message: Message) -> Message:
    """Strip ANSI codes from the text a client will see (streams, text results, errors), in place.

    The kernel controls this text: a message of escape codes costs the regex about 0.4 us a code, so a large
    one is stripped in slices with a return to the event loop after each, and other sessions never wait for
    more than one slice.
    """
    content = message.get("content")
    if not isinstance(content, dict):
        return message
    kind = message.get("header", {}).get("msg_type")
    if kind == "stream" and isinstance(content.get("text"), str):
        content["text"] = await strip_yielding(content["text"])
    elif kind in ("execute_result", "display_data") and isinstance(content.get("data"), dict):
        if isinstance(content["data"].get("text/plain"), str):
            content["data"]["text/plain"] = await strip_yielding(content["data"]["text/plain"])
    elif kind == "error":
        content["evalue"] = await strip_yielding(str(content.get("evalue", "")))
        lines, since_yield = [], 0
        for line in content.get("traceback") if isinstance(content.get("traceback"), list) else []:
            line = str(line)
            lines.append(await strip_yielding(line))
            since_yield += len(line)
            if since_yield > STRIP_SLICE:  # a million short lines must not hold the loop either
                since_yield = 0
                await asyncio.sleep(0)
        content["traceback"] = lines
    return message


async def strip_yielding(text: str) -> str:
    if "\x1b" not in text:
        return text
    if len(text) <= STRIP_SLICE:
        return strip_ansi(text)
    pieces = []
    start = 0
    while start < len(text):
        end = start + STRIP_SLICE
        if end < len(text):
            # Cut just before an ESC, so that no code straddles two slices.
            cut = text.rfind("\x1b", start + 1, end)
            end = cut if cut > start else end
        pieces.append(strip_ansi(text[start:end]))
        start = end
        await asyncio.sleep(0)
    return "".join(pieces)
