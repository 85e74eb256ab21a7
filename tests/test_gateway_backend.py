"""The gateway backend against a real `jupyter kernelgateway` started here: the behaviours the local backend
has, through the gateway, plus the gateway being down or restarting."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import websocket

from codeact_sdk.errors import SandboxConnectionError
from codeact_sdk.local_sandbox import LocalSandbox
from model_server.stack import free_port
from sandbox_server.testing import KernelGateway
from tests.conftest import SandboxProcess, start_sandbox
from tests.test_sandbox_api import compat

TOKEN = "gateway-secret"


class CuttableProxy:
    """A TCP proxy in front of the gateway whose open connections the test can cut, as a network blip or a
    load balancer's idle timeout would; new connections go through as before."""

    def __init__(self, gateway: KernelGateway) -> None:
        self.upstream = ("127.0.0.1", gateway.port)
        self.token = gateway.token
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.pairs: list[tuple[socket.socket, socket.socket]] = []  # (our end, the gateway's end)
        self.unaware: set[socket.socket] = set()  # gateway ends of cut connections, left open on purpose
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                ours, _ = self.listener.accept()
            except OSError:  # closed
                return
            theirs = socket.create_connection(self.upstream, timeout=10)
            theirs.settimeout(None)
            with self.lock:
                self.pairs.append((ours, theirs))
            for source, target in ((ours, theirs), (theirs, ours)):
                threading.Thread(target=self.pump, args=(source, target), daemon=True).start()

    def pump(self, source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        for end in (source, target):  # pass the close on, except to a gateway that must not notice it
            if end not in self.unaware:
                shut(end)

    def cut(self, gateway_notices: bool = True) -> int:
        """Close every open connection on our side; on the gateway's too, unless `gateway_notices` is False,
        which leaves the gateway a stale connection it still believes in. Returns how many were cut."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
            if not gateway_notices:
                self.unaware.update(theirs for _, theirs in pairs)
        for ours, theirs in pairs:
            shut(ours)
            if gateway_notices:
                shut(theirs)
        return len(pairs)

    def close(self) -> None:
        self.listener.close()
        self.cut()
        for theirs in self.unaware:
            shut(theirs)


def shut(end: socket.socket) -> None:
    """shutdown(), not close(): close() would wait for the pump thread blocked in recv() on it."""
    with contextlib.suppress(OSError):
        end.shutdown(socket.SHUT_RDWR)


def gateway_sandbox(gateway: KernelGateway | CuttableProxy, tmp_path, *args: str) -> SandboxProcess:
    options = ["--backend", "gateway", "--gateway-url", gateway.url, "--interrupt-grace", "0.5",
               "--max-output", "200000", *args]
    if gateway.token:
        options += ["--gateway-token", gateway.token]
    return start_sandbox(str(tmp_path), *options, pool_size=2)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gateway = KernelGateway(free_port(), str(tmp_path_factory.mktemp("gateway")), TOKEN).start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def sandbox(gateway, tmp_path_factory):
    server = gateway_sandbox(gateway, tmp_path_factory.mktemp("gateway-sandbox"))
    yield server
    server.stop()


def test_state_and_structured_results(sandbox):
    session = sandbox.create()
    sandbox.execute(session, "x = 20")
    result = sandbox.execute(session, "print('out')\nx + 22")
    assert result["stdout"] == "out\n" and result["results"][0]["data"]["text/plain"] == "42"
    assert sandbox.execute(session, "1/0")["error"]["name"] == "ZeroDivisionError"
    sandbox.close(session)


def test_streaming_over_the_websocket(sandbox):
    session = sandbox.create()
    socket = websocket.create_connection(sandbox.url.replace("http", "ws") + f"/v1/sessions/{session}/ws", timeout=30)
    socket.send(json.dumps({"type": "execute", "code": "import time\nprint('a')\ntime.sleep(0.5)\nprint('b')"}))
    events = []
    while not events or events[-1]["type"] != "done":
        events.append(json.loads(socket.recv()))
    socket.close()
    assert [e.get("text") for e in events if e["type"] == "stdout"] == ["a\n", "b\n"]
    sandbox.close(session)


def test_input_round_trip_over_the_websocket(sandbox):
    session = sandbox.create()
    socket = websocket.create_connection(sandbox.url.replace("http", "ws") + f"/v1/sessions/{session}/ws", timeout=30)
    socket.send(json.dumps({"type": "execute", "code": "name = input('who? ')\nprint('hi', name)"}))
    assert json.loads(socket.recv()) == {"type": "input_request", "prompt": "who? ", "password": False}
    socket.send(json.dumps({"type": "input_reply", "value": "ada"}))
    events = []
    while not events or events[-1]["type"] != "done":
        events.append(json.loads(socket.recv()))
    socket.close()
    assert [e.get("text") for e in events if e["type"] == "stdout"] == ["hi ada\n"], events
    sandbox.close(session)


def test_timeout_interrupts_and_keeps_state(sandbox):
    session = sandbox.create()
    sandbox.execute(session, "kept = 3")
    result = sandbox.execute(session, "while True:\n    pass", timeout=1)
    assert result["status"] == "timeout"
    assert sandbox.execute(session, "print(kept)")["stdout"] == "3\n"
    sandbox.close(session)


def test_loop_swallowing_interrupts_is_replaced(sandbox):
    session = sandbox.create()
    code = "import time\nwhile True:\n    try:\n        time.sleep(0.01)\n    except KeyboardInterrupt:\n        pass"
    started = time.monotonic()
    result = sandbox.execute(session, code, timeout=1)
    assert result["status"] == "restarted" and result["new_kernel"] is True
    assert time.monotonic() - started < 10
    assert sandbox.execute(session, "print('fresh')")["stdout"] == "fresh\n"
    sandbox.close(session)


def test_kernel_death_is_reported_and_replaced(sandbox):
    session = sandbox.create()
    started = time.monotonic()
    result = sandbox.execute(session, "import os\nos._exit(1)", timeout=30)
    assert result["status"] == "died" and result["new_kernel"] is True
    assert time.monotonic() - started < 10
    assert sandbox.execute(session, "print('after')")["stdout"] == "after\n"
    sandbox.close(session)


def test_output_flood_is_capped(sandbox):
    session = sandbox.create()
    result = sandbox.execute(session, "print('x' * 50_000_000)", timeout=60)
    assert result["truncated"] is True and len(result["stdout"]) < 250_000
    sandbox.close(session)


def test_compat_route(sandbox):
    assert compat(sandbox, "gw", "print(2 + 2)") == {"result": "4\n", "new_kernel_created": True}
    assert compat(sandbox, "gw", "y = 1")["result"] == "[Code executed successfully with no output]"


def test_files_travel_through_the_kernel(sandbox):
    session = sandbox.create()
    base = f"/v1/sessions/{session}/files"
    payload = bytes(range(256)) * 5000  # over one transfer chunk
    assert sandbox.request("PUT", base + "/data/blob.bin", data=payload).status_code == 201
    assert sandbox.execute(session, "print(len(open('data/blob.bin', 'rb').read()))")["stdout"] == "1280000\n"
    assert sandbox.request("GET", base + "/data/blob.bin").content == payload
    assert "data/blob.bin" in {f["path"] for f in sandbox.request("GET", base).json()["files"]}
    assert sandbox.request("GET", base + "/../etc/passwd").status_code in (400, 404)
    assert sandbox.request("DELETE", base + "/data/blob.bin").status_code == 204
    assert sandbox.request("GET", base + "/data/blob.bin").status_code == 404
    sandbox.close(session)


def test_delete_or_restart_mid_execute_ends_it_at_once(sandbox):
    """Killing a gateway kernel closes our websocket; the execute must end then, not reconnect to a kernel
    the gateway is still shutting down (which held it about 30 s)."""
    for action, status in (("DELETE", "closed"), ("restart", "died")):
        session = sandbox.create()
        with ThreadPoolExecutor(1) as executor:
            running = executor.submit(sandbox.request, "POST", f"/v1/sessions/{session}/execute",
                                      json={"code": "import time\ntime.sleep(30)"})
            time.sleep(1)
            started = time.monotonic()
            if action == "DELETE":
                sandbox.request("DELETE", f"/v1/sessions/{session}")
            else:
                sandbox.request("POST", f"/v1/sessions/{session}/restart")
            response = running.result(60)
        took = time.monotonic() - started
        assert took < 10, f"the execute outlived the {action} by {took:.0f} s"
        assert response.json()["status"] == status
        if action == "restart":
            sandbox.close(session)


def test_gateway_down_at_start_is_a_clear_error(tmp_path):
    with pytest.raises(SandboxConnectionError) as caught:
        LocalSandbox("--backend", "gateway", "--gateway-url", f"http://127.0.0.1:{free_port()}",
                     token="", root_dir=str(tmp_path), start_timeout=30).start()
    assert "is not usable" in str(caught.value) and "--gateway-url" in str(caught.value)


def test_wrong_gateway_token_is_a_clear_error(gateway, tmp_path):
    with pytest.raises(SandboxConnectionError) as caught:
        LocalSandbox("--backend", "gateway", "--gateway-url", gateway.url, "--gateway-token", "wrong",
                     token="", root_dir=str(tmp_path), start_timeout=30).start()
    assert "403" in str(caught.value) or "401" in str(caught.value)


def test_gateway_restart_mid_session_gives_a_new_kernel(tmp_path):
    gateway = KernelGateway(free_port(), str(tmp_path)).start()
    server = gateway_sandbox(gateway, tmp_path / "sandbox")
    try:
        session = server.create()
        server.execute(session, "lost = 1")
        gateway.stop()
        gateway = KernelGateway(gateway.port, str(tmp_path)).start()
        result = server.execute(session, "print('again')")
        assert result["stdout"] == "again\n" and result["new_kernel"] is True, result
        assert server.execute(session, "lost")["error"]["name"] == "NameError"
    finally:
        server.stop()
        gateway.stop()


@pytest.mark.parametrize("gateway_notices", [True, False], ids=["both-sides-closed", "gateway-unaware"])
def test_websocket_cut_mid_execute_keeps_the_kernel_and_the_result(gateway, tmp_path, gateway_notices):
    """We reconnect with the same session id. A gateway that saw the drop kept the kernel's messages and
    replays them; one that did not replaces its stale connection with ours."""
    proxy = CuttableProxy(gateway)
    server = gateway_sandbox(proxy, tmp_path)
    try:
        session = server.create()
        server.execute(session, "kept = 'state'")
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(server.execute, session, "import time\nprint('before', flush=True)\n"
                                  "time.sleep(2)\nprint('after')\nvalue = 42", timeout=20)
            time.sleep(1)
            assert proxy.cut(gateway_notices) >= 1
            result = running.result(timeout=30)
        assert (result["status"], result["stdout"], result["new_kernel"]) == ("ok", "before\nafter\n", False), result
        after = server.execute(session, "print(kept, value)")
        assert after["stdout"] == "state 42\n" and not after["new_kernel"], after
    finally:
        server.stop()
        proxy.close()


def test_host_tools_are_called_from_kernels_on_the_gateway(sandbox):
    from codeact_sdk import Session, events
    from codeact_sdk.testing import ScriptedModelServer

    ledger = {"balance": 10}

    def withdraw(amount: int) -> int:
        """Take money from the host's ledger; the new balance."""
        ledger["balance"] -= amount
        return ledger["balance"]

    with ScriptedModelServer() as model:
        model.enqueue("<execute>print([withdraw(1) for _ in range(5)])</execute>", "<solution>5</solution>")
        with Session(llm_url=model.url, sandbox_url=sandbox.url, sandbox_token=sandbox.token,
                     tools=[withdraw]) as session:
            seen = list(session.stream("spend 5"))
    execution = next(e.execution for e in seen if isinstance(e, events.ExecutionFinished))
    assert execution.stdout == "[9, 8, 7, 6, 5]\n", execution.text
    assert ledger["balance"] == 5
