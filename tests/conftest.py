"""Fixtures: real sandbox servers started as processes on 127.0.0.1, port 0, and stopped after."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest
import requests

PORT_LINE = re.compile(r"sandbox server on http://([\d.]+):(\d+)")


@dataclass
class SandboxProcess:
    """A sandbox server running as a child process; `log` collects its output."""

    process: subprocess.Popen
    url: str
    root_dir: str
    token: str | None
    log: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, **kwargs)

    def create(self, **body) -> str:
        response = self.request("POST", "/v1/sessions", json=body)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def execute(self, session_id: str, code: str, **body) -> dict:
        response = self.request("POST", f"/v1/sessions/{session_id}/execute", json={"code": code, **body})
        assert response.status_code == 200, response.text
        return response.json()

    def close(self, session_id: str) -> None:
        self.request("DELETE", f"/v1/sessions/{session_id}")

    def kernel_pids(self) -> list[int]:
        return processes_mentioning(self.root_dir)

    def stop(self, timeout: float = 10.0) -> float:
        """SIGTERM, and the seconds it took to exit."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                raise AssertionError(f"server did not exit within {timeout} s of SIGTERM")
        return time.monotonic() - started


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


def start_sandbox(root_dir: str, *args: str, token: str | None = None, timeout: float = 60.0) -> SandboxProcess:
    command = [sys.executable, "-m", "sandbox_server", "--port", "0", "--root-dir", root_dir, *args]
    if token:
        command += ["--token", token]
    env = {k: v for k, v in os.environ.items() if k != "CODEACT_SANDBOX_TOKEN"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    found = threading.Event()
    address: list[str] = []

    def read_output() -> None:
        for line in process.stdout:
            lines.append(line)
            match = PORT_LINE.search(line)
            if match and not found.is_set():
                address.append(f"http://{match.group(1)}:{match.group(2)}")
                found.set()

    threading.Thread(target=read_output, daemon=True).start()
    if not found.wait(timeout):
        process.kill()
        raise RuntimeError("sandbox server did not start:\n" + "".join(lines))
    server = SandboxProcess(process, address[0], root_dir, token, lines)
    # Wait for the warm pool, so the first test does not measure boots.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = requests.get(server.url + "/health", timeout=5).json()
        if health["pool_ready"] >= 1:
            break
        time.sleep(0.05)
    return server


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    server = start_sandbox(str(tmp_path_factory.mktemp("sandbox")), "--pool-size", "3",
                           "--interrupt-grace", "0.5",
                           "--max-output", "200000", "--file-size-limit", str(32 * 1024**2))
    yield server
    server.stop()
    assert server.kernel_pids() == [], "kernels outlived the server"


@pytest.fixture(scope="session")
def capabilities():
    """What isolation this machine allows, as the server probes it (tests that need a piece skip without it)."""
    from sandbox_server import isolation

    return isolation.probe()
