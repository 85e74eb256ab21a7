"""codeact_sdk: CodeAct agents (LLM agents whose actions are Python code) in a few lines.

    from codeact_sdk import Session
    with Session() as session:
        print(session.chat("What is the 20th Fibonacci number?").solution)
"""

from .errors import (
    CodeActError,
    ConfigError,
    ModelAuthError,
    ModelConnectionError,
    ModelError,
    ModelTimeout,
    SandboxAuthError,
    SandboxConnectionError,
    SandboxError,
    SandboxTimeout,
    ToolError,
)
from .sandbox import Execution, SandboxClient
from .session import Reply, Session, Turn
from .settings import Settings
from .tools import tool

__all__ = [
    "AsyncSession",
    "CodeActError",
    "ConfigError",
    "Execution",
    "ModelAuthError",
    "ModelConnectionError",
    "ModelError",
    "ModelTimeout",
    "Reply",
    "SandboxAuthError",
    "SandboxClient",
    "SandboxConnectionError",
    "SandboxError",
    "SandboxTimeout",
    "Session",
    "Settings",
    "ToolError",
    "Turn",
    "tool",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # AsyncSession imports asyncio (~25 ms): only for those who use it.
    if name == "AsyncSession":
        from .async_session import AsyncSession

        return AsyncSession
    raise AttributeError(f"module 'codeact_sdk' has no attribute {name!r}")
