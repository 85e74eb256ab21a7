"""The sandbox client: sessions over HTTP, executes over the session's websocket, files.

Every wait has a deadline: the execute's own timeout plus a margin for the server to interrupt, kill
and replace a stuck kernel. A websocket that drops is reconnected once per execute.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests
import websocket

from .errors import SandboxAuthError, SandboxConnectionError, SandboxError, SandboxTimeout

# Beyond an execute's timeout, how long the server may take to interrupt, kill and replace the kernel.
RECOVERY_MARGIN = 30.0


@dataclass
class Execution:
    """What one execute produced. An exception in the code is data (status "error"), not a raised error."""

    status: str = "ok"  # ok | error | timeout | restarted | died
    stdout: str = ""
    stderr: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)  # {"type": "result"|"display", "data", ...}
    error: dict[str, Any] | None = None  # {"name", "value", "traceback"}
    execution_count: int | None = None
    duration_ms: float = 0.0
    truncated: bool = False
    new_kernel: bool = False
    message: str | None = None

    @property
    def images(self) -> list[bytes]:
        """PNG and JPEG images from results and displays, as bytes."""
        found = []
        for result in self.results:
            for mime in ("image/png", "image/jpeg"):
                if mime in result.get("data", {}):
                    found.append(base64.b64decode(result["data"][mime]))
        return found

    @property
    def text(self) -> str:
        """Streams, text results (images as a short placeholder), the error and the status message."""
        parts = [self.stdout, self.stderr]
        for result in self.results:
            data = result.get("data", {})
            images = [mime for mime in data if mime.startswith("image/")]
            for mime in images:
                size = len(base64.b64decode(data[mime])) if isinstance(data[mime], str) else 0
                parts.append(f"[image: {mime}, {size} bytes]\n")
            text = data.get("text/plain")
            if text and not images:
                parts.append(text if text.endswith("\n") else text + "\n")
        if self.error:
            parts.append("\n".join(self.error.get("traceback") or [f"{self.error['name']}: {self.error['value']}"]))
            parts.append("\n")
        if self.message:
            parts.append(f"[{self.message}]\n")
        return "".join(parts)

    @classmethod
    def from_json(cls, data: dict) -> Execution:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


EventCallback = Callable[[dict], None]


class SandboxClient:
    """Usage:
        sandbox = SandboxClient("http://127.0.0.1:8081", token)
        session_id = sandbox.create_session()
        print(sandbox.execute(session_id, "1 + 1").text)
    """

    def __init__(self, url: str, token: str | None = None, request_timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.request_timeout = request_timeout
        self.http = requests.Session()
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"
        self.sockets: dict[str, websocket.WebSocket] = {}

    # -- sessions ------------------------------------------------------------------------------------

    def create_session(self, setup: str = "", env: dict[str, str] | None = None, timeout: float | None = None,
                       network: bool = False, user: str | None = None) -> str:
        """A new session's id; `user` names who its kernels are started for on a gateway (the server needs
        --gateway-session-users)."""
        body = {"setup": setup, "env": env or {}, "network": network}
        if timeout is not None:
            body["timeout"] = timeout
        if user is not None:
            body["user"] = user
        return self._call("POST", "/v1/sessions", json=body).json()["id"]

    def close_session(self, session_id: str) -> None:
        self._drop_socket(session_id)
        try:
            self._call("DELETE", f"/v1/sessions/{session_id}")
        except SandboxError as error:
            if error.status != 404:
                raise

    def interrupt(self, session_id: str) -> None:
        self._call("POST", f"/v1/sessions/{session_id}/interrupt")

    def restart(self, session_id: str) -> None:
        self._call("POST", f"/v1/sessions/{session_id}/restart")

    # -- files ---------------------------------------------------------------------------------------

    def upload(self, session_id: str, path: str, data: bytes) -> None:
        self._call("PUT", f"/v1/sessions/{session_id}/files/{quote(path, safe='/')}", data=data)

    def download(self, session_id: str, path: str) -> bytes:
        return self._call("GET", f"/v1/sessions/{session_id}/files/{quote(path, safe='/')}").content

    def list_files(self, session_id: str) -> list[dict]:
        return self._call("GET", f"/v1/sessions/{session_id}/files").json()["files"]

    # -- executing -----------------------------------------------------------------------------------

    def execute(self, session_id: str, code: str, timeout: float | None = None,
                on_event: EventCallback | None = None, on_input: Callable[[str], str] | None = None) -> Execution:
        """Run code, passing each event (stdout, stderr, result, display, error) to `on_event` as it arrives.

        `on_input` answers `input()` calls in the code; without it they get an empty line.
        """
        events = self.execute_events(session_id, code, timeout, on_input)
        while True:
            try:
                event = next(events)
            except StopIteration as finished:
                return finished.value
            if on_event is not None:
                on_event(event)

    def execute_events(self, session_id: str, code: str, timeout: float | None = None,
                       on_input: Callable[[str], str] | None = None) -> Generator[dict, str | None, Execution]:
        """Run code over the session's websocket; yields each event, returns the Execution.

        An `input_request` event is answered with the value sent back into the generator (`send`), else
        with `on_input(prompt)`, else an empty line."""
        message = {"type": "execute", "code": code}
        if timeout is not None:
            message["timeout"] = timeout
        deadline = time.monotonic() + (timeout or 60.0) + RECOVERY_MARGIN
        socket = self._socket(session_id)
        try:
            socket.send(json.dumps(message))
        except (websocket.WebSocketException, OSError):
            self._drop_socket(session_id)
            socket = self._socket(session_id)  # reconnect once: a dropped socket has not run anything
            socket.send(json.dumps(message))
        execution = Execution()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._drop_socket(session_id)
                raise SandboxTimeout(f"no result from {self.url} within {timeout or 60.0:g} s plus "
                                     f"{RECOVERY_MARGIN:g} s; raise timeout= or check the sandbox server")
            socket.settimeout(remaining)
            try:
                event = json.loads(socket.recv())
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError, ValueError) as error:
                self._drop_socket(session_id)
                raise SandboxConnectionError(f"the websocket to {self.url} closed during an execute: {error}")
            kind = event.get("type")
            if kind == "input_request":
                answer = yield event
                if answer is None:
                    answer = on_input(event.get("prompt", "")) if on_input else ""
                socket.send(json.dumps({"type": "input_reply", "value": answer}))
            elif kind == "protocol_error":
                raise SandboxError(f"the sandbox refused the execute: {event.get('message')}")
            elif kind == "done":
                for name in ("status", "execution_count", "duration_ms", "truncated", "new_kernel", "message"):
                    setattr(execution, name, event.get(name))
                return execution
            else:
                apply_event(execution, event)
                yield event

    def _socket(self, session_id: str) -> websocket.WebSocket:
        socket = self.sockets.get(session_id)
        if socket is None or not socket.connected:
            url = self.url.replace("http://", "ws://").replace("https://", "wss://") + f"/v1/sessions/{session_id}/ws"
            headers = [f"Authorization: Bearer {self.token}"] if self.token else []
            try:
                socket = websocket.create_connection(url, header=headers, timeout=self.request_timeout,
                                                     enable_multithread=True)
            except websocket.WebSocketBadStatusException as error:
                raise self._status_error(error.status_code, url, str(error))
            except (websocket.WebSocketException, OSError) as error:
                raise SandboxConnectionError(f"cannot open a websocket to {url}: {error}; is the sandbox running? "
                                             "Set sandbox_url= or CODEACT_SANDBOX_URL")
            self.sockets[session_id] = socket
        return socket

    def _drop_socket(self, session_id: str) -> None:
        socket = self.sockets.pop(session_id, None)
        if socket is not None:
            socket.close()

    def _call(self, method: str, path: str, **kwargs) -> requests.Response:
        url = self.url + path
        try:
            response = self.http.request(method, url, timeout=self.request_timeout, **kwargs)
        except requests.exceptions.Timeout:
            raise SandboxTimeout(f"{url} did not answer within request_timeout={self.request_timeout:g} s")
        except requests.exceptions.ConnectionError as error:
            raise SandboxConnectionError(f"cannot reach the sandbox server at {url} ({error.__class__.__name__}): "
                                         "is it running? Set sandbox_url= or CODEACT_SANDBOX_URL")
        if response.status_code >= 400:
            try:
                detail = response.json().get("message", response.text)
            except ValueError:
                detail = response.text[:300]
            raise self._status_error(response.status_code, url, detail)
        return response

    @staticmethod
    def _status_error(status: int, url: str, detail: str) -> SandboxError:
        if status == 401:
            return SandboxAuthError(f"{url} refused the token ({detail}); set sandbox_token= or "
                                    "CODEACT_SANDBOX_TOKEN", status)
        return SandboxError(f"{url} answered {status}: {detail}", status)

    def close(self) -> None:
        for session_id in list(self.sockets):
            self._drop_socket(session_id)
        self.http.close()


def apply_event(execution: Execution, event: dict) -> None:
    kind = event.get("type")
    if kind == "stdout":
        execution.stdout += event.get("text", "")
    elif kind == "stderr":
        execution.stderr += event.get("text", "")
    elif kind in ("result", "display"):
        execution.results.append({key: event[key] for key in ("type", "data", "metadata") if key in event})
    elif kind == "error":
        execution.error = {key: event.get(key) for key in ("name", "value", "traceback")}
