"""The web chat's conversations, in SQLite (stdlib `sqlite3`): one file, surviving restarts.

A conversation has a title, its settings, the model's history (the messages the SDK sends, as `Session`
keeps them after each turn), and the items the page shows (a user message, the model's text, a code cell
with its outputs, the answer), appended as they happen so a reload shows what was seen. Exports: the
transcript JSONL the SDK writes (`codeact_sdk.transcript`) and the ShareGPT shape of the CodeActInstruct data.

One connection, used from the server's event loop thread only (SQLite's own rule); WAL mode so that a reader
never waits for a writer, and a busy timeout so another process (a second server on the same file) waits
rather than fails.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..transcript import to_sharegpt

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}',
    messages TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS items (
    conversation TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (conversation, seq)
);
"""
TITLE_LIMIT = 200  # characters
UNTITLED = "New conversation"


class NotFound(KeyError):
    pass


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str
    created: float
    updated: float
    settings: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "created": self.created, "updated": self.updated,
                "settings": self.settings}


def default_path() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "codeact", "web.sqlite3")


class Store:
    """Usage:
        store = Store(path)
        conversation = store.create("Sales by month")
        store.append_item(conversation.id, "user", {"text": "..."})
        store.save_messages(conversation.id, session.messages)
    """

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.db = sqlite3.connect(path, timeout=10, isolation_level=None)  # autocommit; transactions explicit
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        os.chmod(path, 0o600)  # conversations are the user's own

    def close(self) -> None:
        self.db.close()

    def create(self, title: str = UNTITLED, settings: dict[str, Any] | None = None) -> Conversation:
        now = time.time()
        conversation = Conversation(uuid.uuid4().hex, clean_title(title), now, now, settings or {})
        self.db.execute("INSERT INTO conversations (id, title, created, updated, settings) VALUES (?, ?, ?, ?, ?)",
                        (conversation.id, conversation.title, now, now, json.dumps(conversation.settings)))
        return conversation

    def list(self) -> list[Conversation]:
        rows = self.db.execute("SELECT id, title, created, updated, settings FROM conversations "
                               "ORDER BY updated DESC").fetchall()
        return [Conversation(row[0], row[1], row[2], row[3], json.loads(row[4])) for row in rows]

    def get(self, conversation_id: str) -> Conversation:
        row = self.db.execute("SELECT id, title, created, updated, settings FROM conversations WHERE id = ?",
                              (conversation_id,)).fetchone()
        if row is None:
            raise NotFound(conversation_id)
        return Conversation(row[0], row[1], row[2], row[3], json.loads(row[4]))

    def rename(self, conversation_id: str, title: str) -> Conversation:
        self._update(conversation_id, "title = ?", clean_title(title))
        return self.get(conversation_id)

    def configure(self, conversation_id: str, settings: dict[str, Any]) -> Conversation:
        self._update(conversation_id, "settings = ?", json.dumps(settings))
        return self.get(conversation_id)

    def delete(self, conversation_id: str) -> None:
        if self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount == 0:
            raise NotFound(conversation_id)

    def messages(self, conversation_id: str) -> list[dict[str, str]]:
        row = self.db.execute("SELECT messages FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            raise NotFound(conversation_id)
        return json.loads(row[0])

    def save_messages(self, conversation_id: str, messages: list[dict[str, str]]) -> None:
        self._update(conversation_id, "messages = ?", json.dumps(messages, ensure_ascii=False))

    def append_item(self, conversation_id: str, kind: str, data: dict[str, Any]) -> int:
        """Add what the page shows; returns its sequence number within the conversation."""
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self._update(conversation_id, "updated = ?", now, touch=False)
            seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM items WHERE conversation = ?",
                                  (conversation_id,)).fetchone()[0]
            self.db.execute("INSERT INTO items (conversation, seq, kind, data, time) VALUES (?, ?, ?, ?, ?)",
                            (conversation_id, seq, kind, json.dumps(data, ensure_ascii=False), now))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return seq

    def items(self, conversation_id: str) -> list[dict[str, Any]]:
        self.get(conversation_id)
        rows = self.db.execute("SELECT seq, kind, data, time FROM items WHERE conversation = ? ORDER BY seq",
                               (conversation_id,)).fetchall()
        return [{"seq": seq, "kind": kind, "data": json.loads(data), "time": at} for seq, kind, data, at in rows]

    def export_jsonl(self, conversation_id: str) -> str:
        """The conversation as the SDK's transcript format (`codeact_sdk.transcript.read` reads it back)."""
        conversation = self.get(conversation_id)
        records = [{"type": "meta", "version": 1, "created": conversation.created, "title": conversation.title,
                    **{key: value for key, value in conversation.settings.items() if key == "model"}}]
        records += [{"type": "message", "role": m["role"], "content": m["content"]}
                    for m in self.messages(conversation_id)]
        return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)

    def export_sharegpt(self, conversation_id: str) -> dict[str, Any]:
        return to_sharegpt(self.messages(conversation_id))

    def _update(self, conversation_id: str, assignment: str, value: Any, touch: bool = True) -> None:
        sets = assignment + (", updated = ?" if touch else "")
        values = (value, time.time()) if touch else (value,)
        if self.db.execute(f"UPDATE conversations SET {sets} WHERE id = ?", (*values, conversation_id)).rowcount == 0:
            raise NotFound(conversation_id)


def clean_title(title: str) -> str:
    """One line of at most TITLE_LIMIT characters; never empty."""
    title = " ".join(str(title).split())[:TITLE_LIMIT]
    return title or UNTITLED
