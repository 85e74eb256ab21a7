"""Who may call the server: the bearer token and, on a server without one, the browser rules.

A token-less server is open to any process on the machine by design (the original CodeAct clients cannot
send a token). It must not be open to web pages the user visits: a page can POST `text/plain` to
127.0.0.1 without a preflight (cross-site request forgery), and a page on a domain that resolves to
127.0.0.1 can drive the whole API (DNS rebinding). So without a token the server answers only requests
whose `Host` is a loopback name and whose `Origin`, when a browser sent one, is the server itself.
With a token these checks are moot: a page cannot learn the token.

Clients that cannot send headers (the original chat-ui fork calls `JUPYTER_API_URL + "/execute"` with none)
get a second token, in the URL path: POST /t/<execute token>/execute, the original route and nothing else.
A URL is copied into configuration files and logs more easily than a header, so that token opens no other
route, and the server's logs mask it.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from urllib.parse import urlsplit

from tornado import web
from tornado.httputil import split_host_and_port

from .errors import Forbidden, NotFound, Unauthorized

MISSING_TOKEN = ("missing or wrong token: send 'Authorization: Bearer <token>' with the server's --token / "
                 "CODEACT_SANDBOX_TOKEN")


def token_matches(expected: str | None, authorization: str | None, query_token: str | None = None) -> bool:
    if not expected:
        return True
    offered = query_token or ""
    if authorization and authorization.startswith("Bearer "):
        offered = authorization[len("Bearer ") :]
    return hmac.compare_digest(offered.encode(), expected.encode())


def is_loopback_name(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: names no DNS answer can point elsewhere or a web site can own."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin_is_this_server(origin: str, host_header: str) -> bool:
    """Whether a browser's Origin names this server (loopback, same port), as a same-origin page would."""
    try:
        parts = urlsplit(origin)
        origin_port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    _, host_port = split_host_and_port(host_header)
    return (parts.scheme in ("http", "https") and parts.hostname is not None
            and is_loopback_name(parts.hostname) and origin_port == (host_port or 80))


def check(token: str | None, headers, public: bool = False, query_token: str | None = None) -> None:
    """Raise Unauthorized or Forbidden for a request this server must not answer; return if it may."""
    if token:
        if not public and not token_matches(token, headers.get("Authorization"), query_token):
            raise Unauthorized(MISSING_TOKEN)
        return
    host_header = headers.get("Host", "")
    if not is_loopback_name(split_host_and_port(host_header)[0]):
        raise Forbidden(f"Host {host_header!r} is not a loopback name: a server without a token answers only "
                        "requests for 127.0.0.1 / localhost (set a token to serve other names)")
    origin = headers.get("Origin")
    if origin is not None and not origin_is_this_server(origin, host_header):
        raise Forbidden(f"cross-origin request from {origin!r} refused: web pages may not call a server that "
                        "has no token")


def check_execute_token(expected: str | None, offered: str) -> None:
    """The path token of POST /t/<token>/execute: the route exists only on a server given --execute-token."""
    if not expected:
        raise NotFound("no route /t/.../execute: this server has no --execute-token; use /execute with its token")
    if not hmac.compare_digest(offered.encode(), expected.encode()):
        raise Unauthorized("wrong execute token in the URL")


# A "t" segment and the one after it, wherever it stands: a client may send `//t/...` or the absolute form
# `http://host/t/...`, which no route answers but the access log still shows. Masking more is harmless.
PATH_TOKEN = re.compile(r"(?<![^/])t/[^/?#]*")
QUERY_TOKEN = re.compile(r"([?&]token=)[^&#]*")


def masked(uri: str) -> str:
    """A request URI as logs may show it: the path token and a websocket's ?token= replaced."""
    return QUERY_TOKEN.sub(r"\1***", PATH_TOKEN.sub("t/***", uri))


class MaskedLogs(web.RequestHandler):
    """Tornado's request logs (the access log, warnings, uncaught errors) without tokens in URLs. The sandbox's
    handlers and the web chat's (`/login?token=`) use it."""

    def _request_summary(self) -> str:
        return f"{self.request.method} {masked(self.request.uri or '')} ({self.request.remote_ip})"

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, web.HTTPError):
            super().log_exception(typ, value, tb)
        else:  # Tornado's own line adds the request's repr, which holds the URI unmasked
            web.app_log.error("Uncaught exception %s", self._request_summary(), exc_info=(typ, value, tb))
