"""The web chat's conversation store: SQLite, surviving restarts, exportable."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from codeact_sdk.transcript import read
from codeact_sdk.web.store import TITLE_LIMIT, NotFound, Store

HISTORY = [{"role": "system", "content": "You are CodeAct."}, {"role": "user", "content": "Sum 1..10 ✓"},
           {"role": "assistant", "content": "<execute>print(sum(range(11)))</execute>"},
           {"role": "user", "content": "Execution Output:\n55\n"},
           {"role": "assistant", "content": "<solution>55</solution>"}]


def test_conversations_are_created_listed_renamed_and_deleted(tmp_path):
    store = Store(str(tmp_path / "web.sqlite3"))
    first = store.create("Sales\nby   month", {"model": "m", "max_executions": 5})
    second = store.create("")
    assert (first.title, second.title) == ("Sales by month", "New conversation")
    assert [c.id for c in store.list()] == [second.id, first.id]  # the latest first
    store.append_item(first.id, "user", {"text": "hi"})  # activity moves a conversation up
    assert [c.id for c in store.list()] == [first.id, second.id]
    assert store.rename(second.id, "x" * 500).title == "x" * TITLE_LIMIT
    assert store.configure(first.id, {"model": "other"}).settings == {"model": "other"}
    store.append_item(second.id, "user", {"text": "gone with it"})
    store.delete(second.id)
    assert [c.id for c in store.list()] == [first.id]
    assert store.db.execute("SELECT COUNT(*) FROM items WHERE conversation = ?", (second.id,)).fetchone() == (0,)
    for call in (lambda: store.get(second.id), lambda: store.rename(second.id, "t"), lambda: store.delete(second.id),
                 lambda: store.items(second.id), lambda: store.messages("nope"),
                 lambda: store.append_item("nope", "user", {}), lambda: store.save_messages("nope", [])):
        with pytest.raises(NotFound):
            call()


def test_a_conversation_survives_a_restart_and_exports_as_transcript_and_sharegpt(tmp_path):
    path = str(tmp_path / "data" / "web.sqlite3")
    store = Store(path)
    conversation = store.create("Sums", {"model": "qwen"})
    assert [store.append_item(conversation.id, kind, data) for kind, data in [
        ("user", {"text": "Sum 1..10 ✓"}), ("cell", {"code": "print(sum(range(11)))", "stdout": "55\n"}),
        ("answer", {"text": "55"})]] == [1, 2, 3]
    store.save_messages(conversation.id, HISTORY)
    store.close()

    reopened = Store(path)  # as a restarted server opens it
    assert [c.title for c in reopened.list()] == ["Sums"]
    assert [(i["seq"], i["kind"]) for i in reopened.items(conversation.id)] == [(1, "user"), (2, "cell"), (3, "answer")]
    assert reopened.items(conversation.id)[0]["data"] == {"text": "Sum 1..10 ✓"}
    assert reopened.messages(conversation.id) == HISTORY
    exported = tmp_path / "export.jsonl"
    exported.write_text(reopened.export_jsonl(conversation.id), encoding="utf-8")
    meta, messages = read(str(exported))  # what Session.resume and `codeact chat --resume` read
    assert messages == HISTORY and meta["title"] == "Sums" and meta["model"] == "qwen"
    shared = reopened.export_sharegpt(conversation.id)
    assert [turn["from"] for turn in shared["conversations"]] == ["system", "human", "gpt", "human", "gpt"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_two_servers_on_one_file_do_not_lose_each_others_writes(tmp_path):
    path = str(tmp_path / "web.sqlite3")
    store = Store(path)
    conversation = store.create("shared")
    other = subprocess.Popen([sys.executable, "-c", f"""
from codeact_sdk.web.store import Store
store = Store({path!r})
for number in range(50):
    store.append_item({conversation.id!r}, "user", {{"text": f"other {{number}}"}})
"""], stderr=subprocess.PIPE, text=True)
    for number in range(50):  # while the other process writes
        store.append_item(conversation.id, "user", {"text": f"mine {number}"})
    assert other.wait(60) == 0, other.stderr.read()
    other.stderr.close()
    items = store.items(conversation.id)
    assert [i["seq"] for i in items] == list(range(1, 101))
    texts = [i["data"]["text"] for i in items]
    assert sorted(texts) == sorted([f"mine {n}" for n in range(50)] + [f"other {n}" for n in range(50)])
