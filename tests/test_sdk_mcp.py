"""MCP servers' tools called from sandbox code: a real MCP server written with the official SDK
(tests/mcp_server.py), over stdio and over streamable HTTP with a bearer token."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest

from codeact_sdk import AsyncSession, ConfigError, Session, events
from codeact_sdk.mcp_tools import MCPServer
from model_server.stack import free_port

SERVER = os.path.join(os.path.dirname(__file__), "mcp_server.py")
ORDER = "{'customer': {'name': 'Ada', 'email': 'ada@example.com'}, 'items': [{'sku': 'a', 'quantity': 2}, " \
        "{'sku': 'b', 'quantity': 3}]}"
CALLS = (f"print(orders.add(a=2, b=3), orders.place_order(order={ORDER}, express=True), orders.greet(name='Bo'))\n"
         "try:\n    orders.refuse(reason='out of stock')\nexcept ToolError as error:\n    print(error)\n"
         "try:\n    orders.add(2, 3)\nexcept TypeError as error:\n    print('TypeError', error)\n"
         "import inspect\nprint(inspect.signature(orders.place_order))")
EXPECTED = ("5 {'customer': 'Ada', 'units': 5, 'express': True} Hello, Bo!\n"
            "orders.refuse: Error executing tool refuse: refused: out of stock\n"
            "TypeError too many positional arguments\n"
            "(*, order: 'dict', express: 'bool' = False) -> 'Any'\n")


def stdio_server(protocol: str = "auto") -> MCPServer:
    return MCPServer.stdio("orders", [sys.executable, SERVER, "stdio"], protocol=protocol)


@pytest.mark.parametrize("protocol", ["auto", "legacy"])  # 2026-07-28, and the 2025-11-25 initialize handshake
def test_stdio_mcp_tools_are_grouped_typed_and_described(model, local_sandbox, protocol):
    model.enqueue(f"<execute>{CALLS}</execute>", "<solution>done</solution>")
    with Session(llm_url=model.url, sandbox_url=local_sandbox.url, sandbox_token=local_sandbox.token,
                 mcp_servers=[stdio_server(protocol)]) as session:
        seen = list(session.stream("order things"))
    execution = next(e.execution for e in seen if isinstance(e, events.ExecutionFinished))
    assert execution.stdout == EXPECTED, execution.text
    calls = [e.name for e in seen if isinstance(e, events.ToolCall)]
    assert calls == ["orders.add", "orders.place_order", "orders.greet", "orders.refuse"]
    system = model.requests[0]["messages"][0]["content"]
    assert "orders.place_order(*, order: dict, express: bool = False) -> Any" in system
    assert '"quantity":{"minimum":1' in system  # the nested schema, written out for the model


@pytest.fixture
def http_server():
    port, token = free_port(), "mcp-secret"
    process = subprocess.Popen([sys.executable, SERVER, "http", str(port), token], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"MCP server did not start: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/mcp", token
    process.terminate()
    process.wait(10)


def test_streamable_http_mcp_with_a_bearer_token(model, local_sandbox, http_server):
    url, token = http_server
    model.enqueue(f"<execute>{CALLS}</execute>", "<solution>done</solution>")
    server = MCPServer.http("orders", url, headers={"Authorization": f"Bearer {token}"})
    with Session(llm_url=model.url, sandbox_url=local_sandbox.url, sandbox_token=local_sandbox.token,
                 mcp_servers=[server]) as session:
        reply = session.chat("order things")
    assert reply.executions[0].stdout == EXPECTED, reply.executions[0].text
    # A wrong token is a clear error when the session opens, not a broken tool later.
    wrong = MCPServer.http("orders", url, headers={"Authorization": "Bearer nope"})
    with pytest.raises(ConfigError, match="MCP server 'orders'"):
        Session(llm_url=model.url, sandbox_url=local_sandbox.url, sandbox_token=local_sandbox.token,
                mcp_servers=[wrong]).open()


def test_mcp_tools_in_an_async_session_use_the_callers_loop(model, local_sandbox):
    async def main() -> None:
        model.enqueue("<execute>print(orders.add(a=40, b=2))</execute>", "<solution>42</solution>")
        async with AsyncSession(llm_url=model.url, sandbox_url=local_sandbox.url, sandbox_token=local_sandbox.token,
                                mcp_servers=[stdio_server()]) as session:
            reply = await session.chat("add")
        assert reply.executions[0].stdout == "42\n", reply.executions[0].text

    asyncio.run(main())
