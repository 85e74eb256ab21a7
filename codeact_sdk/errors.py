"""The SDK's exceptions: one root, leaves that are also the builtin a caller already catches.

    CodeActError
    ├── ConfigError (ValueError)             a setting is missing or contradictory
    ├── ToolError (TypeError)                a function cannot be shipped to the kernel as a tool
    ├── ModelError                           the model server answered with an error
    │   ├── ModelConnectionError (ConnectionError)
    │   ├── ModelTimeout (TimeoutError)
    │   └── ModelAuthError (PermissionError)
    └── SandboxError                         the sandbox server answered with an error
        ├── SandboxConnectionError (ConnectionError)
        ├── SandboxTimeout (TimeoutError)
        └── SandboxAuthError (PermissionError)

Every message names the URL involved and the option that changes the outcome. An error in the code the
model wrote is not an exception: it is data in the `Execution`.
"""

from __future__ import annotations


class CodeActError(Exception):
    """Root of every error the SDK raises."""


class ConfigError(CodeActError, ValueError):
    pass


class ToolError(CodeActError, TypeError):
    pass


class ModelError(CodeActError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ModelConnectionError(ModelError, ConnectionError):
    pass


class ModelTimeout(ModelError, TimeoutError):
    pass


class ModelAuthError(ModelError, PermissionError):
    pass


class SandboxError(CodeActError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SandboxConnectionError(SandboxError, ConnectionError):
    pass


class SandboxTimeout(SandboxError, TimeoutError):
    pass


class SandboxAuthError(SandboxError, PermissionError):
    pass
