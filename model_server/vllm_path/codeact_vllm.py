"""ASGI middleware for vLLM's OpenAI server: a completion cut by a stop string ends with that string unless
the request says otherwise (`include_stop_str_in_output`, vLLM's own sampling parameter, on by default).

The original CodeAct clients run code only when the reply holds its closing `</execute>`, which the vLLM
release they were written against returned and later ones withhold. `codeact-model --return-stop-strings`
starts vLLM with `--middleware codeact_vllm.IncludeStopStrings` and this directory on PYTHONPATH. The module
is stdlib only and outside our packages, so it loads in whatever environment vLLM runs in.
"""

from __future__ import annotations

import json

COMPLETION_ROUTES = ("/chat/completions", "/completions")


class IncludeStopStrings:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith(COMPLETION_ROUTES):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its request was whole: nothing to answer
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = with_default(b"".join(chunks))
        headers = [(name, value) for name, value in scope["headers"] if name.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()  # what comes after the body: a disconnect
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)


def with_default(body: bytes) -> bytes:
    """The request with `include_stop_str_in_output: true` unless it sets it; anything that is not a JSON
    object goes on unchanged, for vLLM to refuse in its own words."""
    try:
        request = json.loads(body)
    except ValueError:
        return body
    if not isinstance(request, dict) or "include_stop_str_in_output" in request:
        return body
    return json.dumps({**request, "include_stop_str_in_output": True}).encode()
