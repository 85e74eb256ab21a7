"""A small MCP server for the tests, written with the official SDK (`mcp` 2.x):

    python tests/mcp_server.py stdio
    python tests/mcp_server.py http PORT TOKEN    # streamable HTTP on 127.0.0.1:PORT/mcp, bearer TOKEN required
"""

from __future__ import annotations

import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

server = MCPServer("orders")


class Customer(BaseModel):
    name: str
    email: str


class Item(BaseModel):
    sku: str
    quantity: int = Field(ge=1)


class Order(BaseModel):
    customer: Customer
    items: list[Item]


class Summary(BaseModel):
    customer: str
    units: int
    express: bool


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def place_order(order: Order, express: bool = False) -> Summary:
    """Place an order for a customer; returns its summary."""
    return Summary(customer=order.customer.name, units=sum(item.quantity for item in order.items), express=express)


@server.tool()
def greet(name: str) -> str:
    """A greeting, as text."""
    return f"Hello, {name}!"


@server.tool()
def refuse(reason: str) -> str:
    """Always fails, with the reason."""
    raise ToolError(f"refused: {reason}")


def serve_http(port: int, token: str) -> None:
    import uvicorn
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import JSONResponse

    async def require_token(request, call_next):
        if request.headers.get("authorization") != f"Bearer {token}":
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        return await call_next(request)

    app = server.streamable_http_app()
    app.add_middleware(BaseHTTPMiddleware, dispatch=require_token)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    if sys.argv[1] == "stdio":
        server.run("stdio")
    else:
        serve_http(int(sys.argv[2]), sys.argv[3])
