"""The web chat's turns: one data path, SDK events -> the store and every page watching the conversation.

A `Chat` is one conversation's AsyncSession, opened at its first message with the history the store kept
(a fresh kernel, which the model is told about, as `Session.resume` does). Each event of a turn goes out to
every websocket watching that conversation (two tabs see the same turn) as one JSON message, and what the
page shows is appended to the store as it settles: the user's message, each model reply, each code cell with
its outputs, the end of the turn. After the turn the model's history is saved. A stop ends the turn where it
is (the model's stream cut, a running execution interrupted); what was said stays.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import events
from ..async_session import AsyncSession
from ..errors import CodeActError
from ..mcp_tools import MCPServer
from ..settings import Settings, resolve
from .store import UNTITLED, Store

log = logging.getLogger("codeact.web")

TITLE_FROM_MESSAGE = 60  # characters of a first message that become the conversation's title
Send = Callable[[dict[str, Any]], None]  # one watcher: a websocket's write


@dataclass
class Chat:
    conversation_id: str
    session: AsyncSession
    watchers: set = field(default_factory=set)  # of Send
    turn: asyncio.Task | None = None
    opened: bool = False
    stale: bool = False  # its settings changed: the next turn starts a session with the new ones

    @property
    def busy(self) -> bool:
        return self.turn is not None and not self.turn.done()

    def busy_elsewhere(self) -> bool:
        """A turn runs that is not the caller's own (ready() is called from within a starting turn too)."""
        return self.busy and self.turn is not asyncio.current_task()

    def broadcast(self, message: dict[str, Any]) -> None:
        for send in list(self.watchers):
            send(message)


class Chats:
    """The open conversations of a server: every conversation's session uses the sandbox of `base` and the
    MCP servers the operator configured."""

    def __init__(self, store: Store, base: Settings, mcp_servers: tuple[MCPServer, ...] = ()) -> None:
        self.store = store
        self.base = base  # the server's model, sandbox and defaults
        self.mcp_servers = mcp_servers  # the operator's, for every conversation
        self.chats: dict[str, Chat] = {}

    def chat(self, conversation_id: str) -> Chat:
        if conversation_id not in self.chats:
            self.chats[conversation_id] = Chat(conversation_id, self.session_for(conversation_id))
        return self.chats[conversation_id]

    def session_for(self, conversation_id: str) -> AsyncSession:
        """A session with the conversation's settings, taking up its history (with a fresh kernel)."""
        settings = self.store.get(conversation_id).settings
        session = AsyncSession(settings=resolve(
            llm_url=settings.get("llm_url", self.base.llm_url), model=settings.get("model", self.base.model),
            api_key=self.base.api_key, sandbox_url=self.base.sandbox_url, sandbox_token=self.base.sandbox_token,
            timeout=settings.get("timeout", self.base.timeout),
            max_executions=settings.get("max_executions", self.base.max_executions)), mcp_servers=self.mcp_servers)
        session.session.continue_from(self.store.messages(conversation_id))
        return session

    def reconfigure(self, conversation_id: str) -> None:
        if conversation_id in self.chats:
            self.chats[conversation_id].stale = True

    def send(self, chat: Chat, text: str) -> None:
        """Start a turn; refused (an error to the sender's page) while one runs."""
        chat.turn = asyncio.get_running_loop().create_task(self.run_turn(chat, text))

    async def run_turn(self, chat: Chat, text: str) -> None:
        cid = chat.conversation_id
        if self.store.get(cid).title == UNTITLED and not self.store.items(cid):  # named after its first message
            title = self.store.rename(cid, text.strip().splitlines()[0][:TITLE_FROM_MESSAGE]).title
            chat.broadcast({"type": "title", "title": title})
        chat.broadcast({"type": "item", **self.item(cid, "user", {"text": text})})
        cell: dict[str, Any] | None = None
        try:
            await self.ready(chat)
            async for event in chat.session.stream(text):
                if isinstance(event, events.ModelDelta):
                    chat.broadcast({"type": "delta", "text": event.text})
                elif isinstance(event, events.ModelReply):
                    chat.broadcast({"type": "item", **self.item(cid, "assistant", {"text": event.text})})
                elif isinstance(event, events.CodeStarted):
                    cell = {"code": event.code, "outputs": []}
                    chat.broadcast({"type": "cell_start", "code": event.code, "kernel": "running"})
                elif isinstance(event, events.Output) and cell is not None:
                    add_output(cell["outputs"], {"type": "stream", "name": event.stream, "text": event.text})
                    chat.broadcast({"type": "output", "name": event.stream, "text": event.text})
                elif isinstance(event, events.Result) and cell is not None:
                    cell["outputs"].append({"type": event.kind, "data": event.data})
                    chat.broadcast({"type": "result", "kind": event.kind, "data": event.data})
                elif isinstance(event, events.ExecutionFinished) and cell is not None:
                    execution = event.execution
                    cell.update(status=execution.status, error=execution.error, message=execution.message,
                                duration_ms=execution.duration_ms)
                    kernel = "restarted" if execution.status in ("restarted", "died") else "idle"
                    chat.broadcast({"type": "item", "kernel": kernel, **self.item(cid, "cell", cell)})
                    cell = None
                elif isinstance(event, events.ReplyFinished):
                    reply = event.reply
                    end = {"stop_reason": reply.stop_reason, "solution": reply.solution, "usage": reply.usage}
                    self.store.save_messages(cid, chat.session.messages)
                    chat.broadcast({"type": "item", **self.item(cid, "end", end)})
        except CodeActError as error:  # the model or the sandbox is down: said on the page, the server stays up
            self.store.save_messages(cid, chat.session.messages)
            chat.broadcast({"type": "item", **self.item(cid, "error", {"message": str(error)})})
        except Exception:
            log.exception("turn of conversation %s failed", cid)
            chat.broadcast({"type": "item", **self.item(cid, "error", {"message": "internal error; see the "
                                                                                  "server's log"})})

    async def ready(self, chat: Chat) -> None:
        """The conversation's sandbox session, created at its first use (a message, a file)."""
        if chat.stale and not chat.busy_elsewhere():
            if chat.opened:
                await chat.session.close()
            chat.session, chat.opened, chat.stale = self.session_for(chat.conversation_id), False, False
        if not chat.opened:
            await chat.session.open()
            chat.opened = True

    def stop(self, chat: Chat) -> None:
        if chat.busy:
            chat.session.stop()

    def item(self, conversation_id: str, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        seq = self.store.append_item(conversation_id, kind, data)
        return {"seq": seq, "kind": kind, "data": data}

    async def close(self) -> None:
        for chat in self.chats.values():
            await end(chat)
        self.chats.clear()

    async def forget(self, conversation_id: str) -> None:
        """A deleted conversation: its turn stopped, its session (and kernel) closed."""
        chat = self.chats.pop(conversation_id, None)
        if chat is not None:
            chat.broadcast({"type": "deleted"})
            await end(chat)


async def end(chat: Chat) -> None:
    """A conversation's turn stopped and waited for, then its session (and kernel) closed."""
    if chat.busy:
        chat.session.stop()
        await asyncio.wait([chat.turn], timeout=10)
    if chat.opened:
        await chat.session.close()


def add_output(outputs: list[dict[str, Any]], output: dict[str, Any]) -> None:
    """Stream text joins the output before it when that is the same stream, as a notebook shows it."""
    last = outputs[-1] if outputs else None
    if last is not None and last["type"] == "stream" and last["name"] == output["name"]:
        last["text"] += output["text"]
    else:
        outputs.append(dict(output))
