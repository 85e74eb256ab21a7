"""Kernel backends: where kernels run. Everything above this seam sees only the `Backend` and `Kernel`
protocols below and `Home`.

The local backend runs confined ipykernel processes on this machine.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import platform
import secrets
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import zmq
import zmq.asyncio

from . import files
from .config import Config
from .execution import EventSink, Execution
from .isolation import Capabilities, Isolation, KernelLaunch
from .kernel import KernelExitedAtStart, LocalKernel, connection_info, write_connection_file
from .kernel_env import KernelEnvironment
from .metrics import Metrics
from .packages import PackageInstaller
from .template import KernelTemplate
from .uids import UidLeases

log = logging.getLogger("sandbox_server.backend")

START_SLOTS_PER_CORE = 2
# Spare session directories are made while no kernel starts and no session has asked for a directory for this
# long: in a burst, and while the pool refills, the CPU is the kernels'.
SPARE_HOMES_QUIET = 0.5
SPARE_HOMES_RETRY = 2.0  # after a spare directory could not be made (a full disk must not spin)
RECEIVE_QUEUE = 8  # kernel messages a channel's socket holds before zmq stops reading (zmq's default: 1000)


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
T = TypeVar("T")


class Backend(Protocol):
    """Where kernels run: the local backend here, the gateway backend in gateway.py."""

    files_through_kernel: bool

    async def new_home(self) -> Home: ...

    async def start_kernel(self, home: Home, network: bool = False) -> Kernel: ...

    async def remove_home(self, home: Home) -> None: ...

    async def discard(self, kernel: Kernel, home: Home) -> None:
        """The kernel and the home both go: a session closes, a pool kernel is given up."""

    async def write_file(self, home: Home, kernel: Kernel, path: str, data: bytes) -> int: ...

    async def read_file(self, home: Home, kernel: Kernel, path: str) -> tuple[int, AsyncIterator[bytes]]:
        """The file's size and its bytes in pieces, read as the caller iterates (so a large download never
        sits whole in the server's memory); refused past --max-file."""

    async def list_files(self, home: Home, kernel: Kernel) -> tuple[list[dict], bool]:
        """The session's regular files, and whether the list was cut short (a huge tree)."""

    async def delete_file(self, home: Home, kernel: Kernel, path: str) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Home:
    """What a session keeps across kernel replacements: its directory and the uid that owns it."""

    name: str
    workdir: str
    uid: int | None
    user: str | None = None  # gateway backend: who its kernels are started for, when not the server's user


async def in_worker(function: Callable[..., T], *args, undo: Callable[[T], None]) -> T:
    """`function(*args)` in a worker thread. If the caller is cancelled meanwhile, the call still finishes and
    `undo` gets what it made (on the event loop), so nothing it created is leaked."""
    work = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        work.add_done_callback(lambda done: undo(done.result())
                               if not done.cancelled() and done.exception() is None else None)
        raise


async def start_or_kill(kernel: KernelT, timeout: float) -> KernelT:
    """`kernel`, once it answers; one that fails to start, or whose start is cancelled, is killed, not leaked."""
    try:
        await kernel.start(timeout)
    except BaseException:
        await kernel.kill()
        raise
    return kernel


class LocalBackend:
    """Kernels as confined local processes. Each server has a root of its own, locked while it lives, with a
    container per session (owned by root, mode 0711) holding the session's directory and its kernels'
    runtime directories (owned by the session's uid, mode 0700):

        <base>/codeact-XXXXXX/.lock
        <base>/codeact-XXXXXX/site            the kernels' pip hook (packages.py)
        <base>/codeact-XXXXXX/sXXXXXX/work    the session's directory, the kernel's working directory
        <base>/codeact-XXXXXX/sXXXXXX/home    its kernels' HOME: dotfiles, caches, packages it installed
        <base>/codeact-XXXXXX/sXXXXXX/pip     its install socket and fetched wheels (root's, group-readable)
        <base>/codeact-XXXXXX/sXXXXXX/kN      a kernel's connection file, sockets, IPython profile

    Names are short because a kernel's sockets live in kN and a socket path has at most 107 bytes.
    """

    files_through_kernel = False  # the server reads and writes session directories itself

    def __init__(self, config: Config, capabilities: Capabilities, environment: KernelEnvironment,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.capabilities = capabilities
        self.environment = environment
        base = config.root_dir or tempfile.gettempdir()
        os.makedirs(base, exist_ok=True)
        stale = stale_roots(base)
        self.root = make_new_dir(base, ROOT_PREFIX, 0o711)  # kernels traverse to their 0700 directories
        spread_subdirectories(self.root)
        longest = os.path.join(self.root, "s000000", "k9999999", "k-5")
        if len(longest.encode()) > SOCKET_PATH_MAX:
            os.rmdir(self.root)
            raise ValueError(f"--root-dir {base!r} is too long: kernel sockets under it would pass the "
                             f"{SOCKET_PATH_MAX}-byte limit of a socket path; choose a shorter directory")
        self.root_lock = os.open(os.path.join(self.root, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.root_lock, fcntl.LOCK_EX)  # held while this server lives; the sweep tests it
        self.uids = UidLeases(config.kernel_uid_base) if capabilities.drop_uid else None
        self.isolation = Isolation(capabilities, environment, config.memory_limit, config.file_size_limit,
                                   config.process_limit, config.cpu_limit)
        self.packages = PackageInstaller(config, environment, self.root)
        # One context for every kernel client. Its socket defaults bound what a kernel can make the server
        # hold, whatever it sends: one message at most --max-message, and at most RECEIVE_QUEUE of them
        # waiting per channel (a kernel that floods its iopub between executes queues the rest itself).
        self.context = zmq.asyncio.Context()
        # Five sockets per kernel client: zmq's default cap of 1023 sockets a context would fail near 200 sessions.
        self.context.set(zmq.MAX_SOCKETS, max(1023, 6 * (config.max_sessions + config.pool_size) + 64))
        self.context.setsockopt(zmq.MAXMSGSIZE, config.max_message)
        self.context.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
        self.counter = itertools.count(1)
        self.cleanups: set[asyncio.Task] = set()  # killed kernels' cgroups and directories being removed
        # Kernels setting up at once. A kernel's set-up is CPU work (~50 ms forked, ~0.5 s booted); past a few
        # per core they only share the CPU more finely, so every one of a burst finishes late, and the template
        # and this server, starved among them, dispatch the rest later still. In turn, the first are ready first.
        self.start_slots = asyncio.Semaphore(START_SLOTS_PER_CORE * (os.cpu_count() or 1))
        self.sweep = asyncio.get_running_loop().create_task(remove_trees(stale)) if stale else None
        # Sessions' directories made ahead (--spare-homes), each handed out once (see `_keep_spare_homes`).
        self.spare_homes: list[Home] = []
        self.homes_wanted = asyncio.Event()
        self.homes_wanted.set()
        self.last_home_asked = -SPARE_HOMES_QUIET
        self.kernels_starting = 0
        self.home_maker = asyncio.get_running_loop().create_task(self._keep_spare_homes()) \
            if config.spare_homes else None
        self.template = KernelTemplate(environment, config.kernel_preload, self.root, capabilities.namespaces,
                                       verify=self._try_fork) \
            if config.kernel_start == "fork" and sys.platform.startswith("linux") else None
        if self.template is not None:
            self.template.start()

    async def kernel_start_report(self, timeout: float) -> str:
        """How kernels start here, once the template's first start has ended (its kernel tried, see
        `_try_fork`), for the start-up log."""
        if self.template is None:
            why = "--kernel-start boot" if self.config.kernel_start == "boot" else "fork needs Linux"
            return f"kernels: booted ({why})"
        await self.template.wait_started(timeout)
        return f"kernels: {self.template.describe()}"

    async def _try_fork(self) -> str | None:
        """Why a kernel forked from the template fails to start here, or None when one answers: the template
        asks after each of its starts, and is not used when one fails."""
        home = await self.new_home()
        try:
            kernel = await self.start_kernel(home)
            await kernel.kill()
            return None if kernel.started_by == "fork" else "the template did not answer"
        except Exception as error:  # any failure means: do not fork here
            return str(error)
        finally:
            await self.remove_home(home)

    # A session's directories and uid lease, and a kernel's runtime directory, connection file and cgroups, are
    # a dozen blocking system calls each (mkdir in cgroupfs, chown, flock, bind). They run in a worker thread:
    # on the event loop, a burst of 100 sessions queued their set-up behind one another while the kernels
    # took the CPU (half the sessions were not even being started 2.7 s into the burst).

    async def new_home(self) -> Home:
        self.last_home_asked = asyncio.get_running_loop().time()
        self.homes_wanted.set()
        if self.spare_homes:
            return self.spare_homes.pop(0)
        return await self._new_home()

    async def _new_home(self) -> Home:
        home = await in_worker(self._make_home, undo=self._discard_home)
        self.packages.serve(os.path.dirname(home.workdir))
        return home

    async def _keep_spare_homes(self) -> None:
        """Keep --spare-homes sessions' directories made (with their uid leases and install sockets), so that a
        burst of sessions starts its kernels at once: made on demand, a burst of 100 first spent its first 0.15 s
        making them, beside its kernels (one A/B, 6 bursts each way: all answered 1.90 -> 1.73 s, the machine's
        CPU 35.9 -> 32.5 ms a session). Each is handed out once, to one session or pool kernel, and made again
        only while no kernel starts and no session has asked for one for SPARE_HOMES_QUIET."""
        loop = asyncio.get_running_loop()
        while True:
            await self.homes_wanted.wait()
            self.homes_wanted.clear()
            while len(self.spare_homes) < self.config.spare_homes:
                if self.kernels_starting or loop.time() - self.last_home_asked < SPARE_HOMES_QUIET:
                    await asyncio.sleep(SPARE_HOMES_QUIET / 5)
                    continue
                try:
                    self.spare_homes.append(await self._new_home())
                except Exception as error:  # logged and tried again: sessions make their own meanwhile
                    log.warning("a spare session directory could not be made: %s", error)
                    await asyncio.sleep(SPARE_HOMES_RETRY)

    def _make_home(self) -> Home:
        container = make_new_dir(self.root, "s", 0o711)  # never the name of an earlier session's directory
        uid = self.uids.claim(container) if self.uids is not None else None
        workdir = os.path.join(container, "work")
        make_private_dir(workdir, uid)
        make_private_dir(os.path.join(container, "home"), uid)
        self.packages.open(container, os.path.join(container, "home"), uid)
        return Home(name=os.path.basename(container), workdir=workdir, uid=uid)

    def _discard_home(self, home: Home) -> None:
        asyncio.get_running_loop().create_task(self.remove_home(home))

    async def start_kernel(self, home: Home, network: bool = False) -> LocalKernel:
        try:
            return await self._start_kernel(home, network, self.template)
        except KernelExitedAtStart as error:
            if error.started_by != "fork":
                raise
            # A template that is up can still make kernels that die (a preloaded module that breaks them, a
            # namespace refused by the OS): this session's kernel boots, slower, rather than fail.
            log.warning("a kernel forked from the template exited at start; this one boots instead: %s", error)
            return await self._start_kernel(home, network, None)

    async def _start_kernel(self, home: Home, network: bool, template: KernelTemplate | None) -> LocalKernel:
        self.kernels_starting += 1
        try:
            return await self._start_kernel_counted(home, network, template)
        finally:
            self.kernels_starting -= 1

    async def _start_kernel_counted(self, home: Home, network: bool, template: KernelTemplate | None) -> LocalKernel:
        name = f"k{next(self.counter)}"
        runtime_dir = os.path.join(os.path.dirname(home.workdir), name)
        connection, launch = await in_worker(self._prepare_kernel, name, home, runtime_dir, network,
                                             undo=lambda prepared: self._discard_kernel(prepared[1], runtime_dir))
        kernel = LocalKernel(name, launch, runtime_dir, connection, self.context, self.config, template,
                             self.cleanups)
        try:
            await self.start_slots.acquire()
        except asyncio.CancelledError:
            self._discard_kernel(launch, runtime_dir)  # cancelled before its start: nothing else holds these
            raise
        try:
            await start_or_kill(kernel, self.config.kernel_start_timeout)  # killed, and cleaned, on failure
        finally:
            self.start_slots.release()
        self.metrics.kernels_started[kernel.started_by] += 1
        return kernel

    def _prepare_kernel(self, name: str, home: Home, runtime_dir: str, network: bool) -> tuple[dict, KernelLaunch]:
        container = os.path.dirname(home.workdir)
        make_private_dir(runtime_dir, home.uid)
        connection = connection_info(runtime_dir)
        connection_file = write_connection_file(runtime_dir, connection, home.uid)
        home_dir = os.path.join(container, "home")
        launch = self.isolation.launch(name, home.workdir, home_dir, connection_file, home.uid, network,
                                       env=self.packages.kernel_variables(container, home_dir),
                                       readable=self.packages.readable(container))
        return connection, launch

    def _discard_kernel(self, launch: KernelLaunch, runtime_dir: str) -> None:
        Isolation.remove_cgroups(launch.cgroups)
        asyncio.get_running_loop().create_task(files.remove_tree(runtime_dir))

    async def discard(self, kernel: LocalKernel, home: Home) -> None:
        await kernel.kill()  # first: its processes could write into the home while it goes
        await self.remove_home(home)

    async def remove_home(self, home: Home) -> None:
        """Remove the session's container; its uid goes back only once that is done."""
        await self.packages.close(os.path.dirname(home.workdir))
        gone = await files.remove_tree(os.path.dirname(home.workdir))
        if home.uid is not None and self.uids is not None:
            if gone:
                self.uids.release(home.uid)
            else:
                log.warning("session directory %s not removed; its uid %d stays leased", home.workdir, home.uid)

    async def write_file(self, home: Home, kernel: object, path: str, data: bytes) -> int:
        return await asyncio.to_thread(files.write, home.workdir, path, data, home.uid, self.config.max_file)

    async def read_file(self, home: Home, kernel: object, path: str) -> tuple[int, AsyncIterator[bytes]]:
        return await files.read(home.workdir, path, home.uid, self.config.max_file)

    async def list_files(self, home: Home, kernel: object) -> tuple[list[dict], bool]:
        return await asyncio.to_thread(files.listing, home.workdir)

    async def delete_file(self, home: Home, kernel: object, path: str) -> None:
        await asyncio.to_thread(files.delete, home.workdir, path)

    async def close(self) -> None:
        for task in (self.sweep, self.home_maker):  # an unfinished sweep is the next server's to do again
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.packages.close_all()
        await asyncio.gather(*self.cleanups, return_exceptions=True)
        if self.template is not None:
            await self.template.close()
        self.isolation.close()
        self.context.destroy(linger=0)
        gone = await files.remove_tree(self.root)  # the spare directories with it: one rm, not one each
        os.close(self.root_lock)
        if self.uids is not None:
            for home in self.spare_homes if gone else []:  # as remove_home: a uid goes back once its home is gone
                self.uids.release(home.uid)
            self.uids.close()


ROOT_PREFIX = "codeact-"  # a server root is one of these holding a .lock
SOCKET_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL
STALE_AFTER = 60.0  # seconds: a root younger than this may belong to a server that has not locked it yet


def stale_roots(base: str) -> list[str]:
    """The roots in `base` of servers that are gone (killed outright: SIGKILL, the OOM killer, a crash)."""
    stale = []
    for name in os.listdir(base):
        path = os.path.join(base, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if (not name.startswith(ROOT_PREFIX) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid()
                or time.time() - info.st_mtime < STALE_AFTER):
            continue
        try:
            lock = os.open(os.path.join(path, ".lock"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # not a server root of ours
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            stale.append(path)
        except BlockingIOError:
            pass  # its server is alive
        finally:
            os.close(lock)
    return stale


async def remove_trees(paths: list[str]) -> None:
    for path in paths:
        log.info("removing %s, left by a server that was killed", path)
        await files.remove_tree(path)


def make_new_dir(parent: str, prefix: str, mode: int) -> str:
    """A directory with a new random name (mkdir fails on a name in use), short for the sake of socket paths."""
    while True:
        path = os.path.join(parent, prefix + secrets.token_hex(3))
        try:
            os.mkdir(path, mode)
            os.chmod(path, mode)  # past the umask
            return path
        except FileExistsError:
            continue


# ioctl(2) requests of Linux's generic encoding (x86-64, arm64, riscv64) for inode flags, and chattr's +T flag.
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


def spread_subdirectories(path: str) -> bool:
    """Mark `path` the top of directory hierarchies (`chattr +T`), as /home is: ext4 then puts each directory
    made in it, a session's, in a block group it chooses among the emptier ones, and the session's files
    beside it, instead of every session in the group of `path`. Each session makes and removes ~26 files and
    directories; where ext4 has no journal it skips, on every new inode, each one its group freed in the last
    hours, so with all sessions in one group a mkdir came to cost 100-300 us of CPU after a day of sessions
    (12-18 us spread, 5 on a tmpfs). False where the file system has no such flag (tmpfs) or the machine
    encodes ioctls otherwise: nothing is lost, sessions are only slower to make there."""
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64", "riscv64"):
        return False
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        flags = array.array("i", [0])  # the kernel reads and writes an int, whatever the request's size says
        fcntl.ioctl(descriptor, FS_IOC_GETFLAGS, flags)
        flags[0] |= FS_TOPDIR_FL
        fcntl.ioctl(descriptor, FS_IOC_SETFLAGS, flags)
        return True
    except OSError:
        return False
    finally:
        os.close(descriptor)


def make_private_dir(path: str, uid: int | None) -> None:
    os.mkdir(path, 0o700)
    if uid is not None:
        os.chown(path, uid, uid)
