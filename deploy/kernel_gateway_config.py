"""Kernel Gateway / Enterprise Gateway config for the sandbox server's gateway backend: Nagle's algorithm off on
kernel websockets, and kernel deaths noticed in a second.

Tornado turns TCP_NODELAY back off after each HTTP response, so a websocket upgraded from one keeps Nagle's
algorithm on; with the client's delayed ACKs every execute then waits ~40 ms. Load this file with
`jupyter kernelgateway --config=deploy/kernel_gateway_config.py` or
`jupyter enterprisegateway --config=deploy/kernel_gateway_config.py` (or copy it into the image's jupyter
config directory). Tested with Kernel Gateway 3.0 (jupyter_server 2) and Enterprise Gateway 3.3
(jupyter_server 1), whose kernel websocket handlers live in different modules.
"""

try:  # jupyter_server 2: Kernel Gateway 3
    from jupyter_server.services.kernels.websocket import KernelWebsocketHandler as _Handler
except ImportError:  # jupyter_server 1: Enterprise Gateway 3, whose handler subclasses this one
    from jupyter_server.services.kernels.handlers import ZMQChannelsHandler as _Handler

_open = _Handler.open


async def _open_without_nagle(self, *args, **kwargs):
    self.set_nodelay(True)
    opened = _open(self, *args, **kwargs)
    if opened is not None:  # a coroutine in jupyter_server 2, a plain call (or a future) in 1
        await opened


_Handler.open = _open_without_nagle


c = get_config()  # noqa: F821 - defined in config files

# The gateway checks each kernel is alive every time_to_dead seconds (3 by default): a kernel that dies (os._exit,
# a segfault, the OOM killer) is reported to the session that long after. Locally each check is a waitpid; with
# Enterprise Gateway's Kubernetes or YARN process proxies it is a call to their API, per kernel: raise it there
# if thousands of kernels run.
c.KernelRestarter.time_to_dead = 1.0
