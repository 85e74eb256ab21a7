"""The CodeAct sandbox server: a pool of confined Jupyter kernels behind HTTP and websocket APIs."""

from .config import Config

__all__ = ["Config", "Execution", "Server", "make_app"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Loaded on use: importing the package (as `codeact-sandbox` does first) must not need the [server]
    # extra, so that the command can say it is missing.
    if name in ("Server", "make_app"):
        from . import app

        return getattr(app, name)
    if name == "Execution":
        from .execution import Execution

        return Execution
    raise AttributeError(f"module 'sandbox_server' has no attribute {name!r}")
