"""MCP servers' tools as host tools: `Session(mcp_servers=[...])`.

The SDK connects from the host to each server (a command over stdio, or a URL over streamable HTTP with
headers for auth), lists its tools, and gives the kernel one function per tool, grouped under the server's
name: `github.create_issue(title=..., body=...)`. Signatures and docstrings come from each tool's JSON
schema and description. A call goes over the session's bridge like any host tool (bridge.py), then from
the host to the MCP server: structured results come back as Python values, text results as strings, errors
as `ToolError`. The kernel never talks to the MCP server and never sees its credentials.

Needs the `[mcp]` extra (the official `mcp` package, 2.x). Connections live on an event loop of the
session's (HostTools.event_loop): the embedder's own with AsyncSession.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, ToolError
from .tools import Tool

log = logging.getLogger("codeact_sdk.mcp")

CONNECT_TIMEOUT = 30.0
JSON_TYPES = {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "array": "list",
              "object": "dict", "null": "None"}


@dataclass(frozen=True)
class MCPServer:
    """An MCP server whose tools sandbox code can call, as `<name>.<tool>(...)`.

    Usage:
        MCPServer.stdio("files", ["python", "files_server.py"])
        MCPServer.http("github", "https://mcp.example.com/mcp", headers={"Authorization": "Bearer ..."})
    """

    name: str
    command: tuple[str, ...] = ()
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] | None = None
    # "auto": the SDK's negotiation (2026-07-28 where the server speaks it, else the initialize handshake);
    # "legacy": the initialize handshake only (2025-11-25 and earlier servers).
    protocol: str = "auto"

    @classmethod
    def stdio(cls, name: str, command: list[str], env: dict[str, str] | None = None,
              protocol: str = "auto") -> MCPServer:
        return cls(name=name, command=tuple(command), env=env, protocol=protocol)

    @classmethod
    def http(cls, name: str, url: str, headers: dict[str, str] | None = None, protocol: str = "auto") -> MCPServer:
        return cls(name=name, url=url, headers=dict(headers or {}), protocol=protocol)

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ConfigError(f"MCP server name {self.name!r} must be a Python identifier (it names a namespace "
                              "in the kernel)")
        if bool(self.command) == bool(self.url):
            raise ConfigError(f"MCP server {self.name!r}: give a command (stdio) or a url (streamable HTTP)")


def load_config(path: str) -> list[MCPServer]:
    """MCP servers from a JSON file in the shape other MCP clients read (`mcpServers`):

        {"mcpServers": {"files": {"command": "python", "args": ["files_server.py"], "env": {"ROOT": "/data"}},
                        "github": {"url": "https://mcp.example.com/mcp", "headers": {"Authorization": "..."}}}}
    """
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read the MCP configuration {path}: {error.strerror}") from None
    except ValueError as error:
        raise ConfigError(f"the MCP configuration {path} is not valid JSON: {error}") from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise ConfigError(f"the MCP configuration {path} needs an object \"mcpServers\": {{name: server}}")
    loaded = []
    for name, entry in servers.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: MCP server {name!r} must be an object with a command or a url")
        strings = isinstance(entry.get("args", []), list) and all(isinstance(a, str) for a in entry.get("args", []))
        mappings = all(isinstance(entry.get(key, {}), dict) for key in ("env", "headers"))
        if not strings or not mappings or not isinstance(entry.get("command", ""), str):
            raise ConfigError(f"{path}: MCP server {name!r}: args is a list of strings, env and headers objects")
        if entry.get("url"):
            loaded.append(MCPServer.http(name, entry["url"], entry.get("headers")))
        else:
            command = [entry["command"], *entry.get("args", [])] if entry.get("command") else []
            loaded.append(MCPServer.stdio(name, command, entry.get("env")))
    return loaded


def identifier(name: str) -> str:
    text = re.sub(r"\W", "_", name)
    return text if text.isidentifier() else f"_{text}"


def inline_refs(schema: Any, definitions: dict, depth: int = 0) -> Any:
    """The schema with `{"$ref": "#/$defs/X"}` replaced by X (as pydantic writes nested models), for reading."""
    if depth > 8:
        return schema
    if isinstance(schema, dict):
        reference = schema.get("$ref")
        if isinstance(reference, str) and reference.split("/")[-1] in definitions:
            return inline_refs(definitions[reference.split("/")[-1]], definitions, depth + 1)
        return {key: inline_refs(value, definitions, depth + 1) for key, value in schema.items() if key != "$defs"}
    if isinstance(schema, list):
        return [inline_refs(item, definitions, depth + 1) for item in schema]
    return schema


def python_type(schema: dict) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(JSON_TYPES.get(k, "Any") for k in kind)
    if kind is None and "properties" in schema:
        return "dict"
    return JSON_TYPES.get(kind, "Any")


def signature_of(schema: dict) -> inspect.Signature:
    """Keyword-only parameters from a JSON object schema: required ones first, the rest defaulting to their
    schema default (or None: left out of the call)."""
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    parameters = []
    for name in sorted(properties, key=lambda key: key not in required):
        if not name.isidentifier():
            continue  # reachable only through **kwargs
        spec = properties[name] if isinstance(properties[name], dict) else {}
        default = inspect.Parameter.empty if name in required else spec.get("default")
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=python_type(spec)))
    return inspect.Signature(parameters, return_annotation="Any")


def docstring_of(description: str, schema: dict) -> str:
    lines = [description.strip() or "(no description)"]
    properties = schema.get("properties") or {}
    if properties:
        lines += ["", "Arguments:"]
        required = set(schema.get("required") or [])
        for name, spec in properties.items():
            spec = spec if isinstance(spec, dict) else {}
            note = "required" if name in required else "optional"
            text = f"    {name} ({python_type(spec)}, {note})"
            if spec.get("description"):
                text += f": {spec['description']}"
            if python_type(spec) in ("dict", "list") or "enum" in spec:  # nested shapes, written out
                shape = {k: v for k, v in spec.items() if k not in ("description", "title")}
                text += f"\n        schema: {json.dumps(shape, separators=(',', ':'))}"
            lines.append(text)
    return "\n".join(lines)


def result_value(result: Any) -> Any:
    """A CallToolResult as a Python value: structured content, else the text (joined), else the content items."""
    if result.is_error:
        texts = [getattr(item, "text", "") for item in result.content]
        raise ToolError("; ".join(t for t in texts if t) or "the MCP tool reported an error")
    if result.structured_content is not None:
        value = result.structured_content
        # Servers wrap a plain return value as {"result": value}.
        return value["result"] if isinstance(value, dict) and list(value) == ["result"] else value
    if all(getattr(item, "type", None) == "text" for item in result.content):
        return "\n".join(item.text for item in result.content)
    return [item.model_dump(mode="json", exclude_none=True) for item in result.content]


class MCPConnections:
    """The session's MCP clients, each held open by a task on the session's loop until close()."""

    def __init__(self, servers: list[MCPServer], loop: asyncio.AbstractEventLoop) -> None:
        self.servers = servers
        self.loop = loop
        self.clients: dict[str, Any] = {}
        self.stop: asyncio.Event | None = None
        self.tasks: list[asyncio.Future] = []

    def open(self) -> list[Tool]:
        """Connect to every server and list its tools (blocking; call from a thread other than the loop's)."""
        if importlib.util.find_spec("mcp") is None:
            raise ConfigError("mcp_servers needs the official MCP SDK: pip install 'codeact[mcp]'")
        return asyncio.run_coroutine_threadsafe(self._open(), self.loop).result(CONNECT_TIMEOUT + 5)

    async def _open(self) -> list[Tool]:
        self.stop = asyncio.Event()
        tools: list[Tool] = []
        for server in self.servers:
            ready: asyncio.Future = self.loop.create_future()
            self.tasks.append(asyncio.ensure_future(self._hold(server, ready)))
            try:
                listed = await asyncio.wait_for(asyncio.shield(ready), CONNECT_TIMEOUT)
            except Exception as error:
                await self._close()
                raise ConfigError(f"MCP server {server.name!r} ({server.url or ' '.join(server.command)}): "
                                  f"{type(error).__name__}: {error}") from None
            tools += [self._tool(server, item) for item in listed]
        return tools

    async def _hold(self, server: MCPServer, ready: asyncio.Future) -> None:
        from mcp import Client, StdioServerParameters
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        if server.url:
            target = streamable_http_client(server.url, http_client=create_mcp_http_client(headers=server.headers))
        else:
            target = StdioServerParameters(command=server.command[0], args=list(server.command[1:]),
                                           env=server.env)
        try:
            async with Client(target, mode=server.protocol) as client:
                log.info("MCP server %r: protocol %s", server.name, client.protocol_version)
                self.clients[server.name] = client
                listed, cursor = [], None
                while True:
                    page = await client.list_tools(cursor=cursor)
                    listed += page.tools
                    cursor = page.next_cursor
                    if not cursor:
                        break
                ready.set_result(listed)
                await self.stop.wait()
        except BaseException as error:
            if not ready.done():
                ready.set_exception(error if isinstance(error, Exception) else RuntimeError(str(error)))
            if not isinstance(error, Exception):
                raise
        finally:
            self.clients.pop(server.name, None)

    def _tool(self, server: MCPServer, listed: Any) -> Tool:
        schema = listed.input_schema if isinstance(listed.input_schema, dict) else {}
        schema = inline_refs(schema, schema.get("$defs") or {})

        async def call(**arguments: Any) -> Any:
            client = self.clients.get(server.name)
            if client is None:
                raise ToolError(f"the connection to MCP server {server.name!r} is closed")
            return result_value(await client.call_tool(listed.name, arguments))

        call.__signature__ = signature_of(schema)
        description = docstring_of(listed.description or "", schema)
        call.__doc__ = description
        return Tool(name=f"{server.name}.{identifier(listed.name)}", description=description, function=call)

    def close(self) -> None:
        if self.stop is not None and not self.loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(CONNECT_TIMEOUT)

    async def _close(self) -> None:
        if self.stop is not None:
            self.stop.set()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)
        self.tasks = []


def namespaces_source(tools: list[Tool]) -> str:
    """Group the stubs `server__tool` under a namespace per server, as `server.tool`."""
    groups: dict[str, list[str]] = {}
    for tool_ in tools:
        server, _, name = tool_.name.partition(".")
        groups.setdefault(server, []).append(name)
    lines = ["import types as _codeact_types"]
    for server, names in groups.items():
        members = ", ".join(f"{name}={stub_name(f'{server}.{name}')}" for name in names)
        lines.append(f"{server} = _codeact_types.SimpleNamespace({members})")
        lines += [f"del {stub_name(f'{server}.{name}')}" for name in names]
    lines.append("del _codeact_types")
    return "\n".join(lines) + "\n"


def stub_name(tool_name: str) -> str:
    return "_codeact_mcp_" + tool_name.replace(".", "__")
