"""Tools: Python callables the model's code can call, described to the model by signature and docstring.

By default a tool runs in the host, the embedding process (bridge.py): any callable, sync or async, a
closure, a bound method, an object holding a live client; the kernel gets a stub. `@tool(ship=True)`
instead ships a plain function into the kernel as source, to run next to the data. A function ships when
its source is available and everything it refers to can be recreated in the kernel: modules (imported
there), literal constants (written there), builtins and other tools. Anything else (a lambda, a closure, a
reference to a live object) is refused at session creation. Annotations in either mode are kept as text,
so `-> List[Dict]` needs nothing imported in the kernel.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import keyword
import textwrap
import types
from collections.abc import Callable
from dataclasses import dataclass

from . import bridge
from .errors import ToolError


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    function: Callable
    ship: bool = False  # run inside the kernel (shipped as source) instead of in the host


def tool(function: Callable | None = None, *, name: str | None = None, description: str | None = None,
         ship: bool = False):
    """Mark a callable as a tool, optionally renaming or describing it, or shipping it into the kernel.

    Usage:
        @tool(description="Look up a city's population.")
        def population(city: str) -> int: ...

        Session(tools=[tool(db.lookup, name="lookup")])  # a bound method: runs in the host
    """

    def mark(target: Callable) -> Callable | Tool:
        options = {"name": name, "description": description, "ship": ship}
        try:
            target.__codeact_tool__ = options
            return target
        except (AttributeError, TypeError):  # a bound method or a builtin takes no attributes
            return as_tool(target, **options)

    return mark(function) if function is not None else mark


def as_tool(function: Callable, name: str | None = None, description: str | None = None,
            ship: bool | None = None) -> Tool:
    if isinstance(function, Tool):
        return function
    if not callable(function):
        raise ToolError(f"tool {function!r} is not callable")
    options = getattr(function, "__codeact_tool__", {})
    ship = options.get("ship", False) if ship is None else ship
    name = name or options.get("name") or getattr(function, "__name__", None)
    if ship:
        if not isinstance(function, types.FunctionType):
            raise ToolError(f"tool {function!r} cannot be shipped to the kernel: only a plain def can; "
                            "leave ship off to run it in the host")
        if function.__name__ == "<lambda>":
            raise ToolError("a lambda cannot be shipped: its source cannot be sent on its own; use a def")
    if not name or not name.isidentifier() or keyword.iskeyword(name):
        raise ToolError(f"tool {function!r} needs a name that is a Python identifier: tool(f, name=...)")
    description = description or options.get("description") or inspect.getdoc(function) or ""
    return Tool(name=name, description=description, function=function, ship=ship)


class Shown:
    """An annotation kept as text, written without quotes in a signature."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def describe(tool_: Tool) -> str:
    try:  # annotations written under `from __future__ import annotations` are strings until evaluated
        signature = inspect.signature(tool_.function, eval_str=True)
    except (NameError, TypeError, SyntaxError):
        signature = inspect.signature(tool_.function)
    signature = signature.replace(
        parameters=[p.replace(annotation=Shown(p.annotation)) if isinstance(p.annotation, str) else p
                    for p in signature.parameters.values()],
        return_annotation=Shown(signature.return_annotation) if isinstance(signature.return_annotation, str)
        else signature.return_annotation)
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
    annotations_as_text(definition)
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


def annotations_as_text(definition: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
    """Annotations become string constants: evaluated in the kernel, `List[Dict]` would need its import."""
    arguments = definition.args
    for argument in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg,
                     arguments.kwarg]:
        if argument is not None and argument.annotation is not None:
            argument.annotation = ast.Constant(ast.unparse(argument.annotation))
    if definition.returns is not None:
        definition.returns = ast.Constant(ast.unparse(definition.returns))


def referenced_globals(function: types.FunctionType) -> set[str]:
    names = set(function.__code__.co_names)
    for constant in function.__code__.co_consts:  # nested functions and comprehensions
        if isinstance(constant, types.CodeType):
            names |= set(constant.co_names)
    return names


is_literal = bridge.is_literal


def setup_code(tools: list[Tool]) -> str:
    """What the kernel runs before the first code: the bridge and a stub per host tool, the source of each
    shipped one."""
    names = {tool_.name for tool_ in tools}
    parts = []
    if any(not tool_.ship for tool_ in tools):
        parts.append(bridge.kernel_source())
    for tool_ in tools:
        parts.append(source(tool_, names) if tool_.ship else
                     bridge.stub_source(tool_.name, tool_.function, tool_.description))
    return "\n\n".join(parts)
