"""The kernel launcher: confine this process, then become the kernel (and, in a pid namespace, its init).

Run as `python -E -s -S .../sandbox_server/confine.py SPEC_JSON`, as root inside the kernel's namespaces
when the server has them. A script, not `-m`: the package's `__init__` would import tornado and zmq into
every launch. In order:
1. join the kernel's cgroups; in a network namespace of its own, bring its loopback interface up;
2. shape the mount namespace (when it has one): the interpreter and the server's pip hook and the session's
   wheels reachable, the whole host read-only, a
   private /tmp and /dev/shm (tmpfs, sized, charged to the kernel's memory cgroup, gone with the kernel),
   and only the session's own directories writable;
3. set rlimits; in a pid namespace, fork: this process stays as PID 1, reaping orphans (an ipykernel as
   PID 1 never does, and ~100 `cmd &` would exhaust the process limit with zombies) and passing SIGINT on;
4. drop to the kernel's uid, ask to die with the parent, set no_new_privs and the seccomp filter, exec
   the kernel with a clean environment.
Imports only the standard library, and little of it.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import json
import os
import resource
import signal
import socket
import struct
import sys

try:
    from . import seccomp
except ImportError:  # run as a script, as the launch does
    import seccomp

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
MOUNT_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
# The kernel's interfaces, not storage, left writable (writes to /dev nodes work anyway): where they are, and their
# file systems' names in the mount table and magic numbers from statfs.
INTERFACES = {"/proc": ("proc", 0x9FA0), "/dev/pts": ("devpts", 0x1CD1), "/dev/mqueue": ("mqueue", 0x19800202)}
LEFT_WRITABLE = {name for name, _magic in INTERFACES.values()}
SYS_MOUNT_SETATTR = 442  # Linux 5.12; one number on every architecture (424 and later are shared)
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
PR_SET_PDEATHSIG = 1
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
IFREQ = "16sH22x"  # struct ifreq as these two read it: the interface's name, its flags, the rest of the union
# How /proc/self/mountinfo writes these four in a path; the backslash last, so "\134040" stays "\040".
MOUNTINFO_ESCAPES = (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\"))


@functools.cache
def libc():
    return ctypes.CDLL(None, use_errno=True)  # (each CDLL makes its own function-pointer class: ~20 us)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda text: text.encode() if text is not None else None  # noqa: E731
    if libc().mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


class MountAttributes(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def set_read_only(path: str, read_only: bool, recursive: bool = False) -> bool:
    """mount_setattr(2): the mount at `path` (and every mount beneath it, `recursive`, in one step that changes
    all or none) read-only or writable, its other flags kept. False where the call is refused (older Linux, a
    container's seccomp profile)."""
    change = {"attr_set" if read_only else "attr_clr": MOUNT_ATTR_RDONLY}
    attributes = MountAttributes(**change)
    return libc().syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE if recursive else 0,
                          ctypes.byref(attributes), ctypes.sizeof(attributes)) == 0


def join_cgroups(paths: list[str]) -> None:
    """Move this process into each cgroup. Moving a whole process (`cgroup.procs`), Linux holds a lock that every
    fork, thread start and exit on the machine waits for, and taking it can first wait for an RCU grace period:
    one kernel at a time, 1 move in 10 took ~6 ms (up to 15) against 0.3; inside a burst of 100 kernel starts,
    each kernel slept 4.8 ms there on average (up to 28), the template's forks and other kernels' threads queued
    behind it. Moving the calling thread alone (cgroup v1's `tasks`, given 0 for "this thread") takes no such
    lock: a kernel joins before it starts any thread, so that is the whole process, and the threads it starts
    later are made in its cgroups. Where it has more threads, and in cgroup v2 (whose `cgroup.threads` is for
    threaded subtrees), the whole process moves."""
    alone = has_one_thread()
    for path in paths:
        tasks = os.path.join(path, "tasks")
        if alone and os.path.exists(tasks):
            with open(tasks, "w") as handle:
                handle.write("0")
        else:
            with open(os.path.join(path, "cgroup.procs"), "w") as handle:
                handle.write(str(os.getpid()))


def has_one_thread() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:  # (no /proc: assume not)
        return False


def bring_loopback_up() -> None:
    """Bring up the loopback interface of the kernel's own network namespace, which a new namespace has down. The
    session's processes then reach one another on 127.0.0.1 (a local server and its client; ipykernel forwards
    what a forked child process prints through a TCP socket there, lost without it), and still nothing outside
    the namespace. Where it cannot, the kernel runs without, and its log says why."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as handle:
            flags = struct.unpack(IFREQ, fcntl.ioctl(handle, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0)))[1]
            fcntl.ioctl(handle, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))
    except OSError as error:
        print(f"loopback left down in the kernel's network namespace: {error}", file=sys.stderr, flush=True)


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


def mounts() -> list[tuple[str, str, int]]:
    """(mount point, filesystem type, per-mount flags to keep) for every mount of this namespace."""
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            separator = fields.index("-")
            point = fields[4]
            for escape, character in MOUNTINFO_ESCAPES:
                point = point.replace(escape, character)
            flags = 0
            for option in fields[5].split(","):
                flags |= MOUNT_OPTIONS.get(option, 0)
            found.append((point, fields[separator + 1], flags))
    return found


def beneath(path: str, parents) -> bool:
    return any(path.startswith(parent.rstrip("/") + "/") for parent in parents)


def shape_mounts(writable: list[str], private: dict[str, int], closed: dict[str, list[str]],
                 readable: list[str]) -> None:
    """The kernel's view: the host read-only, private tmpfs mounts, and its own directories writable.
    Directories it must read that a private mount covers (a virtual environment under /tmp, the server's root
    under /tmp) are bound back, read-only like the rest."""
    covered = [path for path in readable if beneath(path, private) and not beneath(path, readable)]
    # Handles first: once a directory is covered, what was beneath it is out of reach by path.
    handles = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in [*writable, *covered]}
    open_closed_directories(closed)
    mounted = [path for path in private if os.path.isdir(path)]
    for path in mounted:
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={private[path]}")
    for path in covered:
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{handles.pop(path)}", path, None, MS_BIND | MS_REC)
    make_host_read_only(mounted)
    for path, handle in handles.items():
        os.makedirs(path, exist_ok=True)  # a mount point (inside a private /tmp the path is new)
        mount(f"/proc/self/fd/{handle}", path, None, MS_BIND)
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)  # a bind keeps its source's ro
        os.close(handle)


def make_host_read_only(private: list[str]) -> None:
    """Every mount read-only but the private ones (mounted at `private`) and the kernel's interfaces. In one call
    where Linux has it, which also reaches the mounts that later ones hide, then the interfaces where they are
    (their paths, checked by file system type) and the private mounts writable again: 0.14 ms of CPU, where
    reading the mount table (0.2 ms in a new kernel) and a remount per mount took ~0.45-0.55; else that way."""
    if set_read_only("/", True, recursive=True):
        for point, (_name, magic) in INTERFACES.items():
            if file_system_type(point) == magic:
                set_read_only(point, False)  # (not a mount of its own: refused, and nothing to do)
        for point in private:
            if not set_read_only(point, False):
                errno = ctypes.get_errno()
                raise OSError(errno, f"{point} not made writable again: {os.strerror(errno)}")
        return
    for point, fstype, flags in mounts():
        if fstype in LEFT_WRITABLE or point in private:
            continue
        try:
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError:
            if point == "/":
                raise  # a writable host is not a degradation to accept silently


def file_system_type(path: str) -> int | None:
    """statfs(2)'s f_type, the file system's magic number (None where the path is not there)."""
    result = (ctypes.c_long * 16)()  # struct statfs, which begins with f_type (a word)
    return result[0] if libc().statfs(path.encode(), result) == 0 else None


def set_rlimits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def be_init(kernel: int) -> None:
    """PID 1 of the kernel's pid namespace: reap every child, pass interrupts on, exit as the kernel did.
    When this exits, the kernel's pid namespace ends and every process left in it is killed."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda received, frame: os.kill(kernel, received))
    while True:
        pid, status = os.wait()
        if pid == kernel:
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    join_cgroups(spec["cgroups"])
    if spec["own_network"]:
        bring_loopback_up()
    if spec["namespaced"]:
        shape_mounts(spec["writable"], spec["private"], spec["closed"], spec["readable"])
    os.chdir(spec["workdir"])
    set_rlimits(spec["rlimits"])
    env = dict(spec["env"])
    if spec["uid"] is not None:
        env["USER"] = "codeact"
    kernel = os.fork() if spec["namespaced"] else 0
    if spec["uid"] is not None:
        drop_privileges(spec["uid"])
    if sys.platform.startswith("linux"):
        # After the uid change, which clears it: die with the parent, never orphaned.
        libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if spec["seccomp"]:
        seccomp.install()
    if kernel:
        be_init(kernel)
    os.execve(spec["argv"][0], spec["argv"], env)


if __name__ == "__main__":
    main(sys.argv)
