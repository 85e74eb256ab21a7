"""Helpers for the tests and benchmarks: a stock Kernel Gateway process for the gateway backend, and a
probe of a server's /health while something runs.

    with KernelGateway(port, workdir, token="secret") as gateway:
        ... --backend gateway --gateway-url {gateway.url} --gateway-token secret ...
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import requests

START_DEADLINE_S = 60  # one start takes ~1.5 s here; the slack is for a loaded CI machine
STOP_GRACE_S = 15


class KernelGateway:
    """`python -m kernel_gateway` on 127.0.0.1 in its own process group, so that stop() ends its kernels too.
    It runs in `workdir` (default: a temporary directory, removed by stop()) and logs to workdir/gateway.log."""

    def __init__(self, port: int, workdir: str | None = None, token: str | None = None,
                 config: str | None = None) -> None:
        self.port = port  # the gateway cannot report a port it picked itself, so the caller picks a free one
        self.owns_workdir = workdir is None  # then stop() removes it, log included
        self.workdir = workdir or tempfile.mkdtemp(prefix="codeact-gateway-")
        self.log_path = os.path.join(self.workdir, "gateway.log")
        self.token = token
        self.config = config
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> KernelGateway:
        command = [sys.executable, "-m", "kernel_gateway", "--KernelGatewayApp.ip=127.0.0.1",
                   f"--KernelGatewayApp.port={self.port}"]
        if self.token:
            command.append(f"--KernelGatewayApp.auth_token={self.token}")
        if self.config:
            command.append(f"--config={self.config}")
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the handle
            self.process = subprocess.Popen(command, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            try:
                requests.get(self.url + "/api", timeout=2)
                return self
            except requests.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the kernel gateway on port {self.port} did not start; "
                                       f"see {self.log_path}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole group: the gateway's kernels go with it."""
        if self.process is None:
            return
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(5)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KernelGateway:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class HealthProbe:
    """Polls a server's /health from a thread while the block runs; `samples` are the answer times in
    seconds, `worst` the slowest. Usage:

        with HealthProbe(url) as probe:
            ...  # an attack
        assert probe.worst < 1.0
    """

    def __init__(self, url: str, interval: float = 0.01) -> None:
        self.url = url
        self.interval = interval
        self.samples: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def worst(self) -> float:
        return max(self.samples, default=0.0)

    def _run(self) -> None:
        while not self.done.is_set():
            started = time.monotonic()
            with contextlib.suppress(requests.RequestException):
                requests.get(self.url + "/health", timeout=30)
            self.samples.append(time.monotonic() - started)
            time.sleep(self.interval)

    def __enter__(self) -> HealthProbe:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done.set()
        self.thread.join(35)
