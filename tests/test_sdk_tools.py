"""Tools shipped into the kernel as source (`ship=True`): described with signature and docstring, unshippable
ones refused. Host tools (the default) are in test_sdk_host_tools.py."""

from __future__ import annotations

import json
import math

import pytest

from codeact_sdk import ToolError, tool
from codeact_sdk.tools import as_tool, describe, setup_code

RATE = 1.5
LIVE_OBJECT = object()


def convert(amount: float, currency: str = "EUR") -> float:
    """Convert an amount of dollars to another currency."""
    return round(amount * RATE, 2)


def hypotenuse(a: float, b: float) -> float:
    """Length of the hypotenuse."""
    return math.sqrt(a * a + b * b) + len(json.dumps([]))


@tool(name="lookup", description="Look up a value.", ship=True)
def _lookup_impl(key: str) -> str:
    return key.upper()


def uses_live_object() -> object:
    return LIVE_OBJECT


def run(code: str) -> dict:
    namespace: dict = {}
    exec(code, namespace)  # the kernel does the same with the setup code
    return namespace


def test_a_plain_function_ships_with_the_constants_and_modules_it_uses():
    namespace = run(setup_code([as_tool(convert, ship=True), as_tool(hypotenuse, ship=True)]))
    assert namespace["convert"](10) == 15.0
    assert namespace["hypotenuse"](3, 4) == 7.0


def test_the_tool_decorator_renames_and_describes():
    lookup = as_tool(_lookup_impl)
    assert run(setup_code([lookup]))["lookup"]("k") == "K"
    assert describe(lookup) == "lookup(key: str) -> str\n    Look up a value."


def test_description_has_signature_and_docstring():
    assert describe(as_tool(convert)) == ("convert(amount: float, currency: str = 'EUR') -> float\n"
                                          "    Convert an amount of dollars to another currency.")


def test_lambda_closure_and_live_objects_are_refused_with_clear_errors():
    with pytest.raises(ToolError, match="lambda"):
        as_tool(lambda x: x, ship=True)
    factor = 3

    def scaled(x):
        return x * factor

    with pytest.raises(ToolError, match="closes over factor"):
        setup_code([as_tool(scaled, ship=True)])
    with pytest.raises(ToolError, match="LIVE_OBJECT"):
        setup_code([as_tool(uses_live_object, ship=True)])
    with pytest.raises(ToolError, match="only a plain def can"):
        as_tool(print, ship=True)
    with pytest.raises(ToolError, match="needs a name that is a Python identifier"):
        as_tool(lambda x: x)  # fine in the host, once named: tool(lambda x: x, name="double")
