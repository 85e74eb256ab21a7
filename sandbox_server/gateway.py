"""The gateway backend: kernels on a remote Jupyter Kernel Gateway or Enterprise Gateway, reached over REST
(`/api/kernels`) and the `/channels` websocket. Same interface as the local backend, so nothing above the
seam knows which one runs.

Stock Kernel Gateway leaves Nagle's algorithm on for its websockets, and with the client's delayed ACKs every
execute then waits ~40 ms for an ACK. The gateway cannot be changed from here, so this client asks for an
immediate ACK (TCP_QUICKACK, Linux) after every message it reads: the gateway's small writes then go out at
once. docs/scale-out.md gives the deployment setting that removes the cause on the gateway side.

A gateway may remove a kernel without a word on its websocket (culling idle kernels with `cull_connected`, an
operator's DELETE): the backend asks the gateway which of its kernels still exist every
--gateway-poll-interval, and marks the others gone, so a session replaces its kernel at its next execute and
the pool refills.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import secrets
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from tornado import httpclient, websocket
from tornado.httputil import url_concat

from . import files
from .backend import Home, start_or_kill
from .config import Config
from .errors import BadRequest, NotFound, Unavailable
from .execution import DIED, OK, EventSink, Execution, OutputCollector
from .kernel import KernelStartError, kernel_setup_code
from .protocol import NOT_RUN, ExecuteState, Pacer, clean

log = logging.getLogger("sandbox_server.gateway")

POLL_INTERVAL = 0.25
# Before opening a kernel's websocket again after it failed as the kernel started: doubled each time, up to the max.
RECONNECT_DELAY, RECONNECT_DELAY_MAX = 0.1, 1.0
DELETE_RETRIES = 8  # Kernel Gateway answers 500 to a DELETE while it restarts the kernel (after os._exit)
DELETE_BACKOFF_MAX = 4.0  # seconds between retries, at most: the eight span about 20 s
CLOSE_WAIT = 2.0  # at shutdown, for deletes in flight (the server's stop has 4.5 s in all)
# For a session's directory to be removed by its kernel: milliseconds, unless the session's code replaced the
# removal with something that never ends. Past it the kernel is deleted anyway and the directory left.
REMOVE_HOME_TIMEOUT = 1.0
HOMES = "codeact-sessions"  # sessions' directories, under the directory the gateway starts kernels in
FILE_CHUNK = 512 * 1024  # at most, bytes per execute when files travel through the kernel
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class GatewayUnavailable(RuntimeError):
    """The gateway cannot be reached or refused a request; `code` is its HTTP status, if it answered."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def decode_frame(raw: str | bytes) -> dict:
    """A Jupyter message from one websocket frame. Text frames are its JSON; a message with binary buffers (a
    Comm's, as widgets and some plotting libraries send) comes as a binary frame: a count n and n offsets
    (big-endian uint32), then the JSON and the buffers at those offsets. Raises ValueError on anything else."""
    if isinstance(raw, str):
        return json.loads(raw)
    try:
        count = struct.unpack_from("!I", raw)[0]
        offsets = [*struct.unpack_from(f"!{count}I", raw, 4), len(raw)] if 0 < count < 1024 else []
    except struct.error as error:
        raise ValueError(f"a binary frame with a broken header: {error}") from None
    if not offsets or offsets != sorted(offsets) or offsets[0] < 4 * (count + 1):
        raise ValueError("a binary frame whose offsets do not fit it")
    message = json.loads(raw[offsets[0]:offsets[1]])
    message["buffers"] = [raw[start:end] for start, end in itertools.pairwise(offsets[1:])]
    return message


def gateway_reason(error: httpclient.HTTPClientError) -> str:
    """The gateway's own words when it gave some (JSON `message`/`reason`), else the HTTP reason."""
    body = getattr(error.response, "body", None) or b""
    with contextlib.suppress(ValueError, AttributeError):
        answer = json.loads(body)
        if isinstance(answer, dict) and (answer.get("message") or answer.get("reason")):
            return str(answer.get("message") or answer.get("reason"))[:500]
    return error.message


class GatewayKernel:
    """A kernel on the gateway: REST for lifecycle, one websocket for messages (reconnected if it drops)."""

    def __init__(self, backend: GatewayBackend, kernel_id: str, name: str, home: Home) -> None:
        self.backend = backend
        self.kernel_id = kernel_id
        self.name = name
        self.home = home
        self.user = backend.user_for(home)
        self.busy = False  # an execute owns the websocket's reads
        self.deleting = False
        self.watched_since = time.monotonic()  # the gateway's answers to questions asked later must list it
        self.connection: websocket.WebSocketClientConnection | None = None
        self.session_id = uuid.uuid4().hex
        self.gone = False  # the gateway no longer has this kernel (it died, or the gateway restarted)
        self.received_at = 0.0  # when the last message arrived, before it was decoded
        self.gone_reason = ""

    @property
    def alive(self) -> bool:
        return not self.gone

    def exit_description(self) -> str:
        return self.gone_reason or "lost by the gateway"

    async def ready(self) -> bool:
        """Whether the kernel can take an execute now: a dropped websocket is reconnected first, and a kernel
        the gateway no longer has (it died, or the gateway restarted) is found out before any code is sent."""
        if not self.gone and (self.connection is None or self.connection.protocol is None
                              or self.connection.protocol.is_closing()):
            await self.recover()
        return not self.gone

    async def connect(self) -> None:
        url = self.backend.ws_url + f"/api/kernels/{self.kernel_id}/channels"
        request = httpclient.HTTPRequest(url_concat(url, {"session_id": self.session_id}),
                                         headers=self.backend.headers, connect_timeout=10, request_timeout=30)
        try:
            self.connection = await websocket.websocket_connect(
                request, max_message_size=self.backend.config.max_message)
        except (OSError, httpclient.HTTPClientError, websocket.WebSocketError) as error:
            raise GatewayUnavailable(f"cannot open the websocket of kernel {self.kernel_id}: {error}")
        raw = self.connection.stream.socket if self.connection.stream is not None else None
        if raw is None:  # closed as soon as it opened (a proxy, a blip): the caller may open another
            self.connection = None
            raise GatewayUnavailable(f"the websocket of kernel {self.kernel_id} closed as it opened")
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def start(self, timeout: float) -> None:
        """Open the kernel's websocket, wait until the kernel answers on shell and iopub, then set it up. A
        websocket that will not open, or that drops before the kernel has answered (a network blip, a proxy, a
        gateway still starting the kernel), is opened again until the deadline; a start that fails is a
        KernelStartError (the client's 503), whatever the gateway did."""
        deadline = time.monotonic() + timeout
        delay = RECONNECT_DELAY
        while True:
            try:
                await self._answering(deadline, timeout)
                break
            except (GatewayUnavailable, ConnectionError, websocket.WebSocketClosedError, asyncio.TimeoutError) as error:
                problem = str(error) or type(error).__name__
            if self.connection is not None:
                self.connection.close()
                self.connection = None
            if time.monotonic() + delay > deadline:
                raise KernelStartError(f"gateway kernel {self.kernel_id} could not be reached within {timeout:g} s "
                                       f"(--kernel-start-timeout): {problem}")
            if not await self.backend.kernel_exists(self.kernel_id):
                raise KernelStartError(f"the gateway lost kernel {self.kernel_id} as it started ({problem})")
            log.info("kernel %s: its websocket failed as it started (%s); opening another", self.name, problem)
            await asyncio.sleep(delay)
            delay = min(2 * delay, RECONNECT_DELAY_MAX)
        setup = f"{kernel_setup_code(self.backend.config)}\n_codeact_enter_home({self.home.workdir!r})"
        execution = await self.execute(setup, max(deadline - time.monotonic(), 1.0), silent=True)
        if execution.status != OK:
            raise KernelStartError(f"gateway kernel {self.kernel_id} setup failed: {execution.text[-500:]}")

    async def _answering(self, deadline: float, timeout: float) -> None:
        """Until the kernel has answered a kernel_info on shell and iopub: on a busy gateway a new kernel's iopub
        can miss the first status, so the request is sent again every half second."""
        if self.connection is None:
            await asyncio.wait_for(self.connect(), max(deadline - time.monotonic(), 0.001))
        shell_ready = iopub_ready = False
        while not (shell_ready and iopub_ready):
            if time.monotonic() > deadline:
                raise KernelStartError(f"gateway kernel {self.kernel_id} did not answer within {timeout:g} s "
                                       "(--kernel-start-timeout)")
            msg_id = await self.send("kernel_info_request", {}, "shell")
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                message = await self.receive(end - time.monotonic())
                if message is None:
                    continue
                if message["parent_header"].get("msg_id") != msg_id:
                    continue
                kind = message["header"]["msg_type"]
                shell_ready = shell_ready or kind == "kernel_info_reply"
                iopub_ready = iopub_ready or (message.get("channel") == "iopub" and kind == "status")
                if shell_ready and iopub_ready:
                    break

    async def send(self, msg_type: str, content: dict, channel: str) -> str:
        msg_id = uuid.uuid4().hex
        message = {
            "header": {"msg_id": msg_id, "msg_type": msg_type, "username": self.user, "session": self.session_id,
                       "date": "", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "content": content, "channel": channel, "buffers": [],
        }
        if self.connection is None:
            await self.connect()
        try:
            await self.connection.write_message(json.dumps(message))
        except websocket.WebSocketClosedError:
            await self.connect()  # a dropped socket: the message was not sent; send it on a new one
            await self.connection.write_message(json.dumps(message))
        return msg_id

    async def receive(self, timeout: float) -> dict | None:
        """The next message, or None after `timeout`; raises ConnectionError when the socket closed."""
        if self.connection is None:
            raise ConnectionError("websocket closed")
        try:
            raw = await asyncio.wait_for(self.connection.read_message(), max(timeout, 0.001))
        except asyncio.TimeoutError:
            return None
        if raw is None:
            raise ConnectionError("websocket closed")
        if TCP_QUICKACK is not None and self.connection.stream is not None:
            with contextlib.suppress(OSError):
                self.connection.stream.socket.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
        self.received_at = time.monotonic()  # what follows is this message's cost to the loop (see Pacer)
        try:
            return decode_frame(raw)
        except ValueError as error:  # the gateway's bug or a proxy's, not the session's: skip the frame
            log.warning("kernel %s: a websocket frame that is not a Jupyter message (%s), skipped", self.name, error)
            return None

    def send_input(self, text: str) -> None:
        self.backend.in_background(self.send("input_reply", {"value": text}, "stdin"), f"input for {self.name}")

    async def interrupt(self) -> None:
        with contextlib.suppress(GatewayUnavailable):
            await self.backend.rest("POST", f"/api/kernels/{self.kernel_id}/interrupt", {})

    async def kill(self) -> None:
        """Close the socket and ask the gateway to delete the kernel, without waiting for it to comply:
        a kernel that ignores the shutdown request costs the gateway its shutdown wait, not us."""
        self.mark_gone("killed")
        if not self.deleting:
            self.deleting = True
            self.backend.in_background(self.backend.delete_kernel(self.kernel_id), f"deleting {self.name}")

    async def remove_home(self) -> None:
        """The session's directory, removed by its kernel (the only one that can reach it): when it is idle."""
        if self.gone or self.busy:
            log.info("session directory %s left on the gateway: its kernel is %s", self.home.workdir,
                     "gone" if self.gone else "busy")
            return
        execution = await self.execute("_codeact_remove_home()", REMOVE_HOME_TIMEOUT, silent=True, grace=0.1)
        if execution.status != OK:
            log.warning("session directory %s left on the gateway: %s", self.home.workdir, execution.text[-300:])

    async def execute(self, code: str, timeout: float, sink: EventSink | None = None, allow_stdin: bool = False,
                      silent: bool = False, grace: float = 1.0) -> Execution:
        started = time.monotonic()
        collector = OutputCollector(self.backend.config.max_output, self.backend.config.max_results, sink)
        if self.gone:
            return collector.finish(DIED, None, 0.0)
        self.busy = True
        try:
            return await self._execute(code, started, collector, allow_stdin, silent, timeout, grace)
        finally:
            self.busy = False

    async def _execute(self, code: str, started: float, collector: OutputCollector, allow_stdin: bool,
                       silent: bool, timeout: float, grace: float) -> Execution:
        content = {"code": code, "silent": silent, "store_history": not silent, "user_expressions": {},
                   "allow_stdin": allow_stdin, "stop_on_error": False}
        try:
            msg_id = await self.send("execute_request", content, "shell")
        except (GatewayUnavailable, OSError, websocket.WebSocketError) as error:
            self.mark_gone(f"the gateway could not be reached ({error})")
            return collector.finish(NOT_RUN, None, 0.0)
        state = ExecuteState(msg_id, collector, deadline=started + timeout, grace=grace)
        pacer = Pacer()
        while (status := await state.verdict(time.monotonic(), self.interrupt)) is None:
            try:
                message = await self.receive(state.wait(time.monotonic(), POLL_INTERVAL))
            except ConnectionError:
                status = await self.recover()
                if status is None:
                    continue  # reconnected: the gateway replays what the kernel sent meanwhile
                if status == DIED and not state.started:
                    status = NOT_RUN  # the socket broke before the kernel saw the code
                break
            if message is None:
                continue
            if (message.get("channel") == "iopub" and message["header"]["msg_type"] == "status"
                    and message["content"].get("execution_state") in ("restarting", "dead")):
                self.mark_gone("the kernel died and the gateway restarted it, state lost")
                status = DIED
                break
            state.on_message(message.get("channel", ""), await clean(message))
            await pacer.step(self.received_at)
        return collector.finish(status, state.execution_count, (time.monotonic() - started) * 1000)

    async def recover(self) -> str | None:
        """After the websocket dropped: reconnect if the kernel still exists, else report it dead."""
        if self.gone:
            return DIED  # we killed it (DELETE, /restart): never reconnect to a kernel being deleted
        if not await self.backend.kernel_exists(self.kernel_id):
            self.mark_gone("the gateway no longer has this kernel (it died or the gateway restarted)")
            return DIED
        try:
            await self.connect()
        except GatewayUnavailable as error:
            self.mark_gone(str(error))
            return DIED
        return None

    def mark_gone(self, reason: str) -> None:
        """From now on the kernel is dead to us; an execute waiting on its websocket ends at once."""
        if not self.gone:
            self.gone = True
            self.gone_reason = reason
        self.backend.kernels.pop(self.kernel_id, None)
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class GatewayBackend:
    """Kernels on a Kernel Gateway / Enterprise Gateway; files travel through the kernel."""

    files_through_kernel = True

    def __init__(self, config: Config) -> None:
        self.config = config
        base = (config.gateway_url or "").rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ValueError("--gateway-url must be an http:// or https:// URL")
        self.url = base
        self.ws_url = "ws" + base[len("http"):]
        self.headers = {"Authorization": f"token {config.gateway_token}"} if config.gateway_token else {}
        self.client = httpclient.AsyncHTTPClient()
        self.kernel_env = json.loads(config.gateway_env) if config.gateway_env else {}
        self.kernels: dict[str, GatewayKernel] = {}  # ours that the gateway should still have
        self.can_list = True  # whether GET /api/kernels is allowed (both gateways forbid it by default)
        self.watcher: asyncio.Task | None = None
        self.background: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
        # A chunk travels as base64 on stdout, which the output cap must not cut.
        self.file_chunk = max(1024, min(FILE_CHUNK, config.max_output // 4 * 3 // 4))

    def in_background(self, work: Awaitable[None], what: str) -> None:
        """Start `work` without waiting for it; a failure is logged, since nobody awaits it."""
        task = asyncio.ensure_future(work)
        self.background.add(task)

        def finished(task: asyncio.Task) -> None:
            self.background.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.warning("%s failed: %s", what, task.exception())

        task.add_done_callback(finished)

    async def check(self) -> None:
        """Fail at start-up, clearly, when the gateway is not there or refuses our token."""
        try:
            await self.rest("GET", "/api/kernelspecs")
        except GatewayUnavailable as error:
            raise GatewayUnavailable(f"the gateway at {self.url} is not usable: {error}; check --gateway-url and "
                                     "--gateway-token")

    async def rest(self, method: str, path: str, body: dict | None = None) -> Any:
        request = httpclient.HTTPRequest(self.url + path, method=method, headers={**self.headers,
                                         "Content-Type": "application/json"},
                                         body=json.dumps(body) if body is not None else None,
                                         connect_timeout=10, request_timeout=self.config.kernel_start_timeout)
        try:
            response = await self.client.fetch(request)
        except httpclient.HTTPClientError as error:
            raise GatewayUnavailable(f"{method} {path} answered {error.code}: {gateway_reason(error)}", error.code)
        except OSError as error:
            raise GatewayUnavailable(f"{method} {path} failed: {error}")
        return json.loads(response.body) if response.body else None

    async def kernel_exists(self, kernel_id: str) -> bool:
        try:
            await self.rest("GET", f"/api/kernels/{kernel_id}")
            return True
        except GatewayUnavailable:
            return False

    async def delete_kernel(self, kernel_id: str) -> None:
        """DELETE, retried with backoff: a kernel the gateway keeps runs there until the gateway stops."""
        delay = 0.25
        for attempt in range(1, DELETE_RETRIES + 1):
            try:
                await self.rest("DELETE", f"/api/kernels/{kernel_id}")
                return
            except GatewayUnavailable as error:
                if error.code == 404:
                    return  # gone already (it died, was culled, or the gateway restarted)
                if attempt == DELETE_RETRIES:
                    log.error("kernel %s is left on the gateway: %d deletes failed, the last with %s", kernel_id,
                              attempt, error)
                    return
                log.warning("deleting kernel %s failed (%s); retrying in %.2g s", kernel_id, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, DELETE_BACKOFF_MAX)

    # -- noticing kernels the gateway removed -----------------------------------------------------------

    def watch(self, kernel: GatewayKernel) -> None:
        self.kernels[kernel.kernel_id] = kernel
        if self.watcher is None:
            self.watcher = asyncio.ensure_future(self._watch_forever())

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.gateway_poll_interval)
            asked_at = time.monotonic()
            watched = [kernel for kernel in self.kernels.values() if kernel.watched_since < asked_at]
            if not watched:
                continue
            try:
                present = await self._present(watched)
            except GatewayUnavailable as error:  # unreachable: the next execute finds out (ready())
                log.debug("cannot ask the gateway for its kernels: %s", error)
                continue
            except Exception as error:  # an answer we cannot read (a proxy's page): ask again, never stop asking
                log.warning("the gateway's list of kernels could not be read: %r", error)
                continue
            for kernel in watched:
                if kernel.kernel_id not in present and not kernel.gone:
                    log.info("kernel %s was removed by the gateway (culled as idle, or deleted by its operator)",
                             kernel.name)
                    kernel.mark_gone("the gateway removed this kernel (culled as idle, or deleted by its operator)")

    async def _present(self, watched: list[GatewayKernel]) -> set[str]:
        """Which of `watched` the gateway still has: one listing where the gateway allows it, else one GET each."""
        if self.can_list:
            try:
                return {kernel["id"] for kernel in await self.rest("GET", "/api/kernels")}
            except GatewayUnavailable as error:
                if error.code != 403:
                    raise
                self.can_list = False  # --KernelGatewayApp.list_kernels / EG_LIST_KERNELS is off
        answers = await asyncio.gather(*(self.rest("GET", f"/api/kernels/{kernel.kernel_id}")
                                         for kernel in watched), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException) and getattr(answer, "code", None) != 404:
                raise answer if isinstance(answer, GatewayUnavailable) else GatewayUnavailable(str(answer))
        return {kernel.kernel_id for kernel, answer in zip(watched, answers, strict=True)
                if not isinstance(answer, BaseException)}

    # -- sessions' homes and kernels ----------------------------------------------------------------------

    async def new_home(self) -> Home:
        name = f"s-{secrets.token_hex(6)}"
        return Home(name=name, workdir=f"{HOMES}/{name}", uid=None)

    def user_for(self, home: Home) -> str:
        return home.user or self.config.gateway_username

    async def start_kernel(self, home: Home, network: bool = False) -> GatewayKernel:
        env = {**self.kernel_env, "KERNEL_USERNAME": self.user_for(home)}
        try:
            created = await self.rest("POST", "/api/kernels", {"name": self.config.gateway_kernel, "env": env})
        except GatewayUnavailable as error:
            hint = " (see --gateway-username and --gateway-session-users)" if error.code == 403 else ""
            raise KernelStartError(f"the gateway could not start a kernel for user {env['KERNEL_USERNAME']!r}: "
                                   f"{error}{hint}")
        kernel = GatewayKernel(self, created["id"], f"gateway-{created['id'][:8]}", home)
        self.watch(kernel)
        return await start_or_kill(kernel, self.config.kernel_start_timeout)

    async def remove_home(self, home: Home) -> None:
        pass  # a kernel that never started made no directory; discard() removes the others

    async def discard(self, kernel: GatewayKernel, home: Home) -> None:
        await kernel.remove_home()
        await kernel.kill()

    async def close(self) -> None:
        """Stop watching, and give the kernels' deletes a moment to finish (a deleted kernel is not leaked)."""
        if self.watcher is not None:
            self.watcher.cancel()
        if self.background:
            await asyncio.wait(set(self.background), timeout=CLOSE_WAIT)
        self.client.close()

    # -- files, through the kernel --------------------------------------------------------------------

    async def write_file(self, home: Home, kernel: GatewayKernel, path: str, data: bytes) -> int:
        files.check_size(path, len(data), self.config.max_file)
        for offset in range(0, max(len(data), 1), self.file_chunk):
            chunk = base64.b64encode(data[offset:offset + self.file_chunk]).decode()
            await self._file_call(kernel, "write", path, chunk, offset == 0)
        return len(data)

    async def read_file(self, home: Home, kernel: GatewayKernel, path: str) -> tuple[int, AsyncIterator[bytes]]:
        size = int(await self._file_call(kernel, "size", path))
        files.check_size(path, size, self.config.max_file)

        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(0, size, self.file_chunk):
                yield base64.b64decode(await self._file_call(kernel, "read", path, offset,
                                                             min(self.file_chunk, size - offset)))

        return size, chunks()

    async def list_files(self, home: Home, kernel: GatewayKernel) -> tuple[list[dict], bool]:
        return json.loads(await self._file_call(kernel, "list", ".")), False

    async def delete_file(self, home: Home, kernel: GatewayKernel, path: str) -> None:
        await self._file_call(kernel, "delete", path)

    async def _file_call(self, kernel: GatewayKernel, operation: str, *args: Any) -> str:
        call = f"_codeact_file_operation({operation!r}, *{list(args)!r})"
        execution = await kernel.execute(f"print({call}, end='')", self.config.setup_timeout, silent=True)
        if execution.status == OK and not execution.truncated:
            return execution.stdout
        error = execution.error or {"name": execution.status, "value": execution.message or "no answer"}
        if error["name"] == "FileNotFoundError":
            raise NotFound(f"no file {args[0] if args else ''!r} in the session directory")
        if error["name"] in ("ValueError", "IsADirectoryError", "PermissionError", "NotADirectoryError"):
            raise BadRequest(f"{error['name']}: {error['value']}")
        raise Unavailable(f"the kernel could not {operation} the file: {error['name']}: {error['value']}")
