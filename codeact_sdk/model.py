"""An OpenAI-compatible chat client: /v1/chat/completions, streaming (SSE) or not, with retries.

Works against vLLM, llama.cpp's server and hosted providers. Retries connection errors, 429 (honouring
Retry-After) and 5xx with backoff, but never after a stream has started to deliver text.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

import requests

from .errors import ConfigError, ModelAuthError, ModelConnectionError, ModelError, ModelTimeout

BACKOFF = 0.5  # seconds before the first retry; doubles each time
MAX_RETRY_AFTER = 30.0  # a server asking for longer is answered with an error instead


@dataclass
class Completion:
    text: str
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    first_token_seconds: float | None = None
    usage_estimated: bool = False  # usage counted from stream chunks, the server reported none


class ModelClient:
    """Usage:
        client = ModelClient("http://127.0.0.1:8080/v1", model="qwen")
        completion = client.complete([{"role": "user", "content": "hi"}], stop=["</execute>"])
    """

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None,
                 request_timeout: float = 300.0, max_retries: int = 3) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.http = requests.Session()
        if api_key:
            self.http.headers["Authorization"] = f"Bearer {api_key}"
        self._model = model
        self._checked = model is None  # a name given by the caller is checked against /models once
        self._live: requests.Response | None = None  # the streaming response being read, for abort()

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self.only_model()
        elif not self._checked:
            self._checked = True
            self.check_model(self._model)
        return self._model

    def check_model(self, name: str) -> None:
        """ConfigError when the server lists its models and `name` is not one of them (a typo would otherwise
        be answered by whatever the server falls back to, or fail later with a vaguer error)."""
        try:
            listed = self.list_models()
        except ModelError as error:
            if isinstance(error, ModelAuthError | ModelConnectionError | ModelTimeout):
                raise
            return  # no /models here (404 and the like): nothing to check against
        if listed and name not in listed:
            raise ConfigError(f"{self.url} does not serve a model named {name!r}; it lists: {', '.join(listed)} "
                              "(pass model= or set CODEACT_MODEL)")

    def list_models(self) -> list[str]:
        response = self._request("GET", "/models", None, stream=False)
        return [entry["id"] for entry in response.json().get("data", [])]

    def only_model(self) -> str:
        models = self.list_models()
        if len(models) != 1:
            raise ConfigError(f"{self.url}/models lists {len(models)} models ({', '.join(models) or 'none'}): "
                              "pass model= or set CODEACT_MODEL")
        return models[0]

    def complete(self, messages: list[dict], stop: list[str] | None = None, temperature: float = 0.0,
                 max_tokens: int = 1024) -> Completion:
        """One chat completion, not streamed."""
        started = time.monotonic()
        body = self._body(messages, stop, temperature, max_tokens)
        data = self._request("POST", "/chat/completions", body, stream=False).json()
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError):
            raise ModelError(f"{self.url}/chat/completions answered without a choice: {str(data)[:300]}")
        return Completion(text, choice.get("finish_reason"), data.get("usage") or {}, time.monotonic() - started)

    def stream(self, messages: list[dict], stop: list[str] | None = None, temperature: float = 0.0,
               max_tokens: int = 1024) -> Generator[str, None, Completion]:
        """One chat completion, streamed: yields text pieces as they arrive, returns the Completion."""
        started = time.monotonic()
        body = {**self._body(messages, stop, temperature, max_tokens), "stream": True,
                "stream_options": {"include_usage": True}}
        response = self._request("POST", "/chat/completions", body, stream=True)
        parts: list[str] = []
        completion = Completion("")
        ended = []  # the event reader appends once it sees `data: [DONE]`
        for chunk in self._events(response, ended):
            if chunk.get("usage"):
                completion.usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if completion.first_token_seconds is None:
                        completion.first_token_seconds = time.monotonic() - started
                    parts.append(piece)
                    yield piece
                if choice.get("finish_reason"):
                    completion.finish_reason = choice["finish_reason"]
        if completion.finish_reason is None and not ended:
            raise ModelConnectionError(f"the stream from {self.url}/chat/completions ended before it finished "
                                       "(no finish reason, no [DONE]): the server was cut off")
        completion.text = "".join(parts)
        completion.seconds = time.monotonic() - started
        if not completion.usage and parts:
            # Some servers (llama-cpp-python) send no usage when streaming; they send one token per chunk.
            completion.usage = {"completion_tokens": len(parts)}
            completion.usage_estimated = True
        return completion

    def _body(self, messages: list[dict], stop: list[str] | None, temperature: float, max_tokens: int) -> dict:
        body = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        if stop:
            body["stop"] = stop
        return body

    def abort(self) -> None:
        """End the streaming completion being read, from another thread: its socket is shut down, so the
        reader's wait ends at once (with ModelConnectionError) instead of at the next token."""
        raw = getattr(self._live, "raw", None)
        try:
            raw.shutdown()  # urllib3 >= 2.3
            return
        except (AttributeError, ValueError, RuntimeError, OSError):
            pass
        # The socket under the body's file (a response to `Connection: close` has left its connection object).
        sock = getattr(getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None), "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _events(self, response: requests.Response, ended: list) -> Iterator[dict]:
        """Server-sent events: `data: {json}` lines until `data: [DONE]` or the end of the stream."""
        self._live = response
        try:
            for line in response.iter_lines(decode_unicode=False):
                if not line or not line.startswith(b"data:"):
                    continue  # blank separators, comments, `event:` lines
                payload = line[len(b"data:") :].strip()
                if payload == b"[DONE]":
                    ended.append(True)
                    return
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    raise ModelError(f"{self.url}/chat/completions sent a malformed stream event: "
                                     f"{payload[:200]!r}")
                if isinstance(chunk, dict) and "error" in chunk:
                    raise ModelError(f"{self.url}/chat/completions failed mid-stream: {chunk['error']}")
                if isinstance(chunk, dict):
                    yield chunk
        except requests.exceptions.ChunkedEncodingError as error:
            raise ModelConnectionError(f"the stream from {self.url}/chat/completions was cut off: {error}")
        except requests.exceptions.ConnectionError as error:  # read timeouts mid-stream arrive as these
            raise ModelTimeout(f"the stream from {self.url}/chat/completions stalled past request_timeout="
                               f"{self.request_timeout:g} s: {error}")
        finally:
            self._live = None
            response.close()

    def _request(self, method: str, path: str, body: dict | None, stream: bool) -> requests.Response:
        url = self.url + path
        delay = BACKOFF
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = self.http.request(method, url, json=body, stream=stream, timeout=self.request_timeout)
            except requests.exceptions.Timeout:
                if last:
                    raise ModelTimeout(f"{url} did not answer within request_timeout={self.request_timeout:g} s")
            except requests.exceptions.ConnectionError as error:
                if last:
                    raise ModelConnectionError(f"cannot reach the model server at {url} ({error.__class__.__name__})"
                                               ": is it running? Set llm_url= or CODEACT_LLM_URL")
            else:
                if response.status_code < 400:
                    return response
                detail = error_detail(response)
                if response.status_code in (401, 403):
                    raise ModelAuthError(f"{url} refused the API key ({response.status_code}: {detail}); "
                                         "set api_key= or CODEACT_API_KEY", response.status_code)
                retryable = response.status_code == 429 or response.status_code >= 500
                if not retryable or last:
                    raise ModelError(f"{url} answered {response.status_code}: {detail}", response.status_code)
                delay = max(delay, retry_after(response.headers.get("Retry-After")) or 0.0)
                if delay > MAX_RETRY_AFTER:
                    raise ModelError(f"{url} asked to retry after {delay:g} s; giving up", response.status_code)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.http.close()


def retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def error_detail(response: requests.Response) -> str:
    try:
        data = response.json()
        error = data.get("error", data)
        return str(error.get("message", error) if isinstance(error, dict) else error)[:500]
    except ValueError:
        return response.text[:500] or response.reason or ""
