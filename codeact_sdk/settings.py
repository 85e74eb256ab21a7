"""Settings, resolved once: explicit argument, then environment, then default. The only place the SDK
reads the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

# Setting name -> environment variable.
ENVIRONMENT = {
    "llm_url": "CODEACT_LLM_URL",
    "model": "CODEACT_MODEL",
    "api_key": "CODEACT_API_KEY",
    "sandbox_url": "CODEACT_SANDBOX_URL",
    "sandbox_token": "CODEACT_SANDBOX_TOKEN",
}

DEFAULT_LLM_URL = "http://127.0.0.1:8080/v1"


@dataclass(frozen=True)
class Settings:
    """Where the model and the sandbox are, and how long to wait for them. Seconds are floats."""

    llm_url: str = DEFAULT_LLM_URL
    model: str | None = None  # None: the one model the server lists
    api_key: str | None = None
    sandbox_url: str | None = None  # None: start a private sandbox server (needs the [server] extra)
    sandbox_token: str | None = None
    timeout: float = 60.0  # per code execution in the sandbox
    request_timeout: float = 300.0  # per HTTP request to the model or the sandbox
    max_retries: int = 3  # model requests, on connection errors, 429 and 5xx
    max_executions: int = 5  # code executions per user message
    stream_model: bool = True  # stream model replies (events as they come); False: one request, exact usage
    temperature: float = 0.0
    max_tokens: int = 1024
    observation_head: int = 2000  # characters of execution output kept from the start...
    observation_tail: int = 2000  # ...and from the end; the middle is replaced by a marker
    fenced_code: bool = True  # a ```python block in a reply without <execute> is an action (protocol.parse_action)


def resolve(environ: dict[str, str] | None = None, **explicit: object) -> Settings:
    """Build Settings: each value from `explicit` when not None, else from the environment, else default."""
    environ = os.environ if environ is None else environ
    values = {}
    for name, value in explicit.items():
        if name not in Settings.__dataclass_fields__:
            raise TypeError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = value
    for name, variable in ENVIRONMENT.items():
        if name not in values and environ.get(variable):
            values[name] = environ[variable]
    settings = Settings(**values)
    return replace(settings, llm_url=settings.llm_url.rstrip("/"),
                   sandbox_url=settings.sandbox_url.rstrip("/") if settings.sandbox_url else None)
