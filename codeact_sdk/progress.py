"""`codeact run`'s progress on a terminal: one status line, rewritten in place, saying what the agent is
doing (the model thinking or writing, code running, a tool called) and for how long. Nothing is drawn when
the output is not a terminal, so `--json` and pipes see only the answer."""

from __future__ import annotations

import threading
import time
from typing import TextIO

from . import events


class Progress:
    TICK = 0.2  # seconds between redraws of the elapsed time

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.started = self.since = time.monotonic()
        self.step = 1
        self.state = "model thinking"
        self.tokens = 0
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.ticker = threading.Thread(target=self._tick, name="codeact-progress", daemon=True)
        self.ticker.start()

    def on_event(self, event: events.Event) -> None:
        with self.lock:
            if isinstance(event, events.ModelDelta):
                if self.tokens == 0:
                    self._enter("model writing")
                self.tokens += 1
            elif isinstance(event, events.CodeStarted):
                self._enter("running code")
            elif isinstance(event, events.ToolCall):
                self._enter(f"running code, calling {event.name}()")
            elif isinstance(event, events.ToolResult):
                self._enter("running code")
            elif isinstance(event, events.ExecutionFinished):
                self.step += 1
                self.tokens = 0
                self._enter("model thinking")
            self._draw()

    def say(self, text: str) -> None:
        """A line of its own above the status line."""
        with self.lock:
            self.stream.write(f"\r\x1b[2K{text}\n")
            self._draw()

    def close(self) -> None:
        self.closed.set()
        self.ticker.join(1)
        with self.lock:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()

    def _enter(self, state: str) -> None:
        self.state, self.since = state, time.monotonic()

    def _draw(self) -> None:
        now = time.monotonic()
        detail = f", {self.tokens} tokens" if self.state == "model writing" else ""
        self.stream.write(f"\r\x1b[2K[step {self.step}] {self.state} {now - self.since:.1f} s{detail} "
                          f"({now - self.started:.0f} s in all)")
        self.stream.flush()

    def _tick(self) -> None:
        while not self.closed.wait(self.TICK):
            with self.lock:
                if not self.closed.is_set():
                    self._draw()
