"""One local ipykernel: its confined process (lifecycle) and its ZMQ channels (messaging).

We launch the process ourselves rather than through jupyter_client's KernelManager: the launch goes
through namespaces and a privilege drop, a kill must be immediate (KernelManager waits
shutdown_wait_time/2 before SIGTERM), and a dead process must be noticed within a poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import inspect
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time

import zmq
import zmq.asyncio
from jupyter_client.asynchronous import AsyncKernelClient

from . import files, kernel_hooks
from .config import Config
from .execution import DIED, OK, EventSink, Execution, OutputCollector
from .isolation import Isolation, KernelLaunch
from .protocol import ExecuteState, Pacer, clean
from .template import ForkedProcess, KernelTemplate, TemplateUnavailable, log_tail, set_once

log = logging.getLogger("sandbox_server.kernel")

POLL_INTERVAL = 0.25  # how often a waiting execute checks that the process is alive
PR_SET_PDEATHSIG = 1
LINUX = sys.platform.startswith("linux")


# The channels the server opens to a kernel. No heartbeat: a kernel's death is seen from its process (pidfd and
# report pipe, or a poll), and each heartbeat channel was a thread of this server pinging its kernel every 3 s,
# idle or not. No control channel: an interrupt is a signal and a kill ends the process; each was one more
# socket, connection and handshake per kernel, on both sides.
CHANNELS = ("shell", "iopub", "stdin")
WELCOME_WAIT = 0.02  # seconds a forked kernel has to greet the server's subscription before a kernel_info


def stop_channels(client: AsyncKernelClient) -> None:
    """Close the channels we opened (jupyter_client's stop_channels opens the others to see that they are not)."""
    for name in CHANNELS:
        getattr(client, f"{name}_channel").stop()


class KernelStartError(RuntimeError):
    """The kernel process exited or did not answer before its start deadline."""


class KernelExitedAtStart(KernelStartError):
    """The kernel process exited before it answered; `started_by` is "fork" or "boot"."""

    def __init__(self, message: str, started_by: str | None) -> None:
        super().__init__(message)
        self.started_by = started_by


def _die_with_parent() -> None:
    """Runs in the child between fork and exec; only where `setpriv` is missing, since a preexec
    function rules out the vfork fast path and costs milliseconds per start on a large server."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def connection_info(runtime_dir: str) -> dict:
    """IPC transport: unix sockets cross network namespaces, where a kernel has no usable TCP."""
    return {
        "transport": "ipc",
        "ip": os.path.join(runtime_dir, "k"),  # short: a socket path holds at most 107 bytes
        "shell_port": 1,
        "iopub_port": 2,
        "stdin_port": 3,
        "control_port": 4,
        "hb_port": 5,
        "key": secrets.token_hex(16),
        "signature_scheme": "hmac-sha256",
        "kernel_name": "python3",
    }


class LocalKernel:
    """A confined ipykernel process reached over IPC sockets: forked from the kernel template when one is given
    and running, booted otherwise."""

    def __init__(self, name: str, launch: KernelLaunch, runtime_dir: str, connection: dict,
                 context: zmq.asyncio.Context, config: Config, template: KernelTemplate | None = None,
                 cleanups: set[asyncio.Task] | None = None) -> None:
        self.name = name
        self.launch = launch
        self.runtime_dir = runtime_dir
        self.connection = connection
        self.context = context
        self.config = config
        self.template = template
        self.cleanups = cleanups if cleanups is not None else set()  # the backend awaits them at shutdown
        self.process: subprocess.Popen | ForkedProcess | None = None
        self.started_by: str | None = None  # "fork" or "boot"
        self.client: AsyncKernelClient | None = None
        self._kernel_pid: int | None = None
        self.started_at = time.monotonic()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # A forked kernel writes to this pipe once its event loop runs (zygote.tell_ready), or dies closing it.
        ready, ready_write = os.pipe2(os.O_CLOEXEC) if self.template is not None else (-1, -1)
        try:
            await self._launch(ready_write)
            forked = self.started_by == "fork"
            if forked:
                await self._until_event_loop_runs(ready, deadline, timeout)
        finally:
            if ready >= 0:
                os.close(ready)
        await self._connect(deadline, timeout, bound=forked,
                            greeted=forked and bool(self.template.details.get("iopub_welcome")))
        await self.drain()
        if forked:
            return  # it installed the hooks itself, before it answered
        execution = await self.execute(kernel_setup_code(self.config), max(deadline - time.monotonic(), 1.0),
                                       silent=True)
        if execution.status != OK:
            raise KernelStartError(f"kernel {self.name} setup failed: {execution.text[-500:]}")

    async def _launch(self, ready_write: int) -> None:
        """Fork the kernel from the template, which hands it `ready_write` (closed here), or boot it where the
        template cannot serve now."""
        log_fd = os.open(os.path.join(self.runtime_dir, "kernel.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND
                         | os.O_CLOEXEC, 0o644)
        try:
            if self.template is not None:
                try:
                    spec = {**self.launch.spec, "hook_limits": kernel_hook_limits(self.config)}
                    self.process = await self.template.fork(spec, log_fd, ready_write)
                    self.started_by = "fork"
                except TemplateUnavailable as error:  # boots instead: slower, never lost
                    log.info("kernel %s boots: %s", self.name, error)
            if self.process is None:
                self.process = subprocess.Popen(
                    self.launch.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=None if self.launch.dies_with_server or not LINUX else _die_with_parent,
                )
                self.started_by = "boot"
        finally:
            os.close(log_fd)
            if ready_write >= 0:
                os.close(ready_write)

    async def _until_event_loop_runs(self, ready: int, deadline: float, timeout: float) -> None:
        """Until a forked kernel writes to its ready pipe: its sockets are bound and its event loop runs, so it
        takes messages from now on. A pipe closed with nothing written is a kernel that died first."""
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        loop.add_reader(ready, set_once, readable)
        try:
            await asyncio.wait_for(readable, max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:  # (a kernel that died has closed the pipe: readable)
            raise KernelStartError(f"kernel {self.name} did not start its event loop within {timeout:g} s "
                                   "(--kernel-start-timeout)") from None
        finally:
            loop.remove_reader(ready)
        if os.read(ready, 1) != b"r":
            raise KernelExitedAtStart(f"kernel {self.name} exited during start-up: {self.log_tail()}", self.started_by)

    async def _connect(self, deadline: float, timeout: float, bound: bool = True, greeted: bool = False) -> None:
        """Open the channels (once the kernel's sockets are bound: where not `bound` yet, wait until they are), and
        wait until iopub delivers to us: a SUB socket that joined late misses what was published before, and an
        execute would then wait for an idle that never comes. Where the kernel is `greeted`, it says so itself: it
        sends each new subscriber an iopub_welcome (JEP 65), and its loop runs (`_until_event_loop_runs`). Else a
        kernel_info reply on shell and a status on iopub say both."""
        # Connect only once the kernel has bound every socket. A channel that connects to a path not yet
        # bound retries 100 ms later, and a reply routed to it meanwhile is dropped: nothing waits on stdin
        # at start-up, so the first input() of a fresh kernel's first execute hung (4 times in 30).
        paths = [f"{self.connection['ip']}-{self.connection[f'{name}_port']}" for name in CHANNELS]
        pause = 0.005
        while not bound and not all(os.path.exists(path) for path in paths):
            self._check_starting(deadline, timeout, "bind its sockets")
            await asyncio.sleep(pause)
            pause = min(pause * 1.25, 0.05)  # 5 ms apart at first; in a burst, 100 kernels wait seconds
        client = AsyncKernelClient(context=self.context)
        client.load_connection_info(self.connection)
        client.start_channels(**{name: name in CHANNELS for name in ("shell", "iopub", "stdin", "hb", "control")})
        self.client = client
        # The greeting comes within a few ms, even in a burst of 100. ipykernel as it is missed it in 1-4% of
        # starts (its iopub thread hears subscriptions through a ZMQStream but sends on that socket directly,
        # which can leave the stream unwoken); forked kernels read waiting subscriptions after each send
        # (zygote.subscriptions_heard_after_sends). Should one still not come, after WELCOME_WAIT a kernel_info,
        # as for other kernels.
        if greeted and await self._receive(client.iopub_channel, "iopub_welcome", WELCOME_WAIT):
            return
        shell_ready = iopub_ready = False
        while not (shell_ready and iopub_ready):
            self._check_starting(deadline, timeout, "answer")
            client.kernel_info()
            shell_ready = shell_ready or await self._receive(client.shell_channel, "kernel_info_reply", 0.2)
            iopub_ready = iopub_ready or await self._receive(client.iopub_channel, "status", 0.05)

    def _check_starting(self, deadline: float, timeout: float, waiting_to: str) -> None:
        """KernelStartError when the kernel exited, or when it did not `waiting_to` before the deadline."""
        if not self.alive:
            raise KernelExitedAtStart(f"kernel {self.name} exited during start-up: {self.log_tail()}", self.started_by)
        if time.monotonic() >= deadline:
            raise KernelStartError(f"kernel {self.name} did not {waiting_to} within {timeout:g} s "
                                   "(--kernel-start-timeout)")

    async def reconnect(self, timeout: float = 10.0) -> None:
        """New channels to the same kernel. A message over --max-message makes zmq drop the connection it came
        on, and zmq never reconnects after that: without this the session would get no output again."""
        if self.client is not None:
            stop_channels(self.client)
        # Not greeted: a welcome goes to new subscriptions only, and the kernel may still count ours.
        await self._connect(time.monotonic() + timeout, timeout)
        await self.drain()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def ready(self) -> bool:
        return self.alive

    @property
    def kernel_pid(self) -> int | None:
        """The pid to signal, as the server sees it (a booted kernel; a forked one is signalled by pidfd): the
        interpreter, or under `unshare` the child of the process we ran, the namespace's init, which passes
        SIGINT on to the interpreter."""
        if self._kernel_pid is None and self.alive:
            if not self.launch.namespaced or isinstance(self.process, ForkedProcess):
                self._kernel_pid = self.process.pid
            else:
                try:
                    path = f"/proc/{self.process.pid}/task/{self.process.pid}/children"
                    with open(path) as handle:
                        children = handle.read().split()
                    self._kernel_pid = int(children[0]) if children else None
                except (OSError, ValueError):
                    return None
        return self._kernel_pid

    def exit_description(self) -> str:
        code = self.process.poll() if self.process else None
        if code is None:
            return "still running"
        # `unshare` reports a child killed by signal N as exit status 128+N.
        if code < 0 or code > 128:
            number = -code if code < 0 else code - 128
            name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else str(number)
            hint = " (likely out of memory)" if number == signal.SIGKILL else ""
            return f"killed by {name}{hint}"
        return f"exited with code {code}"

    def log_tail(self, size: int = 2000) -> str:
        return log_tail(os.path.join(self.runtime_dir, "kernel.log"), size)

    async def interrupt(self) -> None:
        if isinstance(self.process, ForkedProcess):
            self.process.send_signal(signal.SIGINT)
            return
        pid = self.kernel_pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)

    async def kill(self) -> None:
        """Kill at once: the kernel, everything it started, and the launcher. Once its processes are gone this
        returns (a replacement can start); its cgroups and runtime directory are removed in the background."""
        if self.client is not None:
            stop_channels(self.client)
            self.client = None
        if self.process is not None:
            forked = isinstance(self.process, ForkedProcess)
            alive = self.alive
            if forked:
                # Its process group first, while its pid is surely still its own; then its lifeline, which
                # takes everything else it started.
                if alive and not self.launch.namespaced:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(self.process.pid, signal.SIGKILL)
                self.process.kill()
            pids = [self.kernel_pid, self.process.pid] if alive and not forked else []
            for path in self.launch.cgroups:
                with contextlib.suppress(OSError, ValueError), open(os.path.join(path, "cgroup.procs")) as handle:
                    pids.extend(int(line) for line in handle.read().split())
            for pid in filter(None, pids):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if not self.launch.namespaced and not forked:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            # A killed kernel is gone in a few milliseconds, and its replacement waits on this. Then so is
            # everything it started (in a pid namespace they die with its init, a moment later): the
            # session's uid counts its processes against the process limit, and a replacement started while
            # a fork bomb's children lived on could not even start a thread.
            pause = 0.001
            while (self.process.poll() is None or not cgroups_empty(self.launch.cgroups)) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.02)
            if forked:
                self.process.close()
        cleanup = asyncio.get_running_loop().create_task(self._remove_leftovers())
        self.cleanups.add(cleanup)
        cleanup.add_done_callback(self.cleanups.discard)

    async def _remove_leftovers(self) -> None:
        # The pid namespace's processes die with its init; the cgroup empties a moment later.
        for _ in range(50):
            Isolation.remove_cgroups(self.launch.cgroups)
            if not any(os.path.isdir(path) for path in self.launch.cgroups):
                break
            await asyncio.sleep(0.02)
        await files.remove_tree(self.runtime_dir)

    # -- messaging ---------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Drop messages left from start-up, so an execute reads only its own."""
        for channel in (self.client.iopub_channel, self.client.shell_channel):
            while await channel.msg_ready():
                await channel.get_msg(timeout=0)

    @staticmethod
    async def _receive(channel, msg_type: str, timeout: float) -> bool:
        """Whether a message of `msg_type` arrives on `channel` within `timeout` (others are dropped)."""
        end = time.monotonic() + timeout
        while (remaining := end - time.monotonic()) > 0:
            if not await channel.msg_ready() and not await channel.socket.poll(remaining * 1000):
                return False
            if (await channel.get_msg(timeout=0))["header"]["msg_type"] == msg_type:
                return True
        return False

    def send_input(self, text: str) -> None:
        if self.client is not None:
            self.client.input(text)

    async def execute(self, code: str, timeout: float, sink: EventSink | None = None,
                      allow_stdin: bool = False, silent: bool = False, grace: float = 1.0) -> Execution:
        """Run code; on timeout interrupt, and if the kernel is still busy after `grace`, say so.

        Returns an Execution whose status is ok, error, timeout, died, or UNRESPONSIVE (the caller
        replaces the kernel). Outputs gathered before a timeout or a death are kept.
        """
        started = time.monotonic()
        collector = OutputCollector(self.config.max_output, self.config.max_results, sink)
        if not self.alive or self.client is None:
            return collector.finish(DIED, None, 0.0)
        client = self.client
        msg_id = client.execute(code, silent=silent, store_history=not silent, allow_stdin=allow_stdin,
                                stop_on_error=False)
        state = ExecuteState(msg_id, collector, deadline=started + timeout, grace=grace)
        channels = {"iopub": client.iopub_channel, "shell": client.shell_channel,
                    "stdin": client.stdin_channel}
        poller = zmq.asyncio.Poller()
        sockets = {}
        for name, channel in channels.items():
            poller.register(channel.socket, zmq.POLLIN)
            sockets[channel.socket] = name
        # A forked kernel's report pipe turns readable the moment it is reaped: its death is seen at once, not
        # at the next poll interval.
        exit_report = self.process.report if isinstance(self.process, ForkedProcess) else None
        if exit_report is not None:
            poller.register(exit_report, zmq.POLLIN)
        pacer = Pacer()
        try:
            while (status := await state.verdict(time.monotonic(), self.interrupt)) is None:
                ready = dict(await poller.poll(timeout=state.wait(time.monotonic(), POLL_INTERVAL) * 1000))
                if not ready or exit_report in ready:
                    if not self.alive:
                        status = DIED
                        break
                    continue
                for socket in ready:
                    if socket == exit_report:
                        continue
                    name = sockets[socket]
                    channel = channels[name]
                    while await channel.msg_ready():
                        received = time.monotonic()
                        state.on_message(name, await clean(await channel.get_msg(timeout=0)))
                        await pacer.step(received)
        except (asyncio.CancelledError, zmq.ZMQError):
            if self.client is client:
                raise
            status = DIED  # killed under us (DELETE, /restart): its channels were closed mid-wait
        if state.lost_idle and self.alive and self.client is client:
            with contextlib.suppress(KernelStartError):
                await self.reconnect()
        return collector.finish(status, state.execution_count, (time.monotonic() - started) * 1000)


def cgroups_empty(paths: list[str]) -> bool:
    """Whether no process is left in these cgroups (a cgroup already removed is empty)."""
    for path in paths:
        try:
            with open(os.path.join(path, "cgroup.procs")) as handle:
                if handle.read().strip():
                    return False
        except OSError:
            continue
    return True


def kernel_hook_limits(config: Config) -> dict[str, int]:
    """The output and message caps every kernel's hooks install (the message cap leaves room for the message's
    header frames)."""
    return {"output_cap": config.max_output // 2, "message_cap": config.max_message - 64 * 1024}


def kernel_setup_code(config: Config) -> str:
    """What a booted or remote kernel runs when it starts (a forked one installs the hooks itself, zygote.py):
    the hooks' source, then the output and message caps. The source travels as one string literal run by
    exec: IPython tokenizes a cell before running it, which for the hooks' 180 lines as code cost 20 ms of
    each kernel's start."""
    limits = kernel_hook_limits(config)
    source = (f"{inspect.getsource(kernel_hooks)}\ninstall_output_cap({limits['output_cap']})\n"
              f"install_message_cap({limits['message_cap']})\ninstall_interrupt_wakeup()\n"
              "del install_output_cap, install_message_cap, install_interrupt_wakeup\n")
    return f"exec(compile({source!r}, '<codeact kernel setup>', 'exec'))"


def write_connection_file(runtime_dir: str, connection: dict, uid: int | None) -> str:
    path = os.path.join(runtime_dir, "connection.json")
    with open(path, "w") as handle:
        json.dump(connection, handle)
    os.chmod(path, 0o600)
    if uid is not None:
        os.chown(path, uid, uid)
    return path
