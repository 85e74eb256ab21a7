"""The chat REPL's input: readline's line editing and a history kept between runs (on a terminal), and
lines gathered into messages."""

from __future__ import annotations

import os
import select
import sys


class LineEditor:
    """Input lines with readline's editing and a history kept between runs (on a terminal), gathered into
    messages: a paste of several lines is one message, and so is everything between two FENCE lines."""

    FENCE = '"' * 3
    PASTE_GAP = 0.05  # seconds: the rest of a paste is already waiting by then; a person types slower

    def __init__(self, history_path: str) -> None:
        self.history_path = history_path
        self.terminal = sys.stdin.isatty()
        self.readline = None
        if self.terminal:
            try:
                import readline
            except ImportError:  # a Python built without it: plain input() still works
                return
            self.readline = readline
            readline.parse_and_bind("set enable-bracketed-paste on")  # a paste arrives whole, where supported
            readline.set_history_length(1000)
            try:
                readline.read_history_file(history_path)
            except OSError:
                pass

    def __enter__(self) -> LineEditor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.readline is not None:
            try:
                os.makedirs(os.path.dirname(self.history_path), exist_ok=True)
                self.readline.write_history_file(self.history_path)
            except OSError:
                pass

    def read(self, prompt: str, more: str) -> str:
        """One message. EOFError at the end of input; KeyboardInterrupt if Ctrl-C is pressed while typing."""
        first = input(prompt)
        if first.strip() == self.FENCE:
            return self._fenced(more)
        lines = [first]
        while self.terminal and self._pending():
            lines.append(input(more))
        if self.readline is not None and len(lines) > 1:
            self._as_one_history_entry(len(lines), "\n".join(lines))
        return "\n".join(lines)

    def _fenced(self, more: str) -> str:
        lines = []
        while (line := input(more)).strip() != self.FENCE:
            lines.append(line)
        return "\n".join(lines)

    def _pending(self) -> bool:
        return bool(select.select([sys.stdin], [], [], self.PASTE_GAP)[0])

    def _as_one_history_entry(self, count: int, message: str) -> None:
        """A pasted message is recalled as one history entry, not one per line."""
        length = self.readline.get_current_history_length()
        for position in range(length - 1, max(length - count, 0) - 1, -1):
            self.readline.remove_history_item(position)
        self.readline.add_history(message)
