"""Sessions: a kernel, a home that outlives kernel replacements, and the rules for executing in them.

The session layer owns recovery: a kernel that stays busy after a timeout's interrupt is killed and
replaced (`restarted`), one that dies is replaced (`died`); either way the session's directory and
setup code (tool definitions) carry over, and the result says that variables were lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from .backend import Backend, Home, Kernel
from .config import Config
from .errors import AtCapacity, BadRequest, Forbidden, NotFound, Unavailable
from .execution import CLOSED, DIED, OK, RESTARTED, TIMEOUT, EventSink, Execution
from .kernel import KernelStartError
from .metrics import Metrics
from .pool import KernelPool
from .protocol import NOT_RUN, UNRESPONSIVE

log = logging.getLogger("sandbox_server.sessions")

RETRY_AFTER = 5.0  # seconds a client told "at capacity" should wait
USER_NAME = re.compile(r"[A-Za-z0-9._@-]{1,128}")  # a gateway's KERNEL_USERNAME (it names pods on Kubernetes)


@dataclass
class Session:
    id: str
    home: Home
    kernel: Kernel
    network: bool = False
    env: dict[str, str] = field(default_factory=dict)
    setup: str = ""
    timeout: float = 60.0
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    generation: int = 0  # bumped on every kernel replacement
    executions: int = 0
    closed: bool = False
    restart_requested: bool = False  # a /restart killed the kernel: an execute in flight says so

    def describe(self) -> dict:
        now = time.monotonic()
        return {
            "id": self.id,
            "kernel": getattr(self.kernel, "name", None),
            "alive": bool(getattr(self.kernel, "alive", False)),
            "busy": self.lock.locked(),
            "network": self.network,
            "timeout": self.timeout,
            "executions": self.executions,
            "age_s": round(now - self.created, 3),
            "idle_s": round(now - self.last_used, 3),
            "workdir": self.home.workdir,
        }


class SessionManager:
    def __init__(self, config: Config, backend: Backend, pool: KernelPool, metrics: Metrics) -> None:
        self.config = config
        self.backend = backend
        self.pool = pool
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.conversations: dict[str, str] = {}  # original /execute convid -> session id
        self.creating = 0
        self._reaper: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def create(self, setup: str = "", env: dict[str, str] | None = None, timeout: float | None = None,
                     network: bool = False, user: str | None = None) -> Session:
        if network and not self.config.token:
            # Kernels without the network live in their own network namespace and cannot reach this server;
            # one with the network could call its API, which only a token closes.
            raise Forbidden("network sessions need a server token (--token / CODEACT_SANDBOX_TOKEN): code with "
                            "the network could otherwise call this server's API and reach other sessions")
        if len(self.sessions) + self.creating >= self.config.max_sessions:
            self.metrics.rejected += 1
            raise AtCapacity(
                f"the server holds its maximum of {self.config.max_sessions} sessions (--max-sessions); "
                "close one or retry later", retry_after=RETRY_AFTER)
        if user is not None and not self.config.gateway_session_users:
            raise BadRequest("this server does not start kernels per user: the 'user' field needs the gateway "
                             "backend and --gateway-session-users")
        if user is not None and not USER_NAME.fullmatch(user):
            raise BadRequest("field 'user' must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', '@' and '-'")
        self.creating += 1
        try:
            # Pool kernels are started for the server's user, and without the network.
            taken = None if network or user is not None else self.pool.take()
            if taken is None:
                home = replace(await self.backend.new_home(), user=user)
                try:
                    kernel = await self._start_kernel(home, network)
                except BaseException:
                    await self.backend.remove_home(home)  # its directories and uid, not left until shutdown
                    raise
            else:
                kernel, home = taken
            session = Session(id=secrets.token_hex(12), home=home, kernel=kernel, network=network,
                              env=dict(env or {}), setup=setup,
                              timeout=timeout or self.config.execute_timeout)
            try:
                await self._prepare(session)
            except BaseException:
                await self.backend.discard(kernel, home)
                raise
        finally:
            self.creating -= 1
        self.sessions[session.id] = session
        self.metrics.sessions_created += 1
        return session

    async def _start_kernel(self, home: Home, network: bool):
        try:
            return await self.backend.start_kernel(home, network=network)
        except KernelStartError as error:
            raise Unavailable(f"could not start a kernel: {error}", retry_after=RETRY_AFTER) from error

    async def _prepare(self, session: Session) -> None:
        """Apply the session's environment and run its setup code; a failing setup is the client's error."""
        if session.env:
            code = f"import os as _os\n_os.environ.update({json.dumps(session.env)})\ndel _os"
            await self._run_setup(session, code, "env")
        if session.setup:
            await self._run_setup(session, session.setup, "setup")

    async def _run_setup(self, session: Session, code: str, what: str) -> None:
        execution = await session.kernel.execute(code, self.config.setup_timeout, silent=True)
        if execution.status != OK:
            raise BadRequest(f"the session's {what} code failed ({execution.status}): "
                             f"{execution.text[-2000:].strip()}")

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound(f"no session {session_id!r}: it was closed, reaped after "
                           f"{self.config.idle_timeout:g} s idle (--idle-timeout), or never existed")
        return session

    async def close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            raise NotFound(f"no session {session_id!r}")
        for convid, mapped in list(self.conversations.items()):
            if mapped == session_id:
                del self.conversations[convid]
        session.closed = True
        await self.backend.discard(session.kernel, session.home)

    async def close_all(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(self.close(session_id) for session_id in list(self.sessions)),
                             return_exceptions=True)

    async def _reap_forever(self) -> None:
        interval = min(max(self.config.idle_timeout / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            await self.reap()

    async def reap(self) -> None:
        now = time.monotonic()
        lifetime = self.config.max_lifetime
        for session in list(self.sessions.values()):
            idle = not session.lock.locked() and now - session.last_used > self.config.idle_timeout
            old = lifetime is not None and now - session.created > lifetime
            if idle or old:
                log.info("closing session %s (%s)", session.id, "idle" if idle else "lifetime")
                self.metrics.sessions_reaped += 1
                with contextlib.suppress(NotFound):
                    await self.close(session.id)

    # -- executing ---------------------------------------------------------------------------------

    async def execute(self, session: Session, code: str, timeout: float | None = None,
                      sink: EventSink | None = None, allow_stdin: bool = False) -> Execution:
        timeout = timeout or session.timeout
        async with session.lock:
            if session.closed:
                raise NotFound(f"session {session.id} was closed")
            session.last_used = time.monotonic()
            replaced_before = False
            if not await session.kernel.ready():
                await self._replace_kernel(session)
                replaced_before = True
            execution = await session.kernel.execute(code, timeout, sink, allow_stdin=allow_stdin,
                                                     grace=self.config.interrupt_grace)
            if session.closed:
                execution.status = CLOSED
                execution.message = "The session was closed while this code ran; its kernel and files are gone"
                return execution
            if execution.status == NOT_RUN:
                await self._replace_kernel(session)
                replaced_before = True
                execution = await session.kernel.execute(code, timeout, sink, allow_stdin=allow_stdin,
                                                         grace=self.config.interrupt_grace)
            if execution.status == UNRESPONSIVE:
                execution.status = RESTARTED
                execution.message = (
                    f"Execution timed out after {timeout:g} s and the kernel ignored the interrupt; it was "
                    "restarted and all variables and imports were lost (the session's files remain)")
                await self._replace_kernel(session)
            elif execution.status == DIED and session.restart_requested:
                execution.message = ("The kernel was restarted (a restart request) while this code ran; all "
                                     "variables and imports were lost (the session's files remain)")
                await self._replace_kernel(session)
            elif execution.status == DIED:
                execution.message = (
                    f"The kernel died while running this code ({session.kernel.exit_description()}); a fresh "
                    "kernel replaced it and all variables and imports were lost (the session's files remain)")
                await self._replace_kernel(session)
            elif execution.status == TIMEOUT:
                execution.message = (f"Execution timed out after {timeout:g} s and was interrupted; the "
                                     "kernel and its variables are kept (pass a larger timeout to allow more)")
            execution.new_kernel = execution.new_kernel or replaced_before or execution.status in (RESTARTED, DIED)
            session.executions += 1
            session.last_used = time.monotonic()
            self.metrics.observe_execution(execution.status, execution.duration_ms / 1000)
            return execution

    async def _replace_kernel(self, session: Session) -> None:
        """A fresh kernel in the same home, with the session's environment and setup run again."""
        old = session.kernel
        await old.kill()
        session.kernel = await self._start_kernel(session.home, session.network)
        session.generation += 1
        try:
            await self._prepare(session)
        except BadRequest as error:
            log.warning("session %s: setup failed on the replacement kernel: %s", session.id, error)

    async def interrupt(self, session: Session) -> None:
        await session.kernel.interrupt()

    async def restart(self, session: Session) -> None:
        """Kill now (an execute in flight ends as `died`), then make sure a fresh kernel is in place."""
        generation = session.generation
        session.restart_requested = True
        await session.kernel.kill()
        async with session.lock:
            session.restart_requested = False
            if session.closed:
                raise NotFound(f"session {session.id} was closed during the restart")
            if session.generation == generation:
                await self._replace_kernel(session)
            session.last_used = time.monotonic()

    # -- files ---------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _file_access(self, session: Session):
        """Files on a remote kernel travel through it, so they wait for its executes; local ones do not."""
        if self.backend.files_through_kernel:
            async with session.lock:
                yield
        else:
            yield

    async def write_file(self, session: Session, path: str, data: bytes) -> int:
        async with self._file_access(session):
            return await self.backend.write_file(session.home, session.kernel, path, data)

    @contextlib.asynccontextmanager
    async def reading_file(self, session: Session, path: str) -> AsyncIterator[tuple[int, AsyncIterator[bytes]]]:
        """The file's size and its pieces, for the length of the `async with` (a remote kernel's executes wait
        for the download, as it waited for them)."""
        async with self._file_access(session):
            size, chunks = await self.backend.read_file(session.home, session.kernel, path)
            try:
                yield size, chunks
            finally:
                await chunks.aclose()

    async def list_files(self, session: Session) -> tuple[list[dict], bool]:
        async with self._file_access(session):
            return await self.backend.list_files(session.home, session.kernel)

    async def delete_file(self, session: Session, path: str) -> None:
        async with self._file_access(session):
            await self.backend.delete_file(session.home, session.kernel, path)

    # -- the original CodeAct /execute contract ------------------------------------------------------

    async def conversation(self, convid: str) -> tuple[Session, bool]:
        """The session for an original-API conversation id, created on first use."""
        session_id = self.conversations.get(convid)
        if session_id in self.sessions:
            return self.sessions[session_id], False
        session = await self.create(timeout=self.config.compat_timeout)
        self.conversations[convid] = session.id
        return session, True

    def counts(self) -> dict[str, int]:
        return {"sessions": len(self.sessions), "pool_ready": len(self.pool.ready),
                "pool_starting": self.pool.starting,
                "spare_homes": len(getattr(self.backend, "spare_homes", ()))}

