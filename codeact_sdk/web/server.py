"""The web chat's server (`codeact web`): Tornado, thin over the SDK and the conversation store.

Routes (JSON unless said otherwise):
    GET    /api/config                             the server's defaults and MCP servers (names only)
    GET    /api/conversations                      {"conversations": [...]}, the latest first
    POST   /api/conversations                      {title?, settings?} -> 201 the conversation
    GET    /api/conversations/{id}                 {"conversation", "items"}
    PATCH  /api/conversations/{id}                 {title?, settings?} -> the conversation
    DELETE /api/conversations/{id}                 204
    GET    /api/conversations/{id}/export?format=jsonl|sharegpt   a download
    GET    /api/conversations/{id}/files           {"files": [{path, size, modified}]}: the session's directory
    PUT    /api/conversations/{id}/files/{path}    the body is the file (up to MAX_UPLOAD bytes) -> 201
    GET    /api/conversations/{id}/files/{path}    a download
    WS     /api/conversations/{id}/ws              the turns: {"type": "send", "text"} or {"type": "stop"}
                                                   in; out, each event of a turn as turns.py says

Who may call (access.py's rules, the sandbox server's): bound to loopback by default, where the server
answers only requests for a loopback name from no foreign page (no DNS rebinding, no cross-site requests);
beyond loopback a token is required (the server refuses to start without one). The page's own requests
that change anything carry Tornado's XSRF token (cookie and header); a script may send
`Authorization: Bearer <token>` instead. A websocket, which a page elsewhere could open with the user's
cookies, must come from this server's own origin.
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

from tornado import web, websocket

from sandbox_server import access
from sandbox_server.access import MaskedLogs, is_loopback_name, origin_is_this_server

from ..errors import CodeActError, SandboxError
from ..mcp_tools import MCPServer
from ..settings import Settings
from .store import UNTITLED, NotFound, Store
from .turns import Chats

SETTINGS_KEYS = {"model": str, "llm_url": str, "timeout": (int, float), "max_executions": int}
MAX_BODY = 1 << 20  # JSON requests
MAX_UPLOAD = 100 << 20  # a file put into a conversation's session (the sandbox's own --max-file default)


@dataclass(frozen=True)
class WebConfig:
    host: str = "127.0.0.1"
    port: int = 8090
    token: str | None = None
    db_path: str = ""
    # The model, the sandbox (none: a private one is started) and the defaults a conversation's own settings
    # override; applied when a conversation runs, so a conversation keeps only what was set for it.
    base: Settings = field(default_factory=Settings)
    mcp_servers: tuple[MCPServer, ...] = ()  # their tools are in every conversation's kernel

    @property
    def is_loopback(self) -> bool:
        return is_loopback_name(self.host)

    def check(self) -> None:
        if not self.token and not self.is_loopback:
            raise ValueError(f"refusing to serve {self.host} without a token: pass --token (or set "
                             "CODEACT_WEB_TOKEN), or bind 127.0.0.1")


class ApiError(web.HTTPError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, reason=None)
        self.message = message


class Access:
    """Who may call, for the HTTP handlers and the websocket alike: the sandbox server's rules (sandbox_server.
    access), with a login cookie beside the bearer token."""

    config: WebConfig
    request: Any

    def initialize(self, store: Store, config: WebConfig, chats: Chats) -> None:
        self.store = store
        self.config = config
        self.chats = chats

    def authorize(self) -> None:
        if self.config.token:
            if not self.bearer_ok() and not self.cookie_ok():
                raise ApiError(401, "log in: open /login?token=<the server's token>, or send "
                                    "'Authorization: Bearer <token>'")
            return
        try:
            access.check(None, self.request.headers)  # a loopback Host, and no Origin but this server's
        except access.Forbidden as error:
            raise ApiError(403, error.message) from None

    def bearer_ok(self) -> bool:
        return access.token_matches(self.config.token, self.request.headers.get("Authorization", ""))

    def cookie_ok(self) -> bool:
        return hmac.compare_digest((self.get_cookie(LOGIN_COOKIE) or "").encode(), login_value(self.config).encode())


class BaseHandler(Access, MaskedLogs):
    def prepare(self) -> None:
        self.authorize()
        if self.request.method == "GET":
            self.xsrf_token  # noqa: B018 - sets the XSRF cookie the page echoes in a header when it changes things

    def check_xsrf_cookie(self) -> None:
        if not (self.config.token and self.bearer_ok()):  # a header a page cannot send cross-site is proof enough
            super().check_xsrf_cookie()

    async def session_of(self, conversation_id: str):
        """The conversation's AsyncSession, its sandbox session created if this is its first use."""
        self.conversation_or_404(conversation_id)
        chat = self.chats.chat(conversation_id)
        try:
            await self.chats.ready(chat)
        except CodeActError as error:
            raise ApiError(502, str(error)) from None
        return chat.session

    def json_body(self) -> dict[str, Any]:
        if len(self.request.body) > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        try:
            value = json.loads(self.request.body or b"{}")
        except ValueError as error:
            raise ApiError(400, f"body is not valid JSON: {error}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "body must be a JSON object")
        return value

    def send(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload, ensure_ascii=False))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        message = getattr(error, "message", None) or getattr(error, "log_message", None) or self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": status_code, "message": message}))

    def conversation_or_404(self, conversation_id: str):
        try:
            return self.store.get(conversation_id)
        except NotFound:
            raise ApiError(404, f"no conversation {conversation_id!r}") from None


LOGIN_COOKIE = "codeact_login"


def login_value(config: WebConfig) -> str:
    """The login cookie's value: derived from the token, so the token itself never sits in a cookie."""
    return hmac.new(config.token.encode(), b"codeact web login", "sha256").hexdigest()


def title_and_settings(body: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    title = body.get("title")
    if title is not None and not isinstance(title, str):
        raise ApiError(400, "field 'title' must be a string")
    settings = body.get("settings")
    if settings is not None:
        if not isinstance(settings, dict):
            raise ApiError(400, "field 'settings' must be an object")
        for key, value in settings.items():
            if key not in SETTINGS_KEYS:
                raise ApiError(400, f"unknown setting {key!r} (known: {', '.join(sorted(SETTINGS_KEYS))})")
            if not isinstance(value, SETTINGS_KEYS[key]) or isinstance(value, bool):
                raise ApiError(400, f"setting {key!r} has the wrong type")
    return title, settings


class ConfigHandler(BaseHandler):
    """GET /api/config: what the operator set for every conversation (the page's settings show it). No
    secrets: an MCP server's headers and environment stay on the server."""

    def get(self) -> None:
        base = self.config.base
        self.send({"defaults": {"llm_url": base.llm_url, "model": base.model, "timeout": base.timeout,
                                "max_executions": base.max_executions},
                   "mcp_servers": [{"name": server.name, "transport": "http" if server.url else "stdio"}
                                   for server in self.config.mcp_servers]})


class ConversationsHandler(BaseHandler):
    def get(self) -> None:
        self.send({"conversations": [c.summary() for c in self.store.list()]})

    def post(self) -> None:
        title, settings = title_and_settings(self.json_body())
        conversation = self.store.create(title or UNTITLED, settings or {})
        self.send(conversation.summary(), 201)


class ConversationHandler(BaseHandler):
    def get(self, conversation_id: str) -> None:
        conversation = self.conversation_or_404(conversation_id)
        self.send({"conversation": conversation.summary(), "items": self.store.items(conversation_id)})

    def patch(self, conversation_id: str) -> None:
        conversation = self.conversation_or_404(conversation_id)
        title, settings = title_and_settings(self.json_body())
        if title is not None:
            conversation = self.store.rename(conversation_id, title)
        if settings is not None:
            conversation = self.store.configure(conversation_id, {**conversation.settings, **settings})
            self.chats.reconfigure(conversation_id)
        self.send(conversation.summary())

    async def delete(self, conversation_id: str) -> None:
        self.conversation_or_404(conversation_id)
        await self.chats.forget(conversation_id)
        self.store.delete(conversation_id)
        self.set_status(204)
        self.finish()


class ExportHandler(BaseHandler):
    def get(self, conversation_id: str) -> None:
        conversation = self.conversation_or_404(conversation_id)
        kind = self.get_query_argument("format", "jsonl")
        if kind == "jsonl":
            body, extension, mime = self.store.export_jsonl(conversation_id), "jsonl", "application/x-ndjson"
        elif kind == "sharegpt":
            body = json.dumps(self.store.export_sharegpt(conversation_id), ensure_ascii=False, indent=1)
            extension, mime = "json", "application/json"
        else:
            raise ApiError(400, "format must be jsonl or sharegpt")
        name = "".join(c if c.isalnum() or c in "-_" else "-" for c in conversation.title)[:60] or "conversation"
        self.set_header("Content-Type", f"{mime}; charset=utf-8")
        self.set_header("Content-Disposition", f'attachment; filename="{name}.{extension}"')
        self.finish(body.encode())


class FilesHandler(BaseHandler):
    async def get(self, conversation_id: str) -> None:
        session = await self.session_of(conversation_id)
        self.send({"files": await sandbox_call(session.files())})


class FileHandler(BaseHandler):
    async def get(self, conversation_id: str, path: str) -> None:
        session = await self.session_of(conversation_id)
        data = await sandbox_call(session.download(path))
        name = path.rsplit("/", 1)[-1]
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Content-Disposition", f"attachment; filename*=UTF-8''{quote(name)}")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.finish(data)

    async def put(self, conversation_id: str, path: str) -> None:
        session = await self.session_of(conversation_id)
        await sandbox_call(session.upload(path, self.request.body))
        self.send({"path": path, "size": len(self.request.body)}, 201)


async def sandbox_call(awaitable):
    """A files call to the sandbox, its refusals (a path that leaves the directory, a missing file) as the
    sandbox words them, with its status."""
    try:
        return await awaitable
    except SandboxError as error:
        raise ApiError(error.status or 502, str(error)) from None


STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# The page loads only its own files; model text that slipped past the escaping could still run nothing.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
               "frame-ancestors 'none'")


class PageHandler(BaseHandler):
    """GET /: the chat page (static/index.html). Loading it sets the XSRF cookie its requests echo."""

    def get(self) -> None:
        self.set_header("Content-Security-Policy", PAGE_POLICY)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        with open(os.path.join(STATIC, "index.html"), "rb") as handle:
            self.finish(handle.read())

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if status_code == 401:  # a browser with no login yet: say how, as a page
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.finish("<!doctype html><title>CodeAct: log in</title><p>This server needs its token: open "
                        "<code>/login?token=&lt;token&gt;</code> once (the token is printed where the server "
                        "was started, or set in CODEACT_WEB_TOKEN).</p>")
            return
        super().write_error(status_code, **kwargs)


class LoginHandler(BaseHandler):
    """GET /login?token=...: sets the login cookie (HttpOnly, SameSite=Strict) and sends the browser to the page,
    so the token leaves the address bar at once."""

    def authorize(self) -> None:
        pass  # this is where one becomes authorized

    def get(self) -> None:
        offered = self.get_query_argument("token", "")
        if not self.config.token or not access.token_matches(self.config.token, None, offered):
            raise ApiError(401, "wrong token")
        self.set_cookie(LOGIN_COOKIE, login_value(self.config), httponly=True, samesite="Strict")
        self.redirect("/")


class TurnSocket(Access, websocket.WebSocketHandler, MaskedLogs):
    """WS /api/conversations/{id}/ws: a page's turns. Every page watching a conversation gets its events."""

    chat = None  # the conversation's, once open

    async def get(self, *args: Any, **kwargs: Any) -> None:
        try:
            self.authorize()
            self.store.get(args[0])
        except (ApiError, NotFound) as error:
            status, message = (error.status_code, error.message) if isinstance(error, ApiError) else (
                404, f"no conversation {args[0]!r}")
            self.set_status(status)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"error": status, "message": message}))
            return
        await super().get(*args, **kwargs)

    def check_origin(self, origin: str) -> bool:
        # Browsers always send Origin on a websocket: it must be this page, whatever the token says (a login
        # cookie is sent along with a page elsewhere's handshake unless SameSite stops it).
        return origin_is_this_server(origin, self.request.headers.get("Host", "")) or (
            bool(self.config.token) and super().check_origin(origin))

    def open(self, conversation_id: str) -> None:
        self.chat = self.chats.chat(conversation_id)
        self.chat.watchers.add(self.send)
        self.send({"type": "hello", "busy": self.chat.busy})

    def on_message(self, raw: str | bytes) -> None:
        try:
            message = json.loads(raw)
            kind = message.get("type") if isinstance(message, dict) else None
        except ValueError:
            kind = None
        if kind == "send" and isinstance(message.get("text"), str) and message["text"].strip():
            if self.chat.busy:
                self.send({"type": "error", "message": "a reply is in progress: stop it or wait for it"})
            else:
                self.chats.send(self.chat, message["text"])
        elif kind == "stop":
            self.chats.stop(self.chat)
        else:
            self.send({"type": "error", "message": 'send {"type": "send", "text": "..."} or {"type": "stop"}'})

    def on_close(self) -> None:
        if self.chat is not None:
            self.chat.watchers.discard(self.send)

    def send(self, message: dict[str, Any]) -> None:
        if self.ws_connection is not None and not self.ws_connection.is_closing():
            self.write_message(json.dumps(message, ensure_ascii=False))


ID = r"([0-9a-f]{32})"


def make_app(store: Store, config: WebConfig, chats: Chats) -> web.Application:
    dependencies = {"store": store, "config": config, "chats": chats}
    routes = [
        (r"/", PageHandler),
        (r"/login", LoginHandler),
        (r"/api/config", ConfigHandler),
        (r"/api/conversations", ConversationsHandler),
        (rf"/api/conversations/{ID}", ConversationHandler),
        (rf"/api/conversations/{ID}/export", ExportHandler),
        (rf"/api/conversations/{ID}/ws", TurnSocket),
        (rf"/api/conversations/{ID}/files", FilesHandler),
        (rf"/api/conversations/{ID}/files/(.+)", FileHandler),
    ]
    handlers = [(pattern, handler, dependencies) for pattern, handler in routes]
    handlers.append((r"/static/(.*)", web.StaticFileHandler, {"path": STATIC}))  # the page's files, not secret
    return web.Application(handlers, xsrf_cookies=True)


async def serve(config: WebConfig, ready=print) -> None:
    """Serve until SIGINT or SIGTERM; `ready` is told the URL once listening (port 0 picks a free port)."""
    import asyncio
    import signal

    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    private, base = None, config.base
    if base.sandbox_url is None:  # one private sandbox server for every conversation (the [server] extra)
        from ..local_sandbox import LocalSandbox

        private = await asyncio.to_thread(LocalSandbox().start)
        base = replace(base, sandbox_url=private.url, sandbox_token=private.token)
    store = Store(config.db_path)
    chats = Chats(store, base, config.mcp_servers)
    server = HTTPServer(make_app(store, config, chats), max_body_size=MAX_UPLOAD)
    try:
        sockets = bind_sockets(config.port, config.host)
        server.add_sockets(sockets)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, stop.set)
        port = sockets[0].getsockname()[1]
        ready(f"codeact web: http://{config.host}:{port}/ (conversations in {config.db_path}); Ctrl-C stops it")
        await stop.wait()
    finally:
        server.stop()
        await chats.close()
        await asyncio.wait_for(server.close_all_connections(), 5)
        store.close()
        if private is not None:
            await asyncio.to_thread(private.stop)
