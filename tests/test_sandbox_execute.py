"""Executing code through the sandbox server: state, outputs, images, streaming, input."""

from __future__ import annotations

import base64
import json

import websocket

PNG_CODE = """
import base64
from IPython.display import Image, display
png = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
display(Image(data=png))
"""


def stream(sandbox, session_id: str, messages: list[dict], until_done: int = 1) -> list[dict]:
    """Send messages over the session websocket and collect events until `until_done` done events."""
    url = sandbox.url.replace("http", "ws") + f"/v1/sessions/{session_id}/ws"
    socket = websocket.create_connection(url, timeout=60, header=[f"{k}: {v}" for k, v in sandbox.headers.items()])
    try:
        for message in messages:
            socket.send(json.dumps(message))
        events, done = [], 0
        while done < until_done:
            event = json.loads(socket.recv())
            events.append(event)
            done += event["type"] == "done"
        return events
    finally:
        socket.close()


def test_state_persists_across_executes(sandbox):
    session = sandbox.create()
    assert sandbox.execute(session, "x = 41")["status"] == "ok"
    result = sandbox.execute(session, "x + 1")
    assert result["results"][0]["data"]["text/plain"] == "42"
    assert result["execution_count"] == 2
    sandbox.close(session)


def test_error_is_data_with_name_value_and_clean_traceback(sandbox):
    session = sandbox.create()
    result = sandbox.execute(session, "1/0")
    assert result["status"] == "error"
    assert result["error"]["name"] == "ZeroDivisionError"
    assert "\x1b[" not in "".join(result["error"]["traceback"]), "ANSI codes must be stripped"
    assert "ZeroDivisionError" in result["text"]
    sandbox.close(session)


def test_stdout_stderr_and_text_rendering(sandbox):
    session = sandbox.create()
    result = sandbox.execute(session, "import sys\nprint('out')\nprint('err', file=sys.stderr)\n'value'")
    assert result["stdout"] == "out\n"
    assert result["stderr"] == "err\n"
    assert result["text"] == "out\nerr\n'value'\n"
    sandbox.close(session)


def test_images_stay_base64_bytes_in_mime_bundles(sandbox):
    session = sandbox.create()
    result = sandbox.execute(session, PNG_CODE)
    display = [r for r in result["results"] if r["type"] == "display"]
    assert display and base64.b64decode(display[0]["data"]["image/png"]).startswith(b"\x89PNG")
    assert "iVBOR" not in result["text"], "the text rendering carries no image bytes"
    sandbox.close(session)


def test_websocket_streams_events_in_order_then_done(sandbox):
    session = sandbox.create()
    code = "import sys, time\nprint('a')\ntime.sleep(0.5)\nprint('b', file=sys.stderr)\ntime.sleep(0.5)\nprint('c')\n7"
    events = stream(sandbox, session, [{"type": "execute", "code": code}])
    kinds = [(e["type"], e.get("text") or e.get("data", {}).get("text/plain")) for e in events]
    assert kinds == [("stdout", "a\n"), ("stderr", "b\n"), ("stdout", "c\n"), ("result", "7"), ("done", None)]
    assert events[-1]["status"] == "ok"
    sandbox.close(session)


def test_websocket_queues_executes_and_reports_protocol_errors(sandbox):
    session = sandbox.create()
    events = stream(sandbox, session, [
        {"type": "nonsense"},
        {"type": "execute"},
        {"type": "execute", "code": "a = 1"},
        {"type": "execute", "code": "print(a + 1)"},
    ], until_done=2)
    errors = [e for e in events if e["type"] == "protocol_error"]
    assert len(errors) == 2 and "unknown message type" in errors[0]["message"]
    assert [e["text"] for e in events if e["type"] == "stdout"] == ["2\n"]
    sandbox.close(session)


def test_input_gets_input_request_over_websocket(sandbox):
    session = sandbox.create()
    url = sandbox.url.replace("http", "ws") + f"/v1/sessions/{session}/ws"
    socket = websocket.create_connection(url, timeout=30)
    socket.send(json.dumps({"type": "execute", "code": "name = input('who? ')\nprint('hi', name)"}))
    request = json.loads(socket.recv())
    assert request == {"type": "input_request", "prompt": "who? ", "password": False}
    socket.send(json.dumps({"type": "input_reply", "value": "ada"}))
    events = []
    while not events or events[-1]["type"] != "done":
        events.append(json.loads(socket.recv()))
    socket.close()
    assert any(e.get("text") == "hi ada\n" for e in events)
    sandbox.close(session)


def test_input_over_http_is_a_clear_error_not_a_hang(sandbox):
    session = sandbox.create()
    result = sandbox.execute(session, "input('x')", timeout=10)
    assert result["status"] == "error"
    assert result["error"]["name"] == "StdinNotImplementedError"
    assert result["duration_ms"] < 5000
    sandbox.close(session)


def test_setup_code_and_env_apply_before_the_session_is_handed_out(sandbox):
    session = sandbox.create(setup="def double(x):\n    return 2 * x\n", env={"GREETING": "hello"})
    result = sandbox.execute(session, "import os\nprint(double(21), os.environ['GREETING'])")
    assert result["stdout"] == "42 hello\n"
    assert result["execution_count"] == 1, "setup code must not consume execution counts"
    sandbox.close(session)


def test_failing_setup_code_is_a_400_naming_the_error(sandbox):
    response = sandbox.request("POST", "/v1/sessions", json={"setup": "raise ValueError('nope')"})
    assert response.status_code == 400
    assert "ValueError" in response.json()["message"]


def test_interrupt_route_stops_a_running_execute(sandbox):
    import threading

    session = sandbox.create()
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(sandbox.execute(session, "import time\ntime.sleep(30)")))
    worker.start()
    import time

    time.sleep(1.0)
    assert sandbox.request("POST", f"/v1/sessions/{session}/interrupt").status_code == 200
    worker.join(20)
    assert outcome["status"] == "error" and outcome["error"]["name"] == "KeyboardInterrupt"
    assert sandbox.execute(session, "1")["status"] == "ok"
    sandbox.close(session)


def test_restart_route_gives_fresh_state_and_keeps_files(sandbox):
    session = sandbox.create()
    sandbox.execute(session, "x = 1\nopen('kept.txt', 'w').write('still here')")
    response = sandbox.request("POST", f"/v1/sessions/{session}/restart")
    assert response.status_code == 200
    result = sandbox.execute(session, "print(open('kept.txt').read())\nx")
    assert result["stdout"] == "still here\n"
    assert result["error"]["name"] == "NameError"
    sandbox.close(session)


def test_input_on_the_first_execute_of_a_fresh_kernel_is_answered(tmp_path):
    """A cold kernel used at once (no pool): its stdin channel must be connected before the first execute.
    Before the fix, 4 of 30 such input() calls were never relayed and hung until the timeout."""
    from codeact_sdk.local_sandbox import LocalSandbox
    from tests.conftest import SandboxProcess

    server = SandboxProcess(LocalSandbox(pool_size=0, token="", root_dir=str(tmp_path)).start(), str(tmp_path))
    try:
        statuses = []
        for _ in range(24):
            session = server.create()
            url = server.url.replace("http", "ws") + f"/v1/sessions/{session}/ws"
            socket = websocket.create_connection(url, timeout=30)
            socket.send(json.dumps({"type": "execute", "code": "print(input('who? '))", "timeout": 5}))
            while (event := json.loads(socket.recv()))["type"] != "done":
                if event["type"] == "input_request":
                    socket.send(json.dumps({"type": "input_reply", "value": "ada"}))
            statuses.append(event["status"])
            socket.close()
            server.close(session)
        assert statuses == ["ok"] * 24, statuses
    finally:
        server.stop()
