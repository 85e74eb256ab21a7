"""A session's files: upload, download, list and delete, confined to the session's own directory.

The server runs as root and the directory belongs to the kernel, which may swap any directory in it for a
symlink at any moment. So no path is ever checked and then opened by name: every operation starts from a
handle on the session directory and resolves each component relative to the handle before it, never
following a link (`openat2` with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS where the kernel has it, else one
`openat(O_NOFOLLOW)` per component). Whatever the kernel does meanwhile, the worst it gets is an error.
What is opened is checked by type after opening, without blocking: a FIFO or socket is refused, not read.

These functions block (disk, large trees): the backend runs them in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import secrets
import stat
import sys
from collections.abc import AsyncIterator, Iterator

from .errors import BadRequest, Forbidden, NotFound, TooLarge, Unavailable

READ_CHUNK = 256 * 1024  # a download is sent in pieces this size, so it never sits whole in memory
LIST_LIMIT = 10_000  # files listed at most
SCAN_LIMIT = 200_000  # directory entries looked at, at most, for one listing
DIRECTORY = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# openat2(2), Linux 5.6+: resolve a whole path beneath a directory handle, refusing every link, in one call.
# Its number is 437 on every architecture (it came after the system call tables were unified).
SYS_OPENAT2 = 437 if sys.platform.startswith("linux") else None
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x02, 0x04, 0x08


class OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True) if SYS_OPENAT2 else None
_openat2_works = SYS_OPENAT2 is not None


def split(relative: str) -> list[str]:
    """The components of a client's path; refuses absolute paths, `..`, empty components and NUL."""
    if not relative or relative.startswith("/") or "\x00" in relative:
        raise BadRequest(f"file path {relative!r} must be relative to the session directory")
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise BadRequest(f"file path {relative!r} may not contain '.', '..' or empty components")
    return parts


def open_beneath(directory: int, parts: list[str], flags: int, mode: int = 0) -> int:
    """Open `parts` below the `directory` handle, never following a link and never leaving it."""
    global _openat2_works
    flags |= os.O_CLOEXEC | os.O_NOFOLLOW
    if _openat2_works:
        how = OpenHow(flags, mode if flags & os.O_CREAT else 0,
                      RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        path = "/".join(parts).encode()
        descriptor = _libc.syscall(SYS_OPENAT2, directory, path, ctypes.byref(how), ctypes.sizeof(how))
        if descriptor >= 0:
            return descriptor
        number = ctypes.get_errno()
        if number not in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp policy that forbids openat2
            raise OSError(number, os.strerror(number), "/".join(parts))
        _openat2_works = False
    return open_by_components(directory, parts, flags, mode)


def open_by_components(directory: int, parts: list[str], flags: int, mode: int = 0) -> int:
    """The fallback: one `openat(O_NOFOLLOW)` per component, each relative to the handle before it."""
    current = os.dup(directory)
    try:
        for part in parts[:-1]:
            following = os.open(part, os.O_PATH | DIRECTORY, dir_fd=current)
            os.close(current)
            current = following
        return os.open(parts[-1], flags | os.O_CLOEXEC | os.O_NOFOLLOW, mode, dir_fd=current)
    finally:
        os.close(current)


@contextlib.contextmanager
def session_directory(workdir: str) -> Iterator[int]:
    """A handle on the session directory. Its path is safe to open by name: its parent belongs to the
    server, so the kernel cannot replace it."""
    descriptor = os.open(workdir, os.O_RDONLY | DIRECTORY)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def refusal(relative: str, error: OSError) -> Exception:
    """The client's error for a failed open: links and non-directories in the path are refused, not followed."""
    if error.errno == errno.ENOENT:
        return NotFound(f"no file {relative!r} in the session directory")
    if error.errno in (errno.ELOOP, errno.EXDEV):
        return BadRequest(f"{relative!r} is or passes through a symbolic link; the files API never follows links")
    if error.errno == errno.ENOTDIR:
        return BadRequest(f"a parent of {relative!r} is not a directory")
    if error.errno == errno.EISDIR:
        return BadRequest(f"{relative!r} is a directory")
    if error.errno == errno.ENXIO:
        return BadRequest(f"{relative!r} is not a regular file")
    return BadRequest(f"cannot open {relative!r}: {error.strerror}")


def check_size(relative: str, size: int, max_size: int) -> None:
    """Refuse a file over --max-file, upload or download, local or through a remote kernel."""
    if size > max_size:
        raise TooLarge(f"{relative!r} is {size} bytes, over the {max_size}-byte limit (--max-file)")


def check_regular(relative: str, descriptor: int, owner: int | None) -> os.stat_result:
    info = os.fstat(descriptor)
    if stat.S_ISDIR(info.st_mode):
        raise BadRequest(f"{relative!r} is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise BadRequest(f"{relative!r} is not a regular file (a FIFO, socket or device is never read or written)")
    if owner is not None and info.st_uid != owner:
        # A hard link the kernel made to a file of another user: not the session's to hand out.
        raise Forbidden(f"{relative!r} does not belong to the session")
    return info


def write(workdir: str, relative: str, data: bytes, owner: int | None, max_size: int) -> int:
    """Write a file whole: to a new file beside it, then renamed over the name, which replaces a link or a
    file there without following it, and never leaves a half-written file."""
    check_size(relative, len(data), max_size)
    parts = split(relative)
    with session_directory(workdir) as root:
        parent = make_parents(root, relative, parts[:-1], owner)
        temporary = f".codeact-upload-{secrets.token_hex(8)}"
        try:
            try:
                descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     0o644, dir_fd=parent)
            except OSError as error:  # e.g. the kernel removed the directory meanwhile
                raise refusal(relative, error) from None
            try:
                try:
                    if owner is not None:
                        os.fchown(descriptor, owner, owner)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(descriptor, view):]
                except OSError as error:  # the disk is full, or a quota
                    raise Unavailable(f"cannot write {relative!r}: {error.strerror}") from None
                finally:
                    os.close(descriptor)
                try:
                    os.rename(temporary, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
                except OSError as error:
                    raise refusal(relative, error) from None
            except Exception:  # nothing half-written stays behind
                with contextlib.suppress(OSError):
                    os.unlink(temporary, dir_fd=parent)
                raise
        finally:
            os.close(parent)
    return len(data)


def make_parents(root: int, relative: str, parts: list[str], owner: int | None) -> int:
    """A handle on the directory `parts` names below `root`, creating what is missing (owned by `owner`)."""
    current = os.dup(root)
    try:
        for part in parts:
            try:
                following = os.open(part, os.O_RDONLY | DIRECTORY, dir_fd=current)
            except FileNotFoundError:
                try:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=current)
                    following = os.open(part, os.O_RDONLY | DIRECTORY, dir_fd=current)
                except OSError as error:
                    raise refusal(relative, error) from None
                if owner is not None:
                    os.fchown(following, owner, owner)
            except OSError as error:
                raise refusal(relative, error) from None
            os.close(current)
            current = following
    except BaseException:
        os.close(current)
        raise
    return current


def open_for_reading(workdir: str, relative: str, owner: int | None, max_size: int):
    """A binary file object and its size. Opened non-blocking, so a FIFO cannot stall the open."""
    parts = split(relative)
    with session_directory(workdir) as root:
        try:
            descriptor = open_beneath(root, parts, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as error:
            raise refusal(relative, error) from None
    try:
        size = check_regular(relative, descriptor, owner).st_size
        check_size(relative, size, max_size)
    except BaseException:
        os.close(descriptor)
        raise
    return os.fdopen(descriptor, "rb", buffering=0), size


async def read(workdir: str, relative: str, owner: int | None, max_size: int) -> tuple[int, AsyncIterator[bytes]]:
    """The file's size and its bytes in READ_CHUNK pieces, at most `size` of them (the kernel may be
    appending meanwhile), each read in a worker thread; the file closes when the iterator is done or closed."""
    handle, size = await asyncio.to_thread(open_for_reading, workdir, relative, owner, max_size)

    async def chunks() -> AsyncIterator[bytes]:
        with handle:
            left = size
            while left > 0 and (chunk := await asyncio.to_thread(handle.read, min(READ_CHUNK, left))):
                left -= len(chunk)
                yield chunk

    return size, chunks()


def delete(workdir: str, relative: str) -> None:
    """Remove one name (a file, a link, a FIFO: never what a link points to); directories are refused."""
    parts = split(relative)
    with session_directory(workdir) as root:
        try:
            parent = open_beneath(root, parts[:-1], os.O_PATH | os.O_DIRECTORY) if parts[:-1] else os.dup(root)
        except OSError as error:
            raise refusal(relative, error) from None
        try:
            os.unlink(parts[-1], dir_fd=parent)
        except IsADirectoryError:
            raise BadRequest(f"{relative!r} is a directory; delete the files in it") from None
        except OSError as error:
            raise refusal(relative, error) from None
        finally:
            os.close(parent)


def listing(workdir: str, limit: int = LIST_LIMIT, scan_limit: int = SCAN_LIMIT) -> tuple[list[dict], bool]:
    """Regular files under the directory, with sizes and modification times, and whether the list was cut.

    Iterative (a tree ten thousand levels deep is no recursion error), links never followed, and bounded:
    at most `limit` files listed and `scan_limit` entries looked at, whatever the kernel made.
    """
    entries: list[dict] = []
    scanned = 0
    pending = [""]  # directories still to read, relative to the session directory
    with session_directory(workdir) as root:
        while pending:
            relative = pending.pop()
            try:
                descriptor = open_beneath(root, relative.split("/"), os.O_RDONLY | os.O_DIRECTORY) \
                    if relative else os.dup(root)
            except OSError:
                continue  # replaced or removed since it was seen, or too deep for a path
            children = []
            try:
                with os.scandir(descriptor) as found:  # reads through a copy of the descriptor
                    for entry in found:
                        scanned += 1
                        if scanned > scan_limit:
                            return entries, True
                        path = f"{relative}/{entry.name}" if relative else entry.name
                        try:
                            info = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        if stat.S_ISDIR(info.st_mode):
                            children.append(path)
                        elif stat.S_ISREG(info.st_mode):
                            entries.append({"path": path, "size": info.st_size, "modified": info.st_mtime})
                            if len(entries) >= limit:
                                return entries, True
            finally:
                os.close(descriptor)
            pending.extend(sorted(children, reverse=True))
    return entries, False


REMOVE_DEADLINE = 300.0  # seconds a tree's removal may take before it is abandoned (and logged)


async def remove_tree(path: str, deadline: float = REMOVE_DEADLINE) -> bool:
    """Remove a directory tree in a child process: rm(1) never follows links, has no recursion limit, and
    a session's 200,000 files cost the event loop nothing. Whether the tree is gone."""
    if not os.path.lexists(path):
        return True
    command = ["rm", "-rf", "--one-file-system", "--", path] if sys.platform.startswith("linux") \
        else ["rm", "-rf", "--", path]
    process = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL,
                                                   stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.DEVNULL)
    try:
        await asyncio.wait_for(process.wait(), deadline)
    except asyncio.TimeoutError:
        pass  # abandoned: the caller sees the tree still there
    finally:
        if process.returncode is None:  # past the deadline, or cancelled: rm does not outlive the wait
            process.kill()
            await process.wait()
    return not os.path.lexists(path)
