"""Host tools: functions that run in the embedding process, called from sandbox code ("code mode").

The kernel gets a stub per tool, with the tool's name, signature and docstring. Calling it sends the call
over the session's own channel: the stub asks for input on the kernel's stdin channel with a marked prompt
(the Jupyter way for running code to wait on its client), the sandbox server relays the request to the
SDK over the execute's websocket, and the SDK runs the real function and answers with the result. So a
tool can hold what never enters the kernel: a database connection, an authenticated client, `self`.

Wire format, both ways one JSON document: the call `{"tool", "args", "kwargs"}` after MARKER, the answer
`{"value"}` or `{"error"}`. Arguments and results are JSON values, and bytes (as `{"__bytes__": base64}`);
tuples arrive as lists. What the bridge accepts: only the session's own tools, only while one of its
executes runs over the websocket, each call under a deadline (`tool_timeout`); anything else is a
`ToolError` raised in the kernel. The kernel still has no network; nothing else on the host is reachable.
"""

from __future__ import annotations

import base64
import concurrent.futures
import inspect
import json
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ToolError

if TYPE_CHECKING:
    import asyncio

MARKER = "codeact-tool-call:"
WORKERS = 4  # host tool calls that can be running at once (a hung one holds its worker until it returns)


def install_bridge(marker):
    """Runs in the kernel (shipped as source): defines `ToolError` and the call function the stubs use."""
    import base64
    import inspect
    import json
    import threading

    from IPython.core.error import StdinNotImplementedError

    shell = get_ipython()  # noqa: F821 - defined in every IPython kernel
    running = threading.Event()
    lock = threading.Lock()  # one call on the stdin channel at a time, whichever thread makes it
    shell.events.register("pre_execute", running.set)
    shell.events.register("post_execute", running.clear)

    class ToolError(Exception):
        """A host tool failed, was refused, or cannot be called here; the message says which."""

    def encode(value):
        if isinstance(value, (bytes, bytearray)):
            return {"__bytes__": base64.b64encode(value).decode()}
        raise TypeError(f"{type(value).__name__} cannot be sent to a host tool: use JSON values or bytes")

    def decode(value):
        return base64.b64decode(value["__bytes__"]) if set(value) == {"__bytes__"} else value

    def stub(name, shape, doc):
        """A function that calls the host tool `name`, with the signature of `shape` (checked here first)."""
        signature = inspect.signature(shape)

        def function(*args, **kwargs):
            signature.bind(*args, **kwargs)  # wrong arguments fail here, not on the host
            return call(name, args, kwargs)

        function.__signature__, function.__doc__ = signature, doc
        function.__name__ = function.__qualname__ = name.rpartition(".")[2]
        return function

    def call(name, args, kwargs):
        if not running.is_set():
            raise ToolError(f"{name}: host tools can only be called while code is executing")
        try:
            request = json.dumps({"tool": name, "args": list(args), "kwargs": kwargs}, default=encode)
        except (TypeError, ValueError) as error:
            raise ToolError(f"{name}: {error}") from None
        with lock:
            try:
                answer = shell.kernel.raw_input(marker + request)
            except StdinNotImplementedError:
                raise ToolError(f"{name}: host tools answer over the SDK's websocket; this execute came "
                                "another way (plain HTTP)") from None
        reply = json.loads(answer, object_hook=decode)
        if "error" in reply:
            raise ToolError(reply["error"])
        return reply["value"]

    return call, stub, ToolError


def kernel_source() -> str:
    return (f"{inspect.getsource(install_bridge)}\n"
            f"_codeact_call, _codeact_stub, ToolError = install_bridge({MARKER!r})\ndel install_bridge\n")


def annotation_text(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def stub_source(name: str, function: Callable, description: str, call_name: str | None = None) -> str:
    """A kernel function named `name` that calls the host tool `call_name` (default: the same): the tool's
    signature with annotations as strings (so `List[Dict]` needs no import in the kernel) and defaults written
    out where they are literals."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        signature = None
    text = "(*args, **kwargs)"
    if signature is not None:
        parameters = []
        for parameter in signature.parameters.values():
            default = parameter.default
            if default is not inspect.Parameter.empty and not is_literal(default):
                default = ...  # shown as `...`; the host applies the real default
            annotation = parameter.annotation
            parameters.append(parameter.replace(
                default=default,
                annotation=inspect.Parameter.empty if annotation is inspect.Parameter.empty
                else annotation_text(annotation)))
        returns = signature.return_annotation
        shown = signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty
                                  if returns is inspect.Signature.empty else annotation_text(returns))
        text = str(shown)
    return (f"def _codeact_shape{text}: pass\n"
            f"{name} = _codeact_stub({call_name or name!r}, _codeact_shape, {description!r})\n"
            f"del _codeact_shape\n")


def is_literal(value: object) -> bool:
    import ast

    try:
        return ast.literal_eval(repr(value)) == value
    except (ValueError, SyntaxError, RecursionError):
        return False


def is_async(function: Callable) -> bool:
    """An `async def`, or an object whose `__call__` is one."""
    return inspect.iscoroutinefunction(function) or (
        not inspect.isroutine(function) and inspect.iscoroutinefunction(type(function).__call__))


@dataclass
class Call:
    """One call of a host tool from sandbox code, as the approval hook and the events see it."""

    name: str
    args: list
    kwargs: dict


@dataclass
class Outcome:
    value: Any = None
    error: str | None = None  # the message the kernel's ToolError carries
    traceback: str | None = None  # the host's, kept here (and in the ToolResult event)
    seconds: float = 0.0


def parse_call(prompt: str) -> Call | str:
    """The call in a marked prompt, or why it is malformed."""
    try:
        request = json.loads(prompt[len(MARKER):], object_hook=decode_bytes)
    except ValueError:
        return "malformed tool call"
    if (not isinstance(request, dict) or not isinstance(request.get("tool"), str)
            or not isinstance(request.get("args"), list) or not isinstance(request.get("kwargs"), dict)):
        return "malformed tool call"
    return Call(request["tool"], request["args"], request["kwargs"])


def decode_bytes(value: dict) -> Any:
    return base64.b64decode(value["__bytes__"]) if set(value) == {"__bytes__"} else value


def encode_bytes(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(value).decode()}
    raise TypeError(f"a {type(value).__name__} is not a JSON value or bytes")


def answer(outcome: Outcome) -> str:
    """The reply the kernel's stub reads."""
    if outcome.error is None:
        try:
            return json.dumps({"value": outcome.value}, default=encode_bytes)
        except (TypeError, ValueError) as error:
            outcome.error = f"the tool's result cannot be sent to the kernel: {error}"
    return json.dumps({"error": outcome.error})


class HostTools:
    """Runs a session's host tools for its kernel: by name, under a deadline, after the approval hook.

    Sync tools run on a small thread pool (so a hung tool times out instead of hanging the session); async
    tools run on `loop` when the session has one (AsyncSession: the embedder's own loop), else on a private
    loop in a thread.
    """

    def __init__(self, tools: dict[str, Callable], timeout: float,
                 approve: Callable[[Call], bool | None] | None = None, tracebacks: bool = False) -> None:
        self.tools = tools
        self.timeout = timeout
        self.approve = approve
        self.tracebacks = tracebacks
        self.loop: asyncio.AbstractEventLoop | None = None
        self._own_loop: asyncio.AbstractEventLoop | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def run(self, call: Call) -> Outcome:
        started = time.monotonic()
        outcome = self._run(call)
        outcome.seconds = time.monotonic() - started
        return outcome

    def _run(self, call: Call) -> Outcome:
        function = self.tools.get(call.name)
        if function is None:
            return Outcome(error=f"{call.name!r} is not a tool of this session")
        try:
            if self.approve is not None and self.approve(call) is False:
                return Outcome(error=f"{call.name}: the call was refused by the host")
        except Exception as error:  # a hook that raises refuses, with its reason
            return Outcome(error=f"{call.name}: the call was refused by the host: {error}")
        try:
            if is_async(function):
                import asyncio  # here: the SDK's import stays free of asyncio for sync embedders

                future = asyncio.run_coroutine_threadsafe(function(*call.args, **call.kwargs), self.event_loop())
            else:
                future = self._executor().submit(function, *call.args, **call.kwargs)
            done, _ = concurrent.futures.wait([future], self.timeout)
            if not done:
                future.cancel()  # an async tool is cancelled; a thread cannot be, and finishes unobserved
                return Outcome(error=f"{call.name}: no result within {self.timeout:g} s (tool_timeout)")
            return Outcome(value=future.result())
        except Exception as error:
            text = traceback.format_exc()
            # A ToolError's message is meant for the model as it stands; anything else is named.
            message = f"{call.name}: {error}" if isinstance(error, ToolError) else \
                f"{call.name}: {type(error).__name__}: {error}"
            if self.tracebacks:
                message += "\n\nHost traceback:\n" + text
            return Outcome(error=message, traceback=text)

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="codeact-tool")
        return self._pool

    def event_loop(self) -> asyncio.AbstractEventLoop:
        """Where async tools and MCP connections run: the embedder's loop (AsyncSession), or one of ours."""
        if self.loop is not None:
            return self.loop
        if self._own_loop is None:
            import asyncio

            self._own_loop = asyncio.new_event_loop()
            threading.Thread(target=self._own_loop.run_forever, name="codeact-tool-loop", daemon=True).start()
        return self._own_loop

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._own_loop is not None:
            self._own_loop.call_soon_threadsafe(self._own_loop.stop)
            self._own_loop = None
