"""Transcripts: every message appended to a JSONL file as it happens, flushed and fsynced, so a killed
process loses nothing; read back for `Session.resume`; exported to the ShareGPT-style `conversations`
format of the CodeActInstruct data set.

Line format: {"type": "meta", ...} first, then one {"type": "message", "role", "content", "time"} per
message, {"type": "turns", ...} records with each step's code, execution status and timings, and
{"type": "take_back", "messages": N} where a turn did not finish and its last N messages were withdrawn.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from .errors import ConfigError

SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


class TranscriptWriter:
    def __init__(self, path: str, meta: dict[str, Any] | None = None) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fresh = not os.path.exists(path) or os.path.getsize(path) == 0
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the session's life
        if fresh:
            self.append({"type": "meta", "version": 1, "created": time.time(), **(meta or {})})

    def append(self, record: dict[str, Any]) -> None:
        # default=repr: a tool call's bytes or a tool's own objects are written as their repr, never lost
        self.handle.write(json.dumps(record, ensure_ascii=False, default=repr) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def message(self, role: str, content: str) -> None:
        self.append({"type": "message", "role": role, "content": content, "time": time.time()})

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.close()


def read(path: str) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The meta record and the messages of a transcript; a torn line (a kill mid-write) is ignored, as are
    records that do not shape the conversation (turns, tool calls). A message or take_back record that is
    malformed is a ConfigError naming its line: resuming past it would give the model another conversation
    than the one written."""
    meta: dict[str, Any] = {}
    messages: list[dict[str, str]] = []
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 - closed below, after the loop
    except OSError as error:
        raise ConfigError(f"cannot read the transcript {path}: {error.strerror}") from None
    with handle:
        for number, line in enumerate(handle, 1):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            kind = record.get("type") if isinstance(record, dict) else None
            if kind == "meta":
                meta = record
            elif kind == "take_back":  # a turn that did not finish
                count = record.get("messages")
                if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                    raise ConfigError(f"{path}:{number}: a take_back record needs a message count, got {count!r}")
                del messages[len(messages) - min(count, len(messages)):]
            elif kind == "message":
                message = {"role": record.get("role"), "content": record.get("content")}
                if message["role"] not in SHAREGPT_ROLES or not isinstance(message["content"], str):
                    raise ConfigError(f"{path}:{number}: a message record needs a role (system, user or assistant) "
                                      "and a text content")
                if message["role"] == "system" and len(messages) == 1 and messages[0]["role"] == "system":
                    messages[0] = message  # the prompt, completed once MCP tools were listed
                else:
                    messages.append(message)
    return meta, messages


def to_sharegpt(messages: list[dict[str, str]], destination: str | None = None) -> dict[str, Any]:
    """The CodeActInstruct shape: {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}]}; written
    as JSON to `destination` when given."""
    data = {"conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages]}
    if destination:
        with open(destination, "w", encoding="utf-8") as handle:
            json.dump(data, handle, ensure_ascii=False, indent=1)
    return data


def export(path: str, destination: str | None = None) -> dict[str, Any]:
    """Export a transcript file to ShareGPT format; written as JSON to `destination` when given."""
    return to_sharegpt(read(path)[1], destination)
