"""Kernel Gateway / Enterprise Gateway config that turns Nagle's algorithm off on kernel websockets.

Tornado turns TCP_NODELAY back off after each HTTP response, so a websocket upgraded from one keeps Nagle's
algorithm on; with the client's delayed ACKs every execute then waits ~40 ms. Load this file with
`jupyter kernelgateway --config=deploy/kernel_gateway_config.py` (or `jupyter enterprisegateway --config=...`,
or copy it into the image's jupyter config directory).
"""

from jupyter_server.services.kernels.websocket import KernelWebsocketHandler

_open = KernelWebsocketHandler.open


async def _open_without_nagle(self, *args, **kwargs):
    self.set_nodelay(True)
    return await _open(self, *args, **kwargs)


KernelWebsocketHandler.open = _open_without_nagle
