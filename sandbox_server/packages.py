"""Package installs for kernels that have no network: the server fetches wheels, the kernel installs them.

Each local session gets a directory in its container, owned by root and readable by the session's group:

    sXXXXXX/pip/sock      a unix socket only the session's uid can connect to
    sXXXXXX/pip/wheels    the wheels the server fetched for it

The kernel's pip (pip_hook.py, installed as its sitecustomize) sends `{"requirements": [...], flags}` as one
JSON line. The server checks each requirement is a plain name with extras and version specifiers (no URL,
path or option: what the kernel sends never reaches pip as anything else), checks the operator's policy
(--package-installs, --package-allowlist), then runs the kernel environment's own pip on the host: a dry-run
resolve against that environment, so what it already has is not fetched again, and a download of exactly
what the resolve chose, wheels only, so no package code runs outside the sandbox. It answers with the
pinned list, which the kernel installs with no index from the wheels directory into the session's prefix.

The kernel gets nothing else: no route to the network, only these answers. Each request has a deadline
(--install-timeout), a session runs one at a time, and the server at most INSTALL_SLOTS at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
from dataclasses import dataclass, field

from .config import Config
from .kernel_env import KernelEnvironment

log = logging.getLogger("sandbox_server.packages")

INSTALL_SLOTS = 2  # pip runs at once, server-wide: each is a few hundred ms of CPU and some disk
MAX_REQUIREMENTS = 32
MAX_REQUEST = 64 * 1024  # bytes of one request line
CONNECTIONS_PER_SESSION = 4
PREFIX = ".local"  # in the kernel's HOME: where the session's installs go, as pip's --user would put them
HOOK_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pip_hook.py")

# name[extra,...] followed by comma-separated version clauses, spaces removed first (PEP 508 without URLs
# and markers).
VERSION_CLAUSE = r"(===|==|!=|<=|>=|~=|<|>)[A-Za-z0-9.*+!_-]+"
REQUIREMENT = re.compile(r"(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)"
                         r"(?:\[[A-Za-z0-9._-]+(?:,[A-Za-z0-9._-]+)*\])?"
                         rf"(?:{VERSION_CLAUSE}(?:,{VERSION_CLAUSE})*)?")
FLAGS = {"upgrade": "--upgrade", "pre": "--pre", "no_deps": "--no-deps", "force": "--ignore-installed"}


class Refused(Exception):
    """An install the server will not do; the message goes to the kernel's pip as its error."""


def accumulate(relative: str) -> list[str]:
    """"lib/python3.11/site-packages" as ".local/lib", ".local/lib/python3.11", ...: each to make in turn."""
    parts = relative.split(os.sep)
    return [os.path.join(PREFIX, *parts[: index + 1]) for index in range(len(parts))]


def normalized(name: str) -> str:
    """A project name as the index compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_request(line: bytes, allowlist: frozenset[str] | None) -> tuple[list[str], list[str]]:
    """(requirements, pip flags) of a request line, or Refused with why."""
    try:
        request = json.loads(line)
    except ValueError:
        raise Refused("malformed request") from None
    if not isinstance(request, dict) or not isinstance(request.get("requirements"), list):
        raise Refused("malformed request")
    requirements = []
    for item in request["requirements"]:
        text = "".join(item.split()) if isinstance(item, str) else ""
        match = REQUIREMENT.fullmatch(text)
        if not match or len(text) > 200:
            raise Refused(f"cannot install {item!r}: only package names from the index, with extras and version "
                          "specifiers, can be installed here")
        if allowlist is not None and normalized(match["name"]) not in allowlist:
            raise Refused(f"{match['name']} is not on this sandbox's list of installable packages "
                          f"({', '.join(sorted(allowlist)) or 'empty'})")
        requirements.append(text)
    if not requirements or len(requirements) > MAX_REQUIREMENTS:
        raise Refused(f"give 1 to {MAX_REQUIREMENTS} packages")
    flags = [flag for key, flag in FLAGS.items() if request.get(key) is True]
    return requirements, flags


@dataclass
class SessionChannel:
    """One session's socket and wheels, and its install in progress."""

    directory: str
    listener: socket.socket
    server: asyncio.AbstractServer | None = None  # serving the listener, once started
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    connections: set[asyncio.Task] = field(default_factory=set)

    @property
    def socket_path(self) -> str:
        return os.path.join(self.directory, "sock")

    @property
    def wheels(self) -> str:
        return os.path.join(self.directory, "wheels")


class PackageInstaller:
    """Serves install requests for every local session of one server."""

    def __init__(self, config: Config, environment: KernelEnvironment, server_root: str) -> None:
        self.config = config
        self.environment = environment
        self.allowlist = (frozenset(normalized(name) for name in config.package_allowlist.split(",") if name.strip())
                          if config.package_allowlist is not None else None)
        self.slots = asyncio.Semaphore(INSTALL_SLOTS)
        self.channels: dict[str, SessionChannel] = {}
        # The hook, where every kernel can read it whatever its environment: root-owned, in the server's root.
        self.hook_dir = os.path.join(server_root, "site")
        os.mkdir(self.hook_dir, 0o755)
        shutil.copyfile(HOOK_SOURCE, os.path.join(self.hook_dir, "sitecustomize.py"))
        os.chmod(os.path.join(self.hook_dir, "sitecustomize.py"), 0o644)

    def open(self, container: str, home_dir: str, uid: int | None) -> None:
        """Set up a session's socket and wheels directory, and its prefix, made now because Python remembers
        that a directory on its path was missing and would not look again. Blocking file work only (it may run
        in a worker thread); `serve` starts answering."""
        for path in (PREFIX, os.path.join(PREFIX, "bin"), *accumulate(self.environment.site_packages)):
            os.mkdir(os.path.join(home_dir, path), 0o700)
            if uid is not None:
                os.chown(os.path.join(home_dir, path), uid, uid)
        directory = os.path.join(container, "pip")
        os.mkdir(directory, 0o700)  # closed until the socket is the session's alone
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = SessionChannel(directory, listener)
        path = channel.socket_path
        listener.bind(path)
        listener.listen(8)
        os.mkdir(channel.wheels, 0o755)
        if uid is not None:
            os.chown(path, uid, uid)
            os.chmod(path, 0o600)
            os.chown(directory, 0, uid)
            os.chmod(directory, 0o750)
        else:
            os.chmod(directory, 0o755)
        self.channels[container] = channel

    def serve(self, container: str) -> None:
        """Start answering install requests on the session's socket (on the event loop)."""
        asyncio.get_running_loop().create_task(self._serve(self.channels[container]))

    def readable(self, container: str) -> tuple[str, ...]:
        """What a session's kernel must read of the server's: the hook, and its socket and wheels."""
        return self.hook_dir, self.channels[container].directory

    def kernel_variables(self, container: str, home_dir: str) -> dict[str, str]:
        """The environment variables that lead a kernel's pip to the session's socket, wheels and prefix."""
        channel = self.channels[container]
        prefix = os.path.join(home_dir, PREFIX)
        site = os.path.join(prefix, self.environment.site_packages)
        return {
            "CODEACT_PIP_SOCKET": channel.socket_path,
            "CODEACT_PIP_WHEELS": channel.wheels,
            "CODEACT_PIP_SITE": site,
            "CODEACT_PIP_TIMEOUT": f"{self.config.install_timeout:g}",
            "PYTHONPATH": f"{self.hook_dir}:{site}",
            "PIP_PREFIX": prefix,
            # Whatever pip runs in the kernel: no index, no host configuration, no retries against a network
            # that is not there, so anything this hook does not handle fails in a moment with pip's message.
            "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": channel.wheels,
            "PIP_CONFIG_FILE": os.devnull,
            "PIP_RETRIES": "0",
            "PIP_TIMEOUT": "5",
            "PIP_NO_CACHE_DIR": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_ROOT_USER_ACTION": "ignore",
        }

    async def _serve(self, channel: SessionChannel) -> None:
        def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._connected(channel, reader, writer)

        if channel.listener.fileno() == -1:
            return  # closed before it was served
        channel.server = await asyncio.start_unix_server(connected, sock=channel.listener, limit=MAX_REQUEST)

    def _connected(self, channel: SessionChannel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if len(channel.connections) >= CONNECTIONS_PER_SESSION:
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._answer(channel, reader, writer))
        channel.connections.add(task)
        task.add_done_callback(channel.connections.discard)

    async def _answer(self, channel: SessionChannel, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 10.0)
                if not self.config.package_installs:
                    raise Refused("package installs are turned off on this sandbox server")
                requirements, flags = parse_request(line, self.allowlist)
                async with channel.lock, self.slots:
                    install = await asyncio.wait_for(self.fetch(requirements, flags, channel.wheels),
                                                     self.config.install_timeout)
                answer = {"ok": True, "install": install}
            except Refused as refusal:
                answer = {"ok": False, "error": str(refusal)}
            except (ValueError, asyncio.LimitOverrunError):
                answer = {"ok": False, "error": "malformed request"}
            except asyncio.TimeoutError:
                answer = {"ok": False, "error": f"the install took longer than {self.config.install_timeout:g} s "
                                                "(--install-timeout)"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), 10.0)
        except (OSError, asyncio.TimeoutError):
            pass  # the kernel went away or stopped reading
        finally:
            writer.close()

    async def fetch(self, requirements: list[str], flags: list[str], wheels: str) -> list[str]:
        """Resolve against the kernel environment, download the wheels chosen; their pinned names."""
        pip = [self.environment.python, "-I", "-m", "pip"]
        common = ["--only-binary=:all:", "--no-input", "--disable-pip-version-check", "--retries", "1",
                  "--timeout", "15"]
        resolved = await run_pip([*pip, "install", "--dry-run", "--quiet", "--report", "-", "--root-user-action=ignore",
                                  *common, *flags, *requirements])
        try:
            report = json.loads(resolved)
            install = [f"{item['metadata']['name']}=={item['metadata']['version']}" for item in report["install"]]
        except (ValueError, KeyError, TypeError):
            raise Refused("pip gave no resolution report (the kernel environment's pip is older than 22.2?)") from None
        if install:
            await run_pip([*pip, "download", "--quiet", "--no-deps", "--dest", wheels, *common, *install])
            log.info("fetched %s into %s", ", ".join(install), wheels)
        return install

    async def close(self, container: str) -> None:
        """Stop serving a session (its directory goes with its container)."""
        channel = self.channels.pop(container, None)
        if channel is None:
            return
        if channel.server is not None:
            channel.server.close()
        channel.listener.close()
        for task in list(channel.connections):
            task.cancel()
        await asyncio.gather(*channel.connections, return_exceptions=True)

    async def close_all(self) -> None:
        for container in list(self.channels):
            await self.close(container)


async def run_pip(argv: list[str]) -> str:
    """pip's standard output; Refused with pip's own error lines when it fails. Killed when cancelled."""
    process = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                   start_new_session=True)
    try:
        out, err = await process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise
    if process.returncode != 0:
        lines = [line.removeprefix("ERROR: ") for line in err.decode(errors="replace").splitlines()
                 if line.startswith("ERROR:")]
        message = "; ".join(lines)[:600] or f"pip failed (exit {process.returncode})"
        if "No matching distribution" in message:
            message += " (only packages with a wheel for this platform on the package index can be installed here)"
        raise Refused(message)
    return out.decode(errors="replace")
