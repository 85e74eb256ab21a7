"""Tools: plain Python functions shipped to the kernel as source and described to the model.

A function ships when its source is available and everything it refers to can be recreated in the
kernel: modules (imported there), literal constants (written there), builtins and other tools.
Anything else (a lambda, a closure, a reference to a live object) is refused at session creation.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ToolError


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    function: Callable


def tool(function: Callable | None = None, *, name: str | None = None, description: str | None = None):
    """Mark a function as a tool, optionally renaming or describing it.

    Usage:
        @tool(description="Look up a city's population.")
        def population(city: str) -> int: ...
    """

    def mark(target: Callable) -> Callable:
        target.__codeact_tool__ = {"name": name, "description": description}
        return target

    return mark(function) if function is not None else mark


def as_tool(function: Callable) -> Tool:
    if isinstance(function, Tool):
        return function
    if not isinstance(function, types.FunctionType):
        raise ToolError(f"tool {function!r} is not a plain Python function; wrap it in a def")
    options = getattr(function, "__codeact_tool__", {})
    if function.__name__ == "<lambda>":
        raise ToolError("a lambda cannot be a tool: its source cannot be shipped on its own; use a def")
    description = options.get("description") or inspect.getdoc(function) or ""
    return Tool(name=options.get("name") or function.__name__, description=description, function=function)


def describe(tool_: Tool) -> str:
    try:  # annotations written under `from __future__ import annotations` are strings until evaluated
        signature = inspect.signature(tool_.function, eval_str=True)
    except (NameError, TypeError, SyntaxError):
        signature = inspect.signature(tool_.function)
    doc = textwrap.indent(tool_.description, "    ") if tool_.description else "    (no description)"
    return f"{tool_.name}{signature}\n{doc}"


def source(tool_: Tool, tool_names: set[str]) -> str:
    """Code that defines the tool in a fresh kernel: imports and constants it needs, then the function."""
    function = tool_.function
    if function.__closure__:
        names = ", ".join(function.__code__.co_freevars)
        raise ToolError(f"tool {tool_.name!r} closes over {names}: a closure cannot be shipped to the kernel; "
                        "pass those values as arguments or make them module-level constants")
    try:
        text = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError) as error:
        raise ToolError(f"the source of tool {tool_.name!r} is not available ({error}); define it in a file")
    tree = ast.parse(text)
    definition = tree.body[0]
    definition.decorator_list = []  # @tool and friends stay on this side
    definition.name = tool_.name
    preamble = []
    for global_name in sorted(referenced_globals(function)):
        if global_name in tool_names or hasattr(builtins, global_name):
            continue
        if global_name not in function.__globals__:
            continue  # defined later in the kernel, or a NameError the model will see
        value = function.__globals__[global_name]
        if isinstance(value, types.ModuleType):
            preamble.append(f"import {value.__name__} as {global_name}"
                            if value.__name__ != global_name else f"import {global_name}")
        elif is_literal(value):
            preamble.append(f"{global_name} = {value!r}")
        else:
            raise ToolError(f"tool {tool_.name!r} uses {global_name!r}, a {type(value).__name__} that cannot be "
                            "shipped to the kernel; make it a tool too, or a literal constant, or pass it in")
    return "\n".join([*preamble, ast.unparse(definition)]) + "\n"


def referenced_globals(function: types.FunctionType) -> set[str]:
    names = set(function.__code__.co_names)
    for constant in function.__code__.co_consts:  # nested functions and comprehensions
        if isinstance(constant, types.CodeType):
            names |= set(constant.co_names)
    return names


def is_literal(value: object) -> bool:
    try:
        return ast.literal_eval(repr(value)) == value
    except (ValueError, SyntaxError, RecursionError):
        return False


def setup_code(tools: list[Tool]) -> str:
    names = {tool_.name for tool_ in tools}
    return "\n\n".join(source(tool_, names) for tool_ in tools)
