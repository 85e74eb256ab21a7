"""The Jupyter messaging protocol as far as an execute needs it, independent of the transport.

Both backends (ZMQ to a local kernel, websocket to a gateway) feed the messages they receive through
`ExecuteState.on_message`, which tells when the execute is complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .execution import OutputCollector

Message = dict[str, Any]


@dataclass
class ExecuteState:
    """Tracks one execute request: its outputs, its reply and whether the kernel went idle."""

    msg_id: str
    collector: OutputCollector
    reply: Message | None = None
    idle: bool = False
    started: bool = False  # any message answering this request arrived: the kernel received the code

    @property
    def complete(self) -> bool:
        return self.idle and self.reply is not None

    def on_message(self, channel: str, message: Message) -> Message | None:
        """Record a message; return an input request for the caller to forward, else None."""
        if message.get("parent_header", {}).get("msg_id") != self.msg_id:
            return None  # left over from an earlier (interrupted) execute
        self.started = True
        kind = message["header"]["msg_type"]
        content = message["content"]
        if channel == "shell" and kind == "execute_reply":
            self.reply = content
        elif channel == "stdin" and kind == "input_request":
            return content
        elif channel != "iopub":
            return None
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
        return None

    @property
    def execution_count(self) -> int | None:
        return self.reply.get("execution_count") if self.reply else None

    @property
    def failed(self) -> bool:
        return bool(self.reply and self.reply.get("status") != "ok") or self.collector.execution.error is not None
