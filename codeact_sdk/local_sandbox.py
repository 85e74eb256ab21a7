"""A private sandbox server on a free loopback port, started as a child process and stopped on close.

Used by `Session()` when no sandbox URL is given and the `[server]` extra is installed, and by the tests
and benchmarks. Talks to the server only through its command line: the SDK never imports tornado.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import requests

from .errors import ConfigError, SandboxConnectionError


def server_installed() -> bool:
    return importlib.util.find_spec("sandbox_server") is not None and importlib.util.find_spec("tornado") is not None


class LocalSandbox:
    """Start with `LocalSandbox(pool_size=2).start()`; `url` and `token` are then set; `stop()` ends it.

    Usage:
        with LocalSandbox() as sandbox:
            print(sandbox.url)
    """

    def __init__(self, *args: str, pool_size: int = 1, token: str | None = None, root_dir: str | None = None,
                 start_timeout: float = 60.0) -> None:
        self.extra_args = list(args)
        self.pool_size = pool_size
        self.token = token if token is not None else secrets.token_urlsafe(24)
        self.root_dir = root_dir
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.url: str | None = None
        self.workspace = tempfile.mkdtemp(prefix="codeact-sandbox-")
        self.log_path = os.path.join(self.workspace, "server.log")

    def start(self) -> LocalSandbox:
        if not server_installed():
            raise ConfigError("no sandbox_url given and the sandbox server is not installed: pass sandbox_url= "
                              "(or set CODEACT_SANDBOX_URL), or install the extra: pip install 'codeact[server]'")
        os.makedirs(self.workspace, exist_ok=True)  # again after a stop()
        port_file = os.path.join(self.workspace, "port")
        command = [sys.executable, "-m", "sandbox_server", "--port", "0", "--port-file", port_file,
                   "--pool-size", str(self.pool_size), *self.extra_args]
        if self.root_dir:
            command += ["--root-dir", self.root_dir]
        env = dict(os.environ)
        env.pop("CODEACT_SANDBOX_TOKEN", None)
        if self.token:
            env["CODEACT_SANDBOX_TOKEN"] = self.token  # through the environment: argv is world-readable
        setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
        if setpriv:
            # The private server (and so its kernels) dies with this process, however this process ends.
            command = [setpriv, "--pdeathsig", "TERM", "--", *command]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=env)
        deadline = time.monotonic() + self.start_timeout
        while not os.path.exists(port_file):
            if self.process.poll() is not None:
                raise self._start_failed("exited at start-up")
            if time.monotonic() > deadline:
                raise self._start_failed(f"did not start within {self.start_timeout:g} s")
            time.sleep(0.02)
        with open(port_file) as handle:
            self.url = f"http://127.0.0.1:{int(handle.read())}"
        return self

    def _start_failed(self, what: str) -> SandboxConnectionError:
        """Stop what started; the error keeps the log's last lines, which stop() removes."""
        tail = self.log_tail()
        self.stop()
        return SandboxConnectionError(f"the private sandbox server {what}:\n{tail}")

    def wait_for_pool(self, count: int = 1, timeout: float = 60.0) -> None:
        """Block until `count` warm kernels are ready (benchmarks and tests measure warm paths)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if requests.get(self.url + "/health", timeout=5).json()["pool_ready"] >= count:
                return
            time.sleep(0.05)
        raise SandboxConnectionError(f"the sandbox pool did not reach {count} ready kernels within {timeout:g} s")

    def log_tail(self, size: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                return handle.read()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> float:
        """SIGTERM, then SIGKILL past `timeout`; returns the seconds the server took to exit. Its log and
        port file go with it."""
        started = time.monotonic()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.workspace, ignore_errors=True)
        return time.monotonic() - started

    def __enter__(self) -> LocalSandbox:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
