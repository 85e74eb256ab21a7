"""The kernel launcher: confine this process, then become the kernel.

Run as `python -m sandbox_server.confine SPEC_JSON`, as root inside the kernel's namespaces when the
server has them. In order: join the kernel's cgroups, make the interpreter reachable for the kernel's
uid, set rlimits, drop to the uid, ask to die with the parent, exec the kernel with a clean environment.
Imports only the standard library, and little of it: this runs once per kernel start.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 2, 4, 4096, 16384
PR_SET_PDEATHSIG = 1


def libc():
    return ctypes.CDLL(None, use_errno=True)


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda text: text.encode() if text is not None else None  # noqa: E731
    if libc().mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


def join_cgroups(paths: list[str]) -> None:
    for path in paths:
        with open(os.path.join(path, "cgroup.procs"), "w") as handle:
            handle.write(str(os.getpid()))


def open_closed_directories(closed: dict[str, list[str]]) -> None:
    """Cover each closed directory (outermost first) with an empty tmpfs and put back only the children
    needed: a closed child is covered in turn, an open one is bound from the host.

    The mount namespace is private to this kernel, so the host's directories keep their permissions.
    """
    # Handles first: once a directory is covered, what was beneath it is out of reach by path.
    handles = {child: os.open(child, os.O_PATH | os.O_DIRECTORY)
               for children in closed.values() for child in children if child not in closed}
    for directory, children in closed.items():
        mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for child in children:
            os.makedirs(child, exist_ok=True)
            if child in handles:
                mount(f"/proc/self/fd/{handles[child]}", child, None, MS_BIND | MS_REC)
    for handle in handles.values():
        os.close(handle)


def set_rlimits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    join_cgroups(spec["cgroups"])
    open_closed_directories(spec["closed"])
    os.chdir(spec["workdir"])
    set_rlimits(spec["rlimits"])
    env = dict(spec["env"])
    if spec["uid"] is not None:
        drop_privileges(spec["uid"])
        env.update(HOME=spec["workdir"], USER="codeact")
    else:
        env.setdefault("HOME", spec["workdir"])
    if sys.platform.startswith("linux"):
        # After the uid change, which clears it: the kernel dies with its parent, never orphaned.
        libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.execve(spec["argv"][0], spec["argv"], env)


if __name__ == "__main__":
    main(sys.argv)
