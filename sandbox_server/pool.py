"""A warm pool of kernels, refilled in the background, so creating a session never waits for a boot."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from .backend import Backend

log = logging.getLogger("sandbox_server.pool")

RETRY_DELAY = 2.0  # after a failed start, before trying again (a broken setup must not spin)
# A kernel boot costs a core for half a second. Starting the refill a moment after a session is handed
# out keeps that boot off the critical path of the session's first executes (create, then run at once).
REFILL_DELAY = 0.3
PRUNE_INTERVAL = 1.0  # how often ready kernels are checked for life
BUSY_RECHECK = 0.05  # how often a refill held back by session creations looks again


class KernelPool:
    """Keeps `size` kernels started, each in a home of its own, ready to hand out. A refill waits while `busy()`
    says sessions are being created: each of those starts a kernel of its own, and a refill beside them takes
    its share of the CPU from them (in a burst of 100 the pool's 4 kernels were started among the burst's)."""

    def __init__(self, backend: Backend, size: int, busy: Callable[[], bool] = lambda: False) -> None:
        self.backend = backend
        self.size = size
        self.busy = busy
        self.ready: list = []
        self.starting = 0
        self.failures = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._refill_forever())
        self._wake.set()

    def take(self):
        """A started kernel and its home, or None when the pool is empty (the caller starts one)."""
        while self.ready:
            kernel, home = self.ready.pop(0)
            self._wake.set()
            if kernel.alive:
                return kernel, home
            asyncio.get_running_loop().create_task(self.backend.discard(kernel, home))
        self._wake.set()
        return None

    def _prune(self) -> None:
        """Give up ready kernels that died while they waited (a gateway culls idle ones): the refill replaces
        them now, not when a session takes one."""
        dead = [(kernel, home) for kernel, home in self.ready if not kernel.alive]
        for kernel, home in dead:
            self.ready.remove((kernel, home))
            asyncio.get_running_loop().create_task(self.backend.discard(kernel, home))

    async def _refill_forever(self) -> None:
        while not self._closed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), PRUNE_INTERVAL)
            self._wake.clear()
            self._prune()
            if len(self.ready) + self.starting >= self.size:
                continue
            if self.ready or self.starting:
                await asyncio.sleep(REFILL_DELAY)
            # One start at a time: on a small machine parallel boots only slow each other down.
            while not self._closed and len(self.ready) + self.starting < self.size:
                if self.busy():
                    await asyncio.sleep(BUSY_RECHECK)
                    continue
                self.starting += 1
                home = None
                try:
                    home = await self.backend.new_home()
                    kernel = await self.backend.start_kernel(home)
                except Exception as error:  # a start failure is logged and retried, never fatal
                    self.failures += 1
                    if home is not None:
                        await self.backend.remove_home(home)
                    log.warning("warm kernel failed to start: %s", error)
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                finally:
                    self.starting -= 1
                if self._closed:
                    await self.backend.discard(kernel, home)
                    return
                self.ready.append((kernel, home))

    async def wait_ready(self, count: int, timeout: float) -> bool:
        """Wait until `count` kernels are ready (used at start-up and by tests)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.ready) < min(count, self.size):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        ready, self.ready = self.ready, []
        await asyncio.gather(*(self.backend.discard(kernel, home) for kernel, home in ready))
