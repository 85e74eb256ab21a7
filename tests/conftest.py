"""Fixtures: real sandbox servers started as processes on 127.0.0.1, port 0, and stopped after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from codeact_sdk.local_sandbox import LocalSandbox
from codeact_sdk.testing import ScriptedModelServer
from sandbox_server.testing import descendants, still_running

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

# A shell starts a command put in the background (`make test &`, nohup) with SIGINT ignored, every process it
# starts inherits that, and Python then never raises KeyboardInterrupt: the tests that press Ctrl-C in the CLI
# would fail for how the suite was started. A handler here is reset to the default in every process started.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass
class SandboxProcess:
    """A sandbox server running as a child process, with request helpers for tests."""

    server: LocalSandbox
    root_dir: str

    @property
    def process(self) -> subprocess.Popen:
        return self.server.process

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def token(self) -> str:
        return self.server.token

    @property
    def log(self) -> list[str]:
        return self.server.log_tail(1_000_000).splitlines()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, **kwargs)

    def create(self, **body) -> str:
        response = self.request("POST", "/v1/sessions", json=body)
        assert response.status_code == 201, self.explain(response)
        return response.json()["id"]

    def execute(self, session_id: str, code: str, **body) -> dict:
        response = self.request("POST", f"/v1/sessions/{session_id}/execute", json={"code": code, **body})
        assert response.status_code == 200, self.explain(response)
        return response.json()

    def explain(self, response: requests.Response) -> str:
        """An unexpected answer, with the end of the server's log: a server error's cause is only there, and the
        log goes with the test's directory."""
        lines = [line for line in self.log if "GET /health" not in line]  # (what waiting for the pool logs)
        return f"{response.status_code} {response.text}\n--- the server's log, its end:\n" + "\n".join(lines[-60:])

    def close(self, session_id: str) -> None:
        self.request("DELETE", f"/v1/sessions/{session_id}")

    def kernel_pids(self) -> list[int]:
        return processes_mentioning(self.root_dir)

    def memory_kb(self, field: str = "VmRSS") -> int:
        """The server's memory now (VmRSS), or at its peak so far (VmHWM)."""
        with open(f"/proc/{self.process.pid}/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))

    def stop(self, timeout: float = 10.0) -> float:
        """SIGTERM, and the seconds it took to exit; fails past `timeout`, or when any process it started (its
        template, kernels, their lifelines, what they ran) outlives it."""
        started = descendants(self.process.pid) if self.process.poll() is None else []
        took = self.server.stop(timeout)
        assert took < timeout, f"server did not exit within {timeout} s of SIGTERM"
        deadline = time.monotonic() + 10
        while (left := still_running(started)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left, f"outlived the server: {left}"
        return took


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line mentions `text` (kernels carry their connection file's path)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if text.encode() in handle.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def operator_venv(path: Path) -> tuple[str, Path]:
    """An operator's own kernel environment at `path`: a venv that reaches this one's packages (ipykernel)
    through a .pth file, as a real deployment would by `pip install 'codeact[kernel]'`. Its python, and its
    site-packages directory for the test to add modules to."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    site = next((path / "lib").glob("python3*/site-packages"))
    (site / "server-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(path / "bin" / "python"), site


def start_sandbox(root_dir: str, *args: str, token: str = "", pool_size: int | None = None) -> SandboxProcess:
    """A server on a free port; open (no token) unless one is given; warm before it is returned."""
    server = LocalSandbox(*args, pool_size=pool_size or 1, token=token, root_dir=root_dir).start()
    try:
        server.wait_for_pool(1)
    except BaseException:
        server.stop()  # with its workspace: a test that fails here leaves nothing behind
        raise
    return SandboxProcess(server, root_dir)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    server = start_sandbox(str(tmp_path_factory.mktemp("sandbox")), "--interrupt-grace", "0.5",
                           "--max-output", "200000", "--file-size-limit", str(32 * 1024**2), pool_size=3)
    yield server
    server.stop()
    assert server.kernel_pids() == [], "kernels outlived the server"


@pytest.fixture(scope="session")
def capabilities():
    """What isolation this machine allows, as the server probes it (tests that need a piece skip without it)."""
    from sandbox_server import isolation, kernel_env

    return isolation.probe(kernel_env.inspect())


@pytest.fixture(scope="module")
def local_sandbox(tmp_path_factory):
    """A private sandbox server (LocalSandbox, with a token) for one test module: the SDK's tests use it."""
    with LocalSandbox(pool_size=2, root_dir=str(tmp_path_factory.mktemp("local-sandbox"))) as server:
        server.wait_for_pool(1)
        yield server


@pytest.fixture
def model():
    """The scripted model server: queue replies with `model.enqueue(...)`."""
    with ScriptedModelServer() as server:
        yield server


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll `predicate` until it holds; an AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
