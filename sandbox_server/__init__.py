"""The CodeAct sandbox server: a pool of confined Jupyter kernels behind HTTP and websocket APIs."""

from .app import Server, make_app
from .config import Config
from .execution import Execution

__all__ = ["Config", "Execution", "Server", "make_app"]
__version__ = "0.1.0"
