"""HTTP and websocket handlers: thin translations between requests and the session manager.

Dependencies arrive through `initialize`; every error leaves through `write_error` as JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from tornado import web, websocket

from . import access
from .config import Config
from .errors import BadRequest, Conflict, NotFound, SandboxError, TooLarge
from .execution import CLOSED, done_event, render_original
from .metrics import Metrics
from .sessions import SessionManager

log = logging.getLogger("sandbox_server.handlers")


def parse_object(raw: bytes | str, what: str = "body") -> dict:
    """A JSON object from a client, or BadRequest: never a 500 for text a client controls (deep nesting,
    lone surrogates such as "\\ud800", which no kernel message could carry)."""
    try:
        value = json.loads(raw)
        json.dumps(value, ensure_ascii=False).encode()
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None
    except UnicodeError as error:
        raise BadRequest(f"{what} is not valid Unicode text ({error.reason}): lone surrogates such as "
                         "\\ud800 are refused") from None
    except ValueError as error:
        raise BadRequest(f"{what} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def field(body: dict, name: str, kinds: type | tuple, required: bool = False, default: Any = None) -> Any:
    """One field of a JSON body, type-checked, with an error that names it."""
    if name not in body or body[name] is None:
        if required:
            raise BadRequest(f"missing field {name!r}")
        return default
    value = body[name]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise BadRequest(f"field {name!r} has the wrong type")
    if not isinstance(value, kinds):
        raise BadRequest(f"field {name!r} has the wrong type: got {type(value).__name__}")
    return value


def positive_timeout(body: dict) -> float | None:
    timeout = field(body, "timeout", (int, float))
    if timeout is not None and not 0 < timeout <= 24 * 3600:
        raise BadRequest("field 'timeout' must be a number of seconds between 0 and 86400")
    return float(timeout) if timeout is not None else None


@web.stream_request_body
class BaseHandler(access.MaskedLogs):
    """Auth, bounded JSON bodies and JSON errors for every route."""

    public = False  # /health opts out of auth
    body_limit_name = "max_body"

    def initialize(self, manager: SessionManager, config: Config, metrics: Metrics) -> None:
        self.manager = manager
        self.config = config
        self.metrics = metrics
        self.chunks: list[bytes] = []
        self.received = 0
        self.overflow = False

    @property
    def body_limit(self) -> int:
        return getattr(self.config, self.body_limit_name)

    def authorize(self) -> None:
        access.check(self.config.token, self.request.headers, public=self.public)

    def prepare(self) -> None:
        self.authorize()
        length = self.request.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.body_limit:
            raise TooLarge(f"request body of {length} bytes exceeds the {self.body_limit}-byte limit "
                           f"(--{self.body_limit_name.replace('_', '-')})")

    def data_received(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.body_limit:
            self.overflow = True
            self.chunks = []
        elif not self.overflow:
            self.chunks.append(chunk)

    @property
    def body(self) -> bytes:
        if self.overflow:
            raise TooLarge(f"request body exceeds the {self.body_limit}-byte limit")
        return b"".join(self.chunks)

    def json_body(self) -> dict:
        """The body as a JSON object, whatever the Content-Type (the original clients send none)."""
        raw = self.body
        return parse_object(raw) if raw.strip() else {}

    def send(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        if isinstance(error, SandboxError):
            code, message = error.code, error.message
            if error.retry_after is not None:
                self.set_header("Retry-After", str(int(error.retry_after)))
        elif isinstance(error, web.HTTPError):
            code, message = "http_error", error.log_message or self._reason
        else:
            code, message = "internal", "internal server error; the server log has the details"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": code, "message": message}))

    def _handle_request_exception(self, error: BaseException) -> None:
        if isinstance(error, SandboxError):
            if self._finished:
                return
            self.send_error(error.status, exc_info=(type(error), error, None))
            return
        super()._handle_request_exception(error)


class HealthHandler(BaseHandler):
    public = True

    def get(self) -> None:
        self.send({"status": "ok", **self.manager.counts()})


class MetricsHandler(BaseHandler):
    def get(self) -> None:
        manager = self.manager
        gauges = {
            "codeact_sessions": ("Open sessions.", lambda: len(manager.sessions)),
            "codeact_pool_ready": ("Warm kernels ready to hand out.", lambda: len(manager.pool.ready)),
            "codeact_pool_starting": ("Warm kernels starting.", lambda: manager.pool.starting),
            "codeact_pool_start_failures": ("Warm kernel starts that failed.", lambda: manager.pool.failures),
        }
        template = getattr(manager.backend, "template", None)
        if template is not None:
            gauges["codeact_template_up"] = ("1 while the kernel template forks kernels; 0 while they boot.",
                                             lambda: int(template.available))
            gauges["codeact_template_deaths"] = ("Times the kernel template died (and was restarted).",
                                                 lambda: template.deaths)
        self.set_header("Content-Type", "text/plain; version=0.0.4")
        self.finish(self.metrics.render(gauges))


class SessionsHandler(BaseHandler):
    async def post(self) -> None:
        body = self.json_body()
        env = field(body, "env", dict, default={})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise BadRequest("field 'env' must map strings to strings")
        session = await self.manager.create(
            setup=field(body, "setup", str, default=""),
            env=env,
            timeout=positive_timeout(body),
            network=field(body, "network", bool, default=False),
            user=field(body, "user", str),
        )
        self.send(session.describe(), 201)

    def get(self) -> None:
        self.send({"sessions": [s.describe() for s in self.manager.sessions.values()]})


class SessionHandler(BaseHandler):
    def get(self, session_id: str) -> None:
        self.send(self.manager.get(session_id).describe())

    async def delete(self, session_id: str) -> None:
        await self.manager.close(session_id)
        self.set_status(204)
        self.finish()


class ExecuteHandler(BaseHandler):
    async def post(self, session_id: str) -> None:
        session = self.manager.get(session_id)
        body = self.json_body()
        code = field(body, "code", str, required=True)
        execution = await self.manager.execute(session, code, positive_timeout(body))
        self.send(execution.to_json())


class InterruptHandler(BaseHandler):
    async def post(self, session_id: str) -> None:
        await self.manager.interrupt(self.manager.get(session_id))
        self.send({"interrupted": True})


class RestartHandler(BaseHandler):
    async def post(self, session_id: str) -> None:
        session = self.manager.get(session_id)
        await self.manager.restart(session)
        self.send(session.describe())


class FilesHandler(BaseHandler):
    async def get(self, session_id: str) -> None:
        found, truncated = await self.manager.list_files(self.manager.get(session_id))
        self.send({"files": found, "truncated": truncated})


class FileHandler(BaseHandler):
    body_limit_name = "max_file"

    async def put(self, session_id: str, path: str) -> None:
        size = await self.manager.write_file(self.manager.get(session_id), path, self.body)
        self.send({"path": path, "size": size}, 201)

    async def get(self, session_id: str, path: str) -> None:
        async with self.manager.reading_file(self.manager.get(session_id), path) as (size, chunks):
            self.set_header("Content-Type", "application/octet-stream")
            self.set_header("Content-Length", str(size))
            async for chunk in chunks:
                self.write(chunk)
                await self.flush()
        self.finish()

    async def delete(self, session_id: str, path: str) -> None:
        await self.manager.delete_file(self.manager.get(session_id), path)
        self.set_status(204)
        self.finish()


class CompatExecuteHandler(BaseHandler):
    """POST /execute {convid, code} -> {result, new_kernel_created}: the original CodeAct contract."""

    async def post(self, *_: str) -> None:
        body = self.json_body()
        convid = field(body, "convid", str, required=True)
        code = field(body, "code", str, required=True)
        session, created = await self.manager.conversation(convid)
        events: list[dict] = []
        execution = await self.manager.execute(session, code, self.config.compat_timeout, sink=events.append)
        self.send({
            "result": render_original(events, execution, self.config.compat_timeout),
            "new_kernel_created": created or execution.new_kernel,
        })


class PathTokenExecuteHandler(CompatExecuteHandler):
    """POST /t/{execute token}/execute: the original route for clients that cannot send headers."""

    def authorize(self) -> None:
        access.check_execute_token(self.config.execute_token, self.path_args[0])


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise NotFound(f"no route {self.request.method} {self.request.path}; see docs/sandbox-api.md")


class StreamHandler(websocket.WebSocketHandler, access.MaskedLogs):
    """WS /v1/sessions/{id}/ws: executes queue in order; events stream as the kernel produces them.

    Client messages: {"type": "execute", "code", "timeout"?}, {"type": "input_reply", "value"},
    {"type": "interrupt"}. Server messages: stdout, stderr, result, display, error, input_request,
    then done; a malformed client message gets {"type": "protocol_error", ...} and the socket stays open.
    """

    def initialize(self, manager: SessionManager, config: Config, metrics: Metrics) -> None:
        self.manager = manager
        self.config = config
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker: asyncio.Task | None = None
        self.session = None

    async def get(self, *args: Any, **kwargs: Any) -> None:
        try:
            access.check(self.config.token, self.request.headers,
                         query_token=self.get_query_argument("token", None))
        except SandboxError as error:
            self.refuse(error)
            return
        session_id = args[0]
        if session_id not in self.manager.sessions:
            self.refuse(NotFound(f"no session {session_id!r}"))
            return
        await super().get(*args, **kwargs)

    def refuse(self, error: SandboxError) -> None:
        """Answer the upgrade request with the same JSON error body as every other route."""
        self.set_status(error.status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": error.code, "message": error.message}))

    def check_origin(self, origin: str) -> bool:
        return True  # decided in get() by access.check, with the same rule as every other route

    def open(self, session_id: str) -> None:
        # Tornado leaves Nagle's algorithm on after the upgrade: 40+ ms per small message without this.
        self.set_nodelay(True)
        self.session = self.manager.sessions[session_id]
        self.worker = asyncio.get_running_loop().create_task(self._run_queue())

    def on_message(self, raw: str | bytes) -> None:
        try:
            message = parse_object(raw, "a message")
            kind = message.get("type")
            if kind == "execute":
                code = field(message, "code", str, required=True)
                self.queue.put_nowait((code, positive_timeout(message)))
            elif kind == "input_reply":
                self.session.kernel.send_input(field(message, "value", str, required=True))
            elif kind == "interrupt":
                asyncio.get_running_loop().create_task(self.manager.interrupt(self.session))
            else:
                raise BadRequest(f"unknown message type {kind!r}: use execute, input_reply or interrupt")
        except SandboxError as error:
            self.send_event({"type": "protocol_error", "error": error.code, "message": error.message})

    async def _run_queue(self) -> None:
        while True:
            code, timeout = await self.queue.get()
            try:
                # Shielded: a client that disconnects cancels the queue, never a half-run execute.
                execution = await asyncio.shield(self.manager.execute(
                    self.session, code, timeout, sink=self.send_event, allow_stdin=True))
                self.send_event(done_event(execution))
                if execution.status == CLOSED:
                    self.close()
                    return
            except SandboxError as error:
                self.send_event({"type": "protocol_error", "error": error.code, "message": error.message})
                if isinstance(error, NotFound | Conflict):
                    self.close()
                    return
            except Exception:  # a bug must not leave the client waiting for a `done` that never comes
                log.exception("execute on session %s failed", self.session.id)
                self.send_event({"type": "protocol_error", "error": "internal",
                                 "message": "internal server error; the server log has the details"})

    def send_event(self, event: dict) -> None:
        try:
            self.write_message(json.dumps(event))
        except websocket.WebSocketClosedError:
            pass  # the client left; the execute still finishes and the session keeps its state

    def on_close(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
