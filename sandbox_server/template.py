"""The server's side of the kernel template (zygote.py): start it, supervise it, ask it for kernels.

A kernel forked from the template is ready in tens of milliseconds and shares the template's pages
copy-on-write; a booted one costs half a second of CPU and its own copy of everything. The template is
optional: while it is starting, restarting after a death, or where it cannot be used, kernels boot as before
(backend.py falls back per kernel, so no session request is lost to a template that dies mid-burst).

Each forked kernel is reached through a `ForkedProcess` (its pidfd, report pipe and lifeline).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

from .isolation import KERNEL_CONFIG, SYSTEM_PATH, scrubbed_environment
from .kernel_env import KernelEnvironment

log = logging.getLogger("sandbox_server.template")

ZYGOTE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zygote.py")
READY_TIMEOUT = 60.0  # seconds for the template to import what a kernel needs (the data stack takes a few)
FORK_TIMEOUT = 10.0  # seconds for one fork request's answer; past it the kernel boots instead
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # after successive deaths; reset once it has served a while
# Kernels forked from the template cannot start BLAS thread pools in it (a template has no threads): they
# compute on one thread, which is what --cpu-limit allows a kernel by default anyway.
SINGLE_THREADED = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def log_tail(path: str, size: int = 2000) -> str:
    """The last `size` bytes of a process's log, for an error message."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(handle.tell() - size, 0))
            return handle.read().decode(errors="replace").strip() or "(no output)"
    except OSError:
        return "(no log)"


def readable(fd: int) -> bool:
    poller = select.poll()  # not select(): a busy server's descriptors pass 1024
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def set_once(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class TemplateRefused(RuntimeError):
    """The template started but must not be used here (it holds threads, or a kernel forked from it does not
    start): kernels boot for the rest of the server's life."""


class TemplateUnavailable(RuntimeError):
    """The template cannot fork this kernel now (starting, dead, or it failed the request): boot instead."""


class ForkedProcess:
    """A kernel forked from the template, as the server holds it; `pid` and `poll()` as subprocess.Popen's.

    Three descriptors: a pidfd (signals reach that process and no other, whatever pids are reused); the read
    end of its report pipe, where the template, its parent, writes its exit status when it reaps it, so its
    death is seen at once; and the write end of its lifeline, which only we hold: closing it ends the kernel
    and all it started, so a server that dies takes its kernels with it."""

    def __init__(self, pid: int, pidfd: int, report: int, lifeline: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.report = report
        self.lifeline = lifeline
        self.returncode: int | None = None
        self._unread = b""
        self._report_is_pidfd = False

    def poll(self) -> int | None:
        """The kernel's exit code (negative: the signal that killed it) once it has exited, else None."""
        if self.returncode is None and self.report >= 0 and readable(self.report):
            if self._report_is_pidfd:
                self.returncode = -signal.SIGKILL  # (its status went with the template)
                return self.returncode
            chunk = os.read(self.report, 64)
            self._unread += chunk
            if not chunk:  # every write end is closed: reaped, or the template is gone
                text = self._unread.decode(errors="replace").strip()
                if text.lstrip("-").isdigit():
                    self.returncode = int(text)
                elif readable(self.pidfd):  # (a pidfd is readable once its process has exited)
                    self.returncode = -signal.SIGKILL
                else:
                    # The template died and the kernel lives on: from now on the same descriptor number is its
                    # pidfd, readable once it exits, so whoever polls the report pipe still hears of its death.
                    os.dup2(self.pidfd, self.report)
                    self._report_is_pidfd = True
        return self.returncode

    def send_signal(self, number: int) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, number)

    def kill(self) -> None:
        """The kernel and everything it started: its lifeline ends them all (where it is PID 1 of their
        namespace, they die with it)."""
        if self.lifeline >= 0:
            os.close(self.lifeline)
            self.lifeline = -1
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        """Let the kernel go: its lifeline ends, and with it the kernel if it still runs."""
        for fd in (self.lifeline, self.report, self.pidfd):
            if fd >= 0:
                os.close(fd)
        self.lifeline = self.report = self.pidfd = -1


class KernelTemplate:
    """One template process for the server's kernel environment, restarted when it dies."""

    def __init__(self, environment: KernelEnvironment, preload: str, workdir: str, namespaced: bool,
                 verify: Callable[[], Awaitable[str | None]] | None = None) -> None:
        self.environment = environment
        self.namespaced = namespaced  # each kernel in a pid namespace of its own, its lifeline PID 1 (root, isolated)
        self.verify = verify  # after each start: why a kernel forked from it fails, or None
        self.preload = preload
        self.workdir = workdir  # for its log and its rehearsal's sockets: the server's root
        self.process: subprocess.Popen | None = None
        self.socket: socket.socket | None = None
        self.ready = False
        self.details: dict = {}
        self.pending: dict[int, asyncio.Future] = {}
        self.ids = itertools.count(1)
        self.deaths = 0
        self._supervisor: asyncio.Task | None = None
        self._started = asyncio.Event()
        self._closed = False

    @property
    def available(self) -> bool:
        return self.ready and self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "template.log")

    def start(self) -> None:
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def wait_started(self, timeout: float) -> bool:
        """Whether the first start ended (ready or failed) within `timeout`; then `available` says which."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._started.wait(), timeout)
        return self._started.is_set()

    def describe(self) -> str:
        if not self.available:
            return f"booted (no kernel template: {self.details.get('error', 'still starting')})"
        details = self.details
        preloaded = ", ".join(details["preloaded"]) or "nothing beyond ipykernel"
        packed = (f"the code of {details['packed']} functions kernels call packed together"
                  if details.get("packed") is not None else "a rehearsal kernel did not answer: code not packed")
        warm_up = details.get("warm_up")
        warmed = (f"warmed up by a kernel of its own in {warm_up:g} s" if isinstance(warm_up, (int, float))
                  else f"its warm-up kernel failed ({warm_up}): kernels copy more of its memory")
        huge = f"{2 * details['huge_pages']} MB of its memory on huge pages"
        if details.get("huge_pages_error"):
            huge += f" ({details['huge_pages_error']})"
        text = (f"forked from a template (pid {self.process.pid}, ready in {details['seconds']:g} s, "
                f"{details['modules']} modules; preloaded {preloaded}; {packed}; {warmed}; {huge}; "
                "BLAS single-threaded)")
        if details["failed"]:
            text += f"; not preloaded: {'; '.join(details['failed'])}"
        return text

    async def _supervise(self) -> None:
        delays = iter(RESTART_DELAYS)
        while not self._closed:
            started = time.monotonic()
            try:
                await self._spawn()
                # Every start, the first and each restart: a kernel forked from it must answer.
                failure = await self.verify() if self.verify is not None else None
                if failure is not None:
                    raise TemplateRefused(f"a kernel forked from it did not start: {failure}")
                log.info("kernel template ready (pid %d, %g s)", self.process.pid, self.details["seconds"])
            except TemplateRefused as error:  # it would fail the same way again: not retried
                self.details = {"error": str(error)}
                log.warning("kernel template not used: %s; kernels boot instead", error)
                self._down(str(error))
                self._kill()
                self._started.set()
                return
            except Exception as error:  # (logged; kernels boot meanwhile)
                self.details = {"error": str(error)}
                log.warning("kernel template did not start: %s; kernels boot instead", error)
            self._started.set()
            if self.process is not None:
                while self.process.poll() is None and not self._closed:
                    await asyncio.sleep(0.1)
            self._down("the kernel template exited")
            if self._closed:
                return
            self.deaths += 1
            if time.monotonic() - started > 60:
                delays = iter(RESTART_DELAYS)
            delay = next(delays, RESTART_DELAYS[-1])
            code = self.process.poll() if self.process is not None else None
            log.warning("kernel template gone (exit %s); kernels boot until it is back (restart in %g s)", code, delay)
            await asyncio.sleep(delay)

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = scrubbed_environment({
            "PATH": ":".join([self.environment.bin_dir, *SYSTEM_PATH]),
            "HOME": self.workdir,
            # What ipykernel sets in a kernel, set before the template imports matplotlib (which reads it then).
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # debugpy's warning about frozen modules, on every import
            **SINGLE_THREADED,
        })
        argv = [self.environment.python, "-s", "-E", ZYGOTE_SCRIPT, str(theirs.fileno()), self.preload, self.workdir,
                json.dumps(KERNEL_CONFIG), "namespaced" if self.namespaced else "plain"]
        setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
        if setpriv:
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]  # it dies with the server
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                            pass_fds=[theirs.fileno()], env=env, start_new_session=True)
        theirs.close()
        ours.setblocking(False)
        self.socket = ours
        loop = asyncio.get_running_loop()
        try:
            message = await asyncio.wait_for(loop.sock_recv(ours, 1 << 16), READY_TIMEOUT)
        except asyncio.TimeoutError:
            self._kill()
            raise RuntimeError(f"not ready within {READY_TIMEOUT:g} s") from None
        if not message:
            self._kill()
            raise RuntimeError(f"it exited while starting (status {self.process.returncode}): {self.log_tail()}")
        details = json.loads(message)
        if details["lifeline_error"]:
            self._kill()
            raise TemplateRefused(f"its kernels' lifeline cannot run: {details['lifeline_error']}")
        if details["threads"] != 1:
            self._kill()
            raise TemplateRefused(f"it has {details['threads']} threads after preloading and its warm-up (a fork "
                                  "keeps only one): leave the module that starts them out of --kernel-preload")
        self.details = details
        loop.add_reader(ours.fileno(), self._on_readable)
        self.ready = True

    def _on_readable(self) -> None:
        while self.socket is not None:
            try:
                message, fds, _flags, _address = socket.recv_fds(self.socket, 1 << 16, 3)
            except BlockingIOError:
                return
            except OSError:
                message, fds = b"", []
            if not message:  # the template is gone
                self._down("the kernel template exited")
                return
            reply = json.loads(message)
            future = self.pending.pop(reply.get("id"), None)
            if future is None or future.done():  # a request we gave up on: its kernel is not wanted
                for fd in fds:
                    os.close(fd)
                continue
            if "error" in reply:
                future.set_exception(TemplateUnavailable(f"the kernel template failed: {reply['error']}"))
            elif len(fds) != 3:  # not all reached us (no descriptor to spare): the kernel is let go (its lifeline ends)
                for fd in fds:
                    os.close(fd)
                future.set_exception(TemplateUnavailable("the kernel's descriptors were not received"))
            else:
                future.set_result(ForkedProcess(reply["pid"], *fds))

    def _down(self, why: str) -> None:
        self.ready = False
        if self.socket is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.socket.fileno())
            self.socket.close()
            self.socket = None
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(TemplateUnavailable(why))

    async def fork(self, spec: dict, log_fd: int, ready_fd: int,
                   timeout: float = FORK_TIMEOUT) -> ForkedProcess:
        """A new kernel process, confined by `spec` as confine.py would, with `log_fd` as its output and
        `ready_fd` to write to once its event loop runs; TemplateUnavailable if not now."""
        if not self.available:
            raise TemplateUnavailable("the kernel template is not running")
        request_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        try:
            await self._send(json.dumps({"id": request_id, "spec": spec}).encode(),
                             [log_fd, ready_fd])
            return await asyncio.wait_for(future, timeout)
        except BaseException as error:  # (a kernel forked after all is let go when its answer comes)
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().close()  # it came as we gave up
            if isinstance(error, (OSError, asyncio.TimeoutError)):
                raise TemplateUnavailable(f"the kernel template did not answer: {error!r}") from error
            raise
        finally:
            self.pending.pop(request_id, None)

    async def _send(self, data: bytes, fds: list[int]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.socket is None:
                raise OSError("the kernel template is gone")
            try:
                socket.send_fds(self.socket, [data], fds)
                return
            except BlockingIOError:  # its queue is full: wait until it takes some
                writable = loop.create_future()
                # The callback may run again before it is removed: only the first sets the result.
                loop.add_writer(self.socket.fileno(), set_once, writable)
                try:
                    await asyncio.wait_for(writable, FORK_TIMEOUT)
                finally:
                    with contextlib.suppress(ValueError, OSError):
                        loop.remove_writer(self.socket.fileno())

    def log_tail(self, size: int = 2000) -> str:
        return log_tail(self.log_path, size)

    def _kill(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    async def close(self) -> None:
        self._closed = True
        self._down("the server is stopping")  # (closes the socket first, with its reader)
        self._kill()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
