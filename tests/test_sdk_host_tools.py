"""Host tools ("code mode"): callables that run in the embedding process, called from sandbox code over the
session's own channel. Real kernels, a real sandbox server, the scripted model server."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from typing import Dict, List  # noqa: UP035 - the annotations users write, which must work in both modes

from codeact_sdk import Session, events, tool
from codeact_sdk.transcript import read


def session(model, local_sandbox, **options) -> Session:
    return Session(llm_url=model.url, sandbox_url=local_sandbox.url, sandbox_token=local_sandbox.token, **options)


def run_code(model, local_sandbox, code: str, **options) -> tuple[list, object]:
    """Run `code` as the model's one action; the session's events and the execution."""
    model.enqueue(f"<execute>{code}</execute>", "<solution>done</solution>")
    with session(model, local_sandbox, **options) as s:
        seen = list(s.stream("go"))
    execution = next(e.execution for e in seen if isinstance(e, events.ExecutionFinished))
    return seen, execution


class Inventory:
    """A service object holding a live connection the kernel never sees."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def stock(self, item: str) -> int:
        """Units of an item in stock."""
        row = self.connection.execute("SELECT units FROM stock WHERE item = ?", (item,)).fetchone()
        return row[0] if row else 0


def database() -> sqlite3.Connection:
    connection = sqlite3.connect(":memory:", check_same_thread=False)
    connection.execute("CREATE TABLE stock (item TEXT, units INTEGER)")
    connection.executemany("INSERT INTO stock VALUES (?, ?)", [("apple", 3), ("pear", 5)])
    return connection


def test_a_closure_and_a_bound_method_over_a_live_connection_run_in_the_host_a_thousand_times(model, local_sandbox):
    connection = database()
    calls = []

    def items(prefix: str = "") -> List[Dict]:  # noqa: UP006
        """Items whose name starts with a prefix."""
        calls.append(threading.get_ident())
        rows = connection.execute("SELECT item, units FROM stock WHERE item LIKE ?", (prefix + "%",))
        return [{"item": item, "units": units} for item, units in rows]

    inventory = Inventory(connection)
    code = ("total = 0\nfor i in range(1000):\n    total += stock('apple' if i % 2 else 'pear')\n"
            "print(total, items('a'), items.__doc__)\nimport inspect\nprint(inspect.signature(items))")
    seen, execution = run_code(model, local_sandbox, code, tools=[items, tool(inventory.stock, name="stock")])
    assert execution.status == "ok", execution.text
    assert execution.stdout == ("4000 [{'item': 'apple', 'units': 3}] Items whose name starts with a prefix.\n"
                                "(prefix: 'str' = '') -> 'List[Dict]'\n")
    assert len(calls) == 1 and calls[0] != threading.get_ident()  # ran here, in the SDK's worker
    tool_calls = [e for e in seen if isinstance(e, events.ToolCall)]
    results = [e for e in seen if isinstance(e, events.ToolResult)]
    assert len(tool_calls) == len(results) == 1001
    assert tool_calls[0] == events.ToolCall("stock", ["pear"], {}) and results[0].value == 5
    system = model.requests[0]["messages"][0]["content"]
    assert "stock(item: str) -> int" in system and "items(prefix: str = '') -> List[Dict]" in system
    # The kernel never held the connection: nothing of it is reachable there.
    assert "sqlite3" not in execution.stdout


def test_host_errors_and_timeouts_are_tool_errors_in_the_kernel_and_the_session_goes_on(model, local_sandbox):
    def fails(x: int) -> int:
        """Always fails."""
        raise ValueError(f"bad input {x} (secret host detail)")

    def hangs() -> None:
        """Never answers in time."""
        time.sleep(5)

    code = ("for call in (lambda: fails(3), hangs):\n    try:\n        call()\n"
            "    except ToolError as error:\n        print(type(error).__name__, '|', error)\nprint(fails.__doc__)")
    started = time.monotonic()
    seen, execution = run_code(model, local_sandbox, code, tools=[fails, hangs], tool_timeout=1.0)
    assert time.monotonic() - started < 4.5
    lines = execution.stdout.splitlines()
    assert lines[0] == "ToolError | fails: ValueError: bad input 3 (secret host detail)"
    assert lines[1] == "ToolError | hangs: no result within 1 s (tool_timeout)"
    assert "Traceback" not in execution.stdout  # the host's traceback stays on the host...
    failed = next(e for e in seen if isinstance(e, events.ToolResult) and e.name == "fails")
    assert "raise ValueError" in failed.traceback  # ...where the embedder sees it
    # Opting in sends it to the kernel too.
    _, shown = run_code(model, local_sandbox, "try:\n    fails(1)\nexcept ToolError as e:\n    print(e)",
                        tools=[fails], tool_tracebacks=True)
    assert "Host traceback:" in shown.stdout and "raise ValueError" in shown.stdout


def test_async_tools_run_on_an_event_loop_in_the_host(model, local_sandbox):
    async def double_later(x: int) -> int:
        """Double, after a pause."""
        await asyncio.sleep(0.01)
        return 2 * x

    async def echo_bytes(data: bytes) -> bytes:
        return data[::-1]

    _, execution = run_code(model, local_sandbox, "print(double_later(21), echo_bytes(b'abc'))",
                            tools=[double_later, echo_bytes])
    assert execution.stdout == "42 b'cba'\n", execution.text


def test_the_approval_hook_refuses_calls_and_sees_their_arguments(model, local_sandbox, tmp_path):
    sent = []

    def send_email(to: str, body: str) -> str:
        """Send an email (a side effect)."""
        sent.append(to)
        return "sent"

    def approve(call) -> bool:
        return call.kwargs.get("to", "").endswith("@example.com")

    code = ("for to in ['a@example.com', 'boss@elsewhere.org']:\n    try:\n"
            "        print(send_email(to=to, body='hi'))\n    except ToolError as error:\n        print(error)")
    _, execution = run_code(model, local_sandbox, code, tools=[send_email], on_tool_call=approve,
                            transcript_path=str(tmp_path / "t.jsonl"))
    assert execution.stdout == "sent\nsend_email: the call was refused by the host\n"
    assert sent == ["a@example.com"]
    records = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    tool_records = [r for r in records if r.get("type") == "tool_call"]
    assert [r["error"] for r in tool_records] == [None, "send_email: the call was refused by the host"]
    assert tool_records[0]["kwargs"] == {"to": "a@example.com", "body": "hi"} and tool_records[0]["value"] == "sent"
    assert read(str(tmp_path / "t.jsonl"))[1]  # the transcript still reads back as a conversation


def test_only_the_sessions_tools_only_during_an_execute_only_over_its_channel(model, local_sandbox):
    def secret() -> str:
        return "host secret"

    first = ("try:\n    _codeact_call('__import__', ['os'], {})\nexcept ToolError as e:\n    print(e)\n"
             "import threading, time\nlate = []\n"
             "def later():\n    time.sleep(0.5)\n    try:\n        late.append(secret())\n"
             "    except ToolError as e:\n        late.append(str(e))\n"
             "threading.Thread(target=later).start()")
    model.enqueue(f"<execute>{first}</execute>", "<solution>started</solution>",
                  "<execute>print(late)</execute>", "<solution>done</solution>")
    with session(model, local_sandbox, tools=[secret]) as s:
        reply = s.chat("go")
        assert reply.executions[0].stdout == "'__import__' is not a tool of this session\n", reply.executions[0].text
        time.sleep(1.5)  # the thread calls while no execute runs
        later = s.chat("and then?").executions[0]
        assert later.stdout == "['secret: host tools can only be called while code is executing']\n", later.text
        # An execute over plain HTTP has no channel back to the SDK.
        plain = s._sandbox._call("POST", f"/v1/sessions/{s._sandbox_session}/execute",
                                 json={"code": "try:\n    secret()\nexcept ToolError as e:\n    print(e)"}).json()
        assert "host tools answer over the SDK's websocket" in plain["stdout"], plain


def test_shipped_tools_keep_typing_annotations_and_stay_available(model, local_sandbox):
    @tool(ship=True)
    def pairs(n: int) -> List[Dict]:  # noqa: UP006
        """Pairs up to n, computed inside the kernel."""
        return [{"i": i} for i in range(n)]

    _, execution = run_code(model, local_sandbox, "print(pairs(2), pairs.__annotations__)", tools=[pairs])
    assert execution.stdout == "[{'i': 0}, {'i': 1}] {'n': 'int', 'return': 'List[Dict]'}\n", execution.text
