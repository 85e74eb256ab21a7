"""A scripted model server for tests: a real HTTP server speaking the OpenAI chat API that replays
queued replies, streaming or not, and misbehaves on cue. Standard library only.

Usage:
    with ScriptedModelServer() as model:
        model.enqueue("<execute>print(6 * 7)</execute>", "The answer is <solution>42</solution>")
        session = Session(model="scripted", llm_url=model.url, ...)

Script entries: a reply text, or a `Fault`: an HTTP error (optionally with Retry-After), a delay before
answering, a stream cut off after some text, or a malformed stream event. Like real servers, a reply is
cut at the first of the request's stop sequences, which is dropped, or kept with `return_stop_strings`
(as `codeact-model --return-stop-strings` and the vLLM the original CodeAct clients were written for).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Fault:
    status: int | None = None  # answer with this HTTP status
    retry_after: float | None = None
    delay: float = 0.0  # seconds before answering (or between stream chunks, with text)
    text: str | None = None  # with cut/malformed: what is streamed first
    cut: bool = False  # close the connection mid-stream
    malformed: bool = False  # send a stream event that is not JSON


class ScriptedModelServer:
    def __init__(self, models: tuple[str, ...] = ("scripted",), api_key: str | None = None,
                 chunk_size: int = 4, return_stop_strings: bool = False) -> None:
        self.models = models
        self.api_key = api_key
        self.chunk_size = chunk_size
        self.return_stop_strings = return_stop_strings
        self.script: deque = deque()
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def enqueue(self, *entries: str | Fault) -> None:
        with self.lock:
            self.script.extend(entries)

    def start(self) -> ScriptedModelServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def __enter__(self) -> ScriptedModelServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _next(self) -> str | Fault | None:
        with self.lock:
            return self.script.popleft() if self.script else None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def authorized(self) -> bool:
                if scripted.api_key and self.headers.get("Authorization") != f"Bearer {scripted.api_key}":
                    self.send_json(401, {"error": {"message": "Incorrect API key provided", "type": "auth"}})
                    return False
                return True

            def do_GET(self) -> None:
                if not self.authorized():
                    return
                if self.path.rstrip("/") == "/v1/models":
                    self.send_json(200, {"object": "list", "data": [{"id": m, "object": "model"}
                                                                    for m in scripted.models]})
                else:
                    self.send_json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.authorized():
                    return
                with scripted.lock:
                    scripted.requests.append(body)
                entry = scripted._next()
                if entry is None:
                    self.send_json(400, {"error": {"message": "the scripted model has no reply left"}})
                    return
                fault = entry if isinstance(entry, Fault) else Fault(text=entry)
                if fault.delay and not fault.text:
                    time.sleep(fault.delay)
                if fault.status:
                    headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
                    self.send_json(fault.status, {"error": {"message": f"scripted {fault.status}"}}, headers)
                    return
                text = cut_at_stop(fault.text or "", body.get("stop") or [], scripted.return_stop_strings)
                usage = {"prompt_tokens": sum(len(m.get("content", "")) for m in body.get("messages", [])) // 4,
                         "completion_tokens": max(len(text) // 4, 1)}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                if not body.get("stream"):
                    self.send_json(200, {"id": "scripted", "object": "chat.completion", "model": body.get("model"),
                                         "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": text}}],
                                         "usage": usage})
                    return
                self.stream(text, fault, usage)

            def stream(self, text: str, fault: Fault, usage: dict) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                size = scripted.chunk_size
                for start in range(0, len(text), size):
                    chunk = {"choices": [{"index": 0, "delta": {"content": text[start:start + size]}}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    if fault.delay:
                        time.sleep(fault.delay)
                if fault.cut:
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                if fault.malformed:
                    self.wfile.write(b"data: {this is not json\n\n")
                    self.wfile.flush()
                    return
                final = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                self.wfile.write(f"data: {json.dumps(final)}\n\n".encode())
                self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

        return Handler


def cut_at_stop(text: str, stops: list[str] | str, keep: bool = False) -> str:
    """The text up to the first stop sequence it completes, which is kept or dropped."""
    stops = [stops] if isinstance(stops, str) else stops
    cuts = [(text.find(stop) + len(stop), text.find(stop)) for stop in stops if stop and stop in text]
    if not cuts:
        return text
    end, start = min(cuts)
    return text[:end] if keep else text[:start]
