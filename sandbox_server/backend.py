"""Kernel backends: where kernels run. Everything above this seam sees only `Home`, `start_kernel`
and the kernel's own methods (execute, send_input, interrupt, kill, alive).

The local backend runs confined ipykernel processes on this machine.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from dataclasses import dataclass

import zmq
import zmq.asyncio

from .config import Config
from .isolation import Capabilities, Isolation
from .kernel import LocalKernel, connection_info, write_connection_file


@dataclass(frozen=True)
class Home:
    """What a session keeps across kernel replacements: its directory and the uid that owns it."""

    name: str
    workdir: str
    uid: int | None


class LocalBackend:
    """Kernels as confined local processes; session directories under one private root."""

    def __init__(self, config: Config, capabilities: Capabilities) -> None:
        self.config = config
        self.capabilities = capabilities
        self.root = config.root_dir or tempfile.mkdtemp(prefix="codeact-")
        self.owns_root = config.root_dir is None
        os.makedirs(self.root, exist_ok=True)
        os.chmod(self.root, 0o711)  # kernels traverse to their own 0700 directories, list nothing
        self.isolation = Isolation(capabilities, config.memory_limit, config.file_size_limit,
                                   config.process_limit)
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
        try:
            await kernel.start(self.config.kernel_start_timeout)
        except BaseException:
            await kernel.kill()
            raise
        return kernel

    def remove_home(self, home: Home) -> None:
        shutil.rmtree(home.workdir, ignore_errors=True)

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
