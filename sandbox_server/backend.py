"""Kernel backends: where kernels run. Everything above this seam sees only the `Backend` and `Kernel`
protocols below and `Home`.

The local backend runs confined ipykernel processes on this machine.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import zmq
import zmq.asyncio

from . import files
from .config import Config
from .execution import EventSink, Execution
from .isolation import Capabilities, Isolation
from .kernel import LocalKernel, connection_info, write_connection_file


class Kernel(Protocol):
    """What the session layer needs of a kernel, wherever it runs."""

    name: str

    @property
    def alive(self) -> bool: ...

    async def start(self, timeout: float) -> None:
        """Wait until the kernel answers; its backend calls this once, before anyone else sees the kernel."""

    async def ready(self) -> bool:
        """Alive and reachable right now (a remote kernel reconnects here); False means replace it."""

    async def execute(self, code: str, timeout: float, sink: EventSink | None = None, allow_stdin: bool = False,
                      silent: bool = False, grace: float = 1.0) -> Execution: ...

    def send_input(self, text: str) -> None: ...

    async def interrupt(self) -> None: ...

    async def kill(self) -> None: ...

    def exit_description(self) -> str: ...


KernelT = TypeVar("KernelT", bound=Kernel)


class Backend(Protocol):
    """Where kernels run: the local backend here, the gateway backend in gateway.py."""

    files_through_kernel: bool

    def new_home(self) -> Home: ...

    async def start_kernel(self, home: Home, network: bool = False) -> Kernel: ...

    def remove_home(self, home: Home) -> None: ...

    async def write_file(self, home: Home, kernel: Kernel, path: str, data: bytes) -> int: ...

    async def read_file(self, home: Home, kernel: Kernel, path: str) -> tuple[int, AsyncIterator[bytes]]:
        """The file's size and its bytes in pieces, read as the caller iterates (so a large download never
        sits whole in the server's memory); refused past --max-file."""

    async def list_files(self, home: Home, kernel: Kernel) -> list[dict]: ...

    async def delete_file(self, home: Home, kernel: Kernel, path: str) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Home:
    """What a session keeps across kernel replacements: its directory and the uid that owns it."""

    name: str
    workdir: str
    uid: int | None


async def start_or_kill(kernel: KernelT, timeout: float) -> KernelT:
    """`kernel`, once it answers; one that fails to start, or whose start is cancelled, is killed, not leaked."""
    try:
        await kernel.start(timeout)
    except BaseException:
        await kernel.kill()
        raise
    return kernel


class LocalBackend:
    """Kernels as confined local processes; session directories under one private root."""

    files_through_kernel = False  # the server reads and writes session directories itself

    def __init__(self, config: Config, capabilities: Capabilities) -> None:
        self.config = config
        self.capabilities = capabilities
        self.root = config.root_dir or tempfile.mkdtemp(prefix="codeact-")
        self.owns_root = config.root_dir is None
        os.makedirs(self.root, exist_ok=True)
        os.chmod(self.root, 0o711)  # kernels traverse to their own 0700 directories, list nothing
        self.isolation = Isolation(capabilities, config.memory_limit, config.file_size_limit,
                                   config.process_limit, config.cpu_limit)
        # One context for every kernel client; its default MAXMSGSIZE bounds what one message can
        # cost the server, whatever the kernel sends.
        self.context = zmq.asyncio.Context()
        self.context.setsockopt(zmq.MAXMSGSIZE, config.max_message)
        self.counter = itertools.count(1)

    def new_home(self) -> Home:
        number = next(self.counter)
        uid = self.config.kernel_uid_base + number if self.capabilities.drop_uid else None
        workdir = os.path.join(self.root, f"home-{number}")
        self._make_private_dir(workdir, uid)
        return Home(name=f"home-{number}", workdir=workdir, uid=uid)

    async def start_kernel(self, home: Home, network: bool = False) -> LocalKernel:
        number = next(self.counter)
        name = f"kernel-{number}"
        runtime_dir = os.path.join(self.root, name)
        self._make_private_dir(runtime_dir, home.uid)
        connection = connection_info(runtime_dir)
        connection_file = write_connection_file(runtime_dir, connection, home.uid)
        launch = self.isolation.launch(name, home.workdir, connection_file, home.uid, network)
        kernel = LocalKernel(name, launch, runtime_dir, connection, self.context,
                             self.config.max_output, self.config.max_results)
        return await start_or_kill(kernel, self.config.kernel_start_timeout)

    def remove_home(self, home: Home) -> None:
        shutil.rmtree(home.workdir, ignore_errors=True)

    async def write_file(self, home: Home, kernel: object, path: str, data: bytes) -> int:
        return files.write(home.workdir, path, data, home.uid, self.config.max_file)

    async def read_file(self, home: Home, kernel: object, path: str) -> tuple[int, AsyncIterator[bytes]]:
        return files.read(home.workdir, path, self.config.max_file)

    async def list_files(self, home: Home, kernel: object) -> list[dict]:
        return files.listing(home.workdir)

    async def delete_file(self, home: Home, kernel: object, path: str) -> None:
        files.delete(home.workdir, path)

    def close(self) -> None:
        self.isolation.close()
        self.context.destroy(linger=0)
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _make_private_dir(path: str, uid: int | None) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)
        if uid is not None:
            os.chown(path, uid, uid)
