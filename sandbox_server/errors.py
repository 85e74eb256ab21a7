"""The errors a client of the sandbox API can get; each carries its HTTP status and a machine code.

All go out as JSON `{"error": code, "message": text}` through one handler, never as HTML.
"""

from __future__ import annotations


class SandboxError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(SandboxError, ValueError):
    status, code = 400, "bad_request"


class Unauthorized(SandboxError, PermissionError):
    status, code = 401, "unauthorized"


class Forbidden(SandboxError, PermissionError):
    status, code = 403, "forbidden"


class NotFound(SandboxError, LookupError):
    status, code = 404, "not_found"


class Conflict(SandboxError):
    status, code = 409, "conflict"


class TooLarge(SandboxError, ValueError):
    status, code = 413, "too_large"


class AtCapacity(SandboxError):
    status, code = 429, "at_capacity"


class Unavailable(SandboxError):
    status, code = 503, "unavailable"
