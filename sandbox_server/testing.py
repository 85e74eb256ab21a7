"""Helpers for the tests and benchmarks: a stock Kernel Gateway or Enterprise Gateway process for the gateway
backend, a probe of a server's /health while something runs, and the processes below a server.

    with KernelGateway(port, workdir, token="secret") as gateway:
        ... --backend gateway --gateway-url {gateway.url} --gateway-token secret ...
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from socket import IPPROTO_TCP, TCP_QUICKACK
from typing import NamedTuple

import requests
import websocket

START_DEADLINE_S = 60  # one start takes ~1.5 s here; the slack is for a loaded CI machine
STOP_GRACE_S = 15


class Process(NamedTuple):
    pid: int
    name: str  # /proc/PID/comm
    argv: bytes  # NUL-separated
    started: int  # clock ticks after boot: with the pid, names this process and no later one


def process_table() -> dict[int, tuple[int, Process]]:
    """Every process now: pid -> (parent's pid, the process)."""
    table = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read()
        except OSError:  # (gone meanwhile)
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # the name, in parentheses, may hold anything
        table[int(entry)] = (int(fields[1]), Process(int(entry), stat[stat.index("(") + 1:stat.rindex(")")], argv,
                                                     int(fields[19])))
    return table


def descendants(root: int) -> list[Process]:
    """Every process below `root`, found by ancestry: a server's template and kernels, and what they started
    (a forked kernel's lifeline names nothing of the server)."""
    table = process_table()
    below, added = {root}, True
    while added:  # (a parent may have a larger pid than its child)
        added = False
        for pid, (parent, _process) in table.items():
            if parent in below and pid not in below:
                below.add(pid)
                added = True
    return [table[pid][1] for pid in sorted(below - {root})]


def still_running(processes: list[Process]) -> list[Process]:
    table = process_table()
    return [process for process in processes
            if process.pid in table and table[process.pid][1].started == process.started]


class KernelGateway:
    """`python -m kernel_gateway` on 127.0.0.1 in its own process group, so that stop() ends its kernels too.
    It runs in `workdir` (default: a temporary directory, removed by stop()) and logs to workdir/gateway.log;
    `options` are more of its command-line options (e.g. `--MappingKernelManager.cull_idle_timeout=5`)."""

    app = "KernelGatewayApp"
    module = "kernel_gateway"

    def __init__(self, port: int, workdir: str | None = None, token: str | None = None,
                 config: str | None = None, options: tuple[str, ...] = (), python: str = sys.executable) -> None:
        self.port = port  # the gateway cannot report a port it picked itself, so the caller picks a free one
        self.owns_workdir = workdir is None  # then stop() removes it, log included
        self.workdir = workdir or tempfile.mkdtemp(prefix="codeact-gateway-")
        os.makedirs(self.workdir, exist_ok=True)
        self.log_path = os.path.join(self.workdir, "gateway.log")
        self.token = token
        self.config = config
        self.options = tuple(options)
        self.python = python
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        # Connection files in the workdir, not in the user's runtime directory, where a killed gateway leaves them.
        return {**os.environ, "JUPYTER_RUNTIME_DIR": os.path.join(self.workdir, "runtime")}

    def start(self) -> KernelGateway:
        command = [self.python, "-m", self.module, f"--{self.app}.ip=127.0.0.1", f"--{self.app}.port={self.port}"]
        if self.token:
            command.append(f"--{self.app}.auth_token={self.token}")
        if self.config:
            command.append(f"--config={self.config}")
        command += self.options
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the handle
            self.process = subprocess.Popen(command, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.environment(), start_new_session=True)
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            try:
                requests.get(self.url + "/api", timeout=2)
                return self
            except requests.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the gateway on port {self.port} did not start; "
                                       f"see {self.log_path}") from None
                time.sleep(0.1)

    def open_kernel(self, user: str = "plain") -> tuple[str, websocket.WebSocket]:
        """A new kernel on this gateway and its websocket, opened as a plain client (the original CodeAct)
        does. A user is named: Enterprise Gateway refuses its own, root, as the default KERNEL_USERNAME."""
        headers = {"Authorization": f"token {self.token}"} if self.token else {}
        created = requests.post(self.url + "/api/kernels", json={"name": "python3", "env": {"KERNEL_USERNAME": user}},
                                headers=headers, timeout=60)
        created.raise_for_status()
        kernel_id = created.json()["id"]
        return kernel_id, websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/api/kernels/{kernel_id}/channels", header=headers, timeout=30)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

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


class EnterpriseGateway(KernelGateway):
    """Jupyter Enterprise Gateway with its default local process proxy, run by `python`: an environment of its
    own (`make enterprise-gateway`), since it pins jupyter_server 1 and jupyter_client 6. Its one kernelspec,
    `python3`, runs ipykernel from this interpreter's environment."""

    app = "EnterpriseGatewayApp"
    module = "enterprise_gateway"

    def environment(self) -> dict[str, str]:
        specs = os.path.join(self.workdir, "kernelspecs")
        spec_dir = os.path.join(specs, "kernels", "python3")
        os.makedirs(spec_dir, exist_ok=True)
        with open(os.path.join(spec_dir, "kernel.json"), "w") as handle:
            json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                       "display_name": "Python 3", "language": "python"}, handle)
        return {**super().environment(), "JUPYTER_PATH": specs}


def private_kb(pid: int) -> int:
    """Memory only this process holds (USS): what one more session costs."""
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        return sum(int(line.split()[1]) for line in handle if line.startswith(("Private_Clean", "Private_Dirty")))


def send_execute(socket, code: str) -> str:
    """Send an execute request on a gateway kernel's websocket (websocket-client's); its msg_id."""
    msg_id = uuid.uuid4().hex
    socket.send(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "", "session": "plain",
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }))
    return msg_id


def plain_execute(socket, code: str, quickack: bool = False) -> None:
    """Run `code` on a gateway kernel's websocket as a plain client does, the original CodeAct among them;
    with `quickack`, ask for an immediate ACK after every message, as our backend does."""
    msg_id = send_execute(socket, code)
    idle = replied = False
    while not (idle and replied):
        reply = json.loads(socket.recv())
        if quickack:
            socket.sock.setsockopt(IPPROTO_TCP, TCP_QUICKACK, 1)
        if reply.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = reply["msg_type"] if "msg_type" in reply else reply["header"]["msg_type"]
        replied = replied or kind == "execute_reply"
        idle = idle or (kind == "status" and reply["content"]["execution_state"] == "idle")


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
