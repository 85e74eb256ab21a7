"""What one execute produced: the `Execution` record and the capped collector that builds it.

Output is capped while it streams, not after: the collector keeps a head and a bounded tail of each
text stream and drops the middle, so a 1 GB print costs bounded memory.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# CSI sequences, and OSC sequences ended by BEL or ST. An OSC body never holds an ESC, so every match attempt
# stops at the next ESC and stripping stays linear (`[^\x07]*` made `'\x1b]' * 100000` quadratic: a 15 s stall).
ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")

# The marker left where output was dropped. The kernel-side hook (kernel_hooks.py) writes the same
# marker, so a truncation that happened in the kernel is recognised here too.
TRUNCATION_MARKER = "\n[... output truncated: {count} characters omitted ...]\n"
TRUNCATION_PATTERN = re.compile(r"\n\[\.\.\. output truncated: \d+ characters omitted \.\.\.\]\n")

NO_OUTPUT = "[Code executed successfully with no output]"

# Statuses an execute can end with. CLOSED: the session was deleted while the code ran.
OK, ERROR, TIMEOUT, RESTARTED, DIED, CLOSED = "ok", "error", "timeout", "restarted", "died", "closed"

Event = dict[str, Any]
EventSink = Callable[[Event], None]


def strip_ansi(text: str) -> str:
    return ANSI_ESCAPE.sub("", text)


@dataclass
class Execution:
    """The outcome of one execute. An exception in user code is data (status "error"), not a failure."""

    status: str = OK
    stdout: str = ""
    stderr: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)  # {"type", "data", "metadata"}
    error: dict[str, Any] | None = None  # {"name", "value", "traceback"}
    execution_count: int | None = None
    duration_ms: float = 0.0
    truncated: bool = False
    new_kernel: bool = False  # the session's kernel was replaced before or during this execute
    message: str | None = None  # what happened, for timeout / restarted / died

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["text"] = self.text
        return data

    @property
    def text(self) -> str:
        """A plain rendering: streams, text results, the error, and the status message."""
        parts = [self.stdout, self.stderr]
        for result in self.results:
            text = result["data"].get("text/plain")
            if text:
                parts.append(text if text.endswith("\n") else text + "\n")
        if self.error:
            parts.append("\n".join(self.error["traceback"]) + "\n")
        if self.message:
            parts.append(f"[{self.message}]\n")
        return "".join(parts)


class CappedText:
    """A text stream that keeps its first `head_limit` and last `tail_limit` characters."""

    def __init__(self, limit: int) -> None:
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head: list[str] = []
        self.head_size = 0
        self.tail: deque[str] = deque()
        self.tail_size = 0
        self.dropped = 0

    @property
    def overflowing(self) -> bool:
        return self.head_size >= self.head_limit

    def append(self, text: str) -> str:
        """Add text; return the part that went into the head (what may still be streamed live)."""
        room = self.head_limit - self.head_size
        kept = text[:room] if room > 0 else ""
        if kept:
            self.head.append(kept)
            self.head_size += len(kept)
        rest = text[len(kept) :]
        if rest:
            self.tail.append(rest)
            self.tail_size += len(rest)
            while self.tail_size > self.tail_limit:
                excess = self.tail_size - self.tail_limit
                first = self.tail[0]
                if len(first) <= excess:
                    self.tail.popleft()
                    self.tail_size -= len(first)
                    self.dropped += len(first)
                else:
                    self.tail[0] = first[excess:]
                    self.tail_size -= excess
                    self.dropped += excess
        return kept

    def unstreamed(self) -> str:
        """What follows the head: the truncation marker (if anything was dropped) and the tail."""
        marker = TRUNCATION_MARKER.format(count=self.dropped) if self.dropped else ""
        return marker + "".join(self.tail)

    def value(self) -> str:
        return "".join(self.head) + self.unstreamed()


class OutputCollector:
    """Turns kernel iopub messages into events (streamed to `sink`) and one capped `Execution`."""

    def __init__(self, max_output: int, max_results: int, sink: EventSink | None = None) -> None:
        self.streams = {"stdout": CappedText(max_output // 2), "stderr": CappedText(max_output // 2)}
        self.max_results = max_results
        self.results_size = 0
        self.sink = sink
        self.execution = Execution()

    def emit(self, event: Event) -> None:
        if self.sink is not None:
            self.sink(event)

    # Text arrives with ANSI codes already stripped (protocol.clean, which keeps the event loop free meanwhile).
    def on_stream(self, name: str, text: str) -> None:
        stream = self.streams.get(name, self.streams["stderr"])
        if TRUNCATION_PATTERN.search(text):
            self.execution.truncated = True
        live = stream.append(text)
        if live:
            self.emit({"type": name if name in self.streams else "stderr", "text": live})
        if stream.dropped:
            self.execution.truncated = True

    def on_result(self, kind: str, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        size = sum(len(value) if isinstance(value, str) else len(str(value)) for value in data.values())
        if self.results_size + size > self.max_results:
            self.execution.truncated = True
            return
        self.results_size += size
        text = data.get("text/plain")
        if isinstance(text, str) and TRUNCATION_PATTERN.search(text):  # cut in the kernel (the message cap)
            self.execution.truncated = True
        result = {"type": kind, "data": data, "metadata": metadata}
        self.execution.results.append(result)
        self.emit(result)

    def on_error(self, name: str, value: str, traceback: list[str]) -> None:
        error = {"name": name, "value": value, "traceback": traceback}
        self.execution.error = error
        self.emit({"type": "error", **error})

    def finish(self, status: str, execution_count: int | None, duration_ms: float) -> Execution:
        """Flush the tails (so a streaming client sees head, marker, tail in order) and seal the record."""
        for name, stream in self.streams.items():
            rest = stream.unstreamed()
            if rest:
                self.emit({"type": name, "text": rest})
        execution = self.execution
        execution.stdout = self.streams["stdout"].value()
        execution.stderr = self.streams["stderr"].value()
        execution.status = status
        execution.execution_count = execution_count
        execution.duration_ms = round(duration_ms, 3)
        return execution


def done_event(execution: Execution) -> Event:
    """The last event of a streamed execute: everything but the outputs already streamed."""
    return {
        "type": "done",
        "status": execution.status,
        "execution_count": execution.execution_count,
        "duration_ms": execution.duration_ms,
        "truncated": execution.truncated,
        "new_kernel": execution.new_kernel,
        "message": execution.message,
    }


def render_original(events: list[Event], execution: Execution, timeout: float) -> str:
    """The original CodeAct `/execute` text, built from the events in the order they happened.

    Stream text; for results and displays the text/plain value, then a PNG as a data-URL image; for
    an error the traceback lines joined by newlines. A timeout gives only the timeout line.
    """
    # `restarted` happens only when a timed-out kernel ignored its interrupt: a timeout too.
    if execution.status in (TIMEOUT, RESTARTED):
        return f"[Execution timed out ({timeout:g} seconds).]"
    parts = []
    for event in events:
        kind = event["type"]
        if kind in ("stdout", "stderr"):
            parts.append(event["text"])
        elif kind in ("result", "display"):
            data = event["data"]
            if "text/plain" in data:
                parts.append(data["text/plain"])
            if "image/png" in data:
                parts.append(f"\n![image](data:image/png;base64,{data['image/png']})\n")
        elif kind == "error":
            parts.append("\n".join(event["traceback"]))
    text = "".join(parts)  # events carry text already stripped of ANSI codes
    if execution.status == DIED and execution.message:
        text += ("\n" if text else "") + f"[{execution.message}]"
    return text if text.strip() else NO_OUTPUT
