"""`make_app` builds the Tornado application; `Server` owns its parts from start-up to shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from tornado import netutil, web
from tornado.httpserver import HTTPServer

from . import handlers, isolation, kernel_env
from .backend import LocalBackend
from .config import Config
from .gateway import GatewayBackend
from .metrics import Metrics
from .pool import KernelPool
from .sessions import SessionManager
from .template import READY_TIMEOUT

log = logging.getLogger("sandbox_server")

SESSION = r"/v1/sessions/([A-Za-z0-9_-]+)"


def make_app(manager: SessionManager, config: Config, metrics: Metrics) -> web.Application:
    dependencies = {"manager": manager, "config": config, "metrics": metrics}
    routes = [
        (r"/health", handlers.HealthHandler),
        (r"/metrics", handlers.MetricsHandler),
        (r"/v1/sessions", handlers.SessionsHandler),
        (SESSION, handlers.SessionHandler),
        (SESSION + r"/execute", handlers.ExecuteHandler),
        (SESSION + r"/ws", handlers.StreamHandler),
        (SESSION + r"/interrupt", handlers.InterruptHandler),
        (SESSION + r"/restart", handlers.RestartHandler),
        (SESSION + r"/files", handlers.FilesHandler),
        (SESSION + r"/files/(.+)", handlers.FileHandler),
        (r"/execute", handlers.CompatExecuteHandler),
        (r"/t/([^/]+)/execute", handlers.PathTokenExecuteHandler),
    ]
    return web.Application(
        [(pattern, handler, dependencies) for pattern, handler in routes],
        default_handler_class=handlers.NotFoundHandler,
        default_handler_args=dependencies,
        websocket_max_message_size=config.max_body,
    )


class Server:
    """The sandbox server's parts, started in order and stopped in reverse.

    Usage:
        server = Server(Config(port=0))
        await server.start()
        ...  # server.port is the bound port
        await server.stop()
    """

    def __init__(self, config: Config, capabilities: isolation.Capabilities | None = None,
                 environment: kernel_env.KernelEnvironment | None = None) -> None:
        config.check()
        self.config = config
        self.capabilities = capabilities
        self.environment = environment
        self.http: HTTPServer | None = None
        self.port: int | None = None

    async def start(self) -> None:
        self.metrics = Metrics()
        if self.config.backend == "gateway":
            backend = GatewayBackend(self.config)
            await backend.check()
            log.info("kernels on the gateway at %s (kernelspec %s)", self.config.gateway_url,
                     self.config.gateway_kernel)
        else:
            if self.environment is None:
                self.environment = kernel_env.inspect(self.config.kernel_python)
            log.info("%s", self.environment.report())
            if self.capabilities is None:
                self.capabilities = isolation.probe(self.environment, self.config.isolate, self.config.kernel_uid_base)
            log.info("%s", self.capabilities.report(self.config.cpu_limit))
            backend = LocalBackend(self.config, self.capabilities, self.environment, self.metrics)
            # The pool fills once the template has started (or failed to), so its kernels are forked too.
            log.info("%s", await backend.kernel_start_report(READY_TIMEOUT + self.config.kernel_start_timeout))
        if not self.config.token:
            log.warning("no token set (--token / CODEACT_SANDBOX_TOKEN): serving %s without auth",
                        self.config.host)
        self.backend = backend
        self.pool = KernelPool(self.backend, self.config.pool_size, busy=lambda: self.manager.creating > 0)
        self.manager = SessionManager(self.config, self.backend, self.pool, self.metrics)
        self.pool.start()
        self.manager.start()
        app = make_app(self.manager, self.config, self.metrics)
        self.http = HTTPServer(app, max_body_size=self.config.max_file + self.config.max_body,
                               idle_connection_timeout=3600)
        sockets = netutil.bind_sockets(self.config.port, self.config.host)
        self.http.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        if self.config.port_file:
            # Written whole, then renamed, so a reader never sees a partial number.
            with open(self.config.port_file + ".tmp", "w") as handle:
                handle.write(str(self.port))
            os.replace(self.config.port_file + ".tmp", self.config.port_file)
        log.info("sandbox server on http://%s:%d (pool %d, max sessions %d)", self.config.host, self.port,
                 self.config.pool_size, self.config.max_sessions)

    async def stop(self) -> None:
        """Stop accepting, then kill every kernel: sessions' and the pool's."""
        if self.http is not None:
            self.http.stop()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.http.close_all_connections(), 1.0)
            self.http = None
        await self.manager.close_all()
        await self.pool.close()
        await self.backend.close()
