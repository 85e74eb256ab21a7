"""Typed events that `Session.stream` yields as they happen, in this order per step:
ModelDelta* -> ModelReply -> (CodeStarted -> (Output | Result | ToolCall -> ToolResult)* -> ExecutionFinished)?
... -> ReplyFinished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .sandbox import Execution
    from .session import Reply


@dataclass(frozen=True)
class ModelDelta:
    """A piece of model text as it streams in."""

    text: str


@dataclass(frozen=True)
class ModelReply:
    """The model's whole reply for this step."""

    text: str
    usage: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CodeStarted:
    code: str


@dataclass(frozen=True)
class Output:
    stream: str  # "stdout" or "stderr"
    text: str


@dataclass(frozen=True)
class Result:
    kind: str  # "result" or "display"
    data: dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """Sandbox code called a host tool; the call runs after this event (and after the approval hook)."""

    name: str
    args: list
    kwargs: dict


@dataclass(frozen=True)
class ToolResult:
    """What the host tool returned (`value`), or the message of the ToolError the kernel gets (`error`)."""

    name: str
    value: Any = None
    error: str | None = None
    seconds: float = 0.0
    traceback: str | None = None  # the host's traceback when the tool raised; never sent to the kernel


@dataclass(frozen=True)
class ExecutionFinished:
    execution: Execution


@dataclass(frozen=True)
class ReplyFinished:
    reply: Reply


Event = (ModelDelta | ModelReply | CodeStarted | Output | Result | ToolCall | ToolResult | ExecutionFinished
         | ReplyFinished)
