"""Start model server processes, wait until they answer, restart them when they crash, stop them all.

Each server runs in its own process group (so a stop reaches its workers too) and, on Linux, under
`setpriv --pdeathsig KILL`, so it dies with the supervisor even when the supervisor is killed outright.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import TextIO

import requests

from .launch import Launch


class StartError(RuntimeError):
    """A server exited during start-up or did not become ready before its deadline."""


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of `url` answers 200 (a refused connection or a timeout: no)."""
    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


class Supervised:
    """One server process and its log file."""

    def __init__(self, launch: Launch, log_path: str) -> None:
        self.launch = launch
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at = 0.0

    def spawn(self) -> None:
        argv = list(self.launch.argv)
        setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
        if setpriv:
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, env={**os.environ, **self.launch.env}, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            pass_fds=self.launch.pass_fds)
        self.started_at = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(handle.tell() - 16384, 0))
                return "\n".join(handle.read().decode(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def ready(self) -> bool:
        base = f"http://{self.launch.host}:{self.launch.port}"
        try:
            health = requests.get(base + "/health", timeout=2)
            if health.status_code not in (200, 404):  # llama-cpp-python has no /health: ready_path decides
                return False
        except requests.RequestException:
            return False
        return answers(base + self.launch.ready_path)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the process group, then SIGKILL past `timeout`."""
        if self.process is None:
            return
        for number in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, number)
            try:
                self.process.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)


class Supervisor:
    """Usage:
        supervisor = Supervisor([launch], log_dir)
        supervisor.start()          # returns once every server answers
        supervisor.watch(stop)      # restarts crashed servers until `stop` is set
        supervisor.stop()
    """

    def __init__(self, launches: list[Launch], log_dir: str, ready_timeout: float = 600.0, max_restarts: int = 5,
                 backoff: float = 1.0, progress: TextIO | None = sys.stderr) -> None:
        os.makedirs(log_dir, exist_ok=True)
        self.servers = [Supervised(launch, os.path.join(log_dir, f"{launch.name}.log")) for launch in launches]
        self.ready_timeout = ready_timeout
        self.max_restarts = max_restarts
        self.backoff = backoff
        self.progress = progress

    def say(self, text: str) -> None:
        if self.progress is not None:
            self.progress.write(f"[model_server] {text}\n")
            self.progress.flush()

    def start(self) -> None:
        for server in self.servers:
            server.spawn()
            self.say(f"started {server.launch.name} (pid {server.process.pid}), log {server.log_path}")
        try:
            for server in self.servers:
                self.wait_ready(server)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, server: Supervised) -> None:
        deadline = time.monotonic() + self.ready_timeout
        next_report = time.monotonic() + 5
        while not server.ready():
            if not server.alive:
                raise StartError(f"{server.launch.name} exited during start-up ({server.process.returncode}); "
                                 f"its last log lines:\n{server.log_tail()}")
            now = time.monotonic()
            if now > deadline:
                raise StartError(f"{server.launch.name} was not ready within {self.ready_timeout:g} s "
                                 f"(--ready-timeout); its last log lines:\n{server.log_tail()}")
            if now >= next_report:
                self.say(f"waiting for {server.launch.name} at {server.launch.url} "
                         f"({now - server.started_at:.0f} s)")
                next_report = now + 5
            time.sleep(0.2)
        self.say(f"{server.launch.name} ready at {server.launch.url} "
                 f"in {time.monotonic() - server.started_at:.1f} s")

    def watch(self, stop: threading.Event, interval: float = 0.5) -> None:
        """Restart crashed servers with exponential backoff; give up past max_restarts for one server."""
        while not stop.wait(interval):
            for server in self.servers:
                if server.alive:
                    continue
                code = server.process.returncode
                if server.restarts >= self.max_restarts:
                    raise StartError(f"{server.launch.name} crashed {server.restarts + 1} times (last exit {code}); "
                                     f"not restarting past --max-restarts {self.max_restarts}. Last log lines:\n"
                                     f"{server.log_tail()}")
                delay = self.backoff * 2 ** server.restarts
                server.restarts += 1
                self.say(f"{server.launch.name} exited ({code}); restart {server.restarts}/{self.max_restarts} "
                         f"in {delay:g} s")
                if stop.wait(delay):
                    return
                server.spawn()
                self.wait_ready(server)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
