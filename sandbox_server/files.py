"""A session's files: upload, download, list and delete, confined to the session's own directory.

The server runs as root and the directory belongs to the kernel, which can plant symlinks in it, so
every path is resolved and checked after resolution, and final components are opened without following
links.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator

from .errors import BadRequest, NotFound, TooLarge


def resolve(workdir: str, relative: str) -> str:
    """The absolute path of `relative` inside `workdir`; refuses absolute paths, `..` and escaping links."""
    if not relative or relative.startswith("/") or "\x00" in relative:
        raise BadRequest(f"file path {relative!r} must be relative to the session directory")
    parts = relative.split("/")
    if any(part in ("..", "") for part in parts[:-1]) or parts[-1] in ("..", ""):
        raise BadRequest(f"file path {relative!r} may not contain '..' or empty components")
    root = os.path.realpath(workdir)
    candidate = os.path.join(root, *parts)
    resolved = os.path.realpath(candidate)
    if resolved != root and not resolved.startswith(root + os.sep):
        raise BadRequest(f"file path {relative!r} leaves the session directory (through a symlink)")
    return resolved


READ_CHUNK = 256 * 1024  # a download is sent in pieces this size, so it never sits whole in memory


def check_size(relative: str, size: int, max_size: int) -> None:
    """Refuse a file over --max-file, upload or download, local or through a remote kernel."""
    if size > max_size:
        raise TooLarge(f"{relative!r} is {size} bytes, over the {max_size}-byte limit (--max-file)")


def write(workdir: str, relative: str, data: bytes, owner: int | None, max_size: int) -> int:
    check_size(relative, len(data), max_size)
    path = resolve(workdir, relative)
    parent = os.path.dirname(path)
    _make_parents(workdir, parent, owner)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    descriptor = os.open(path, flags, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise BadRequest(f"{relative!r} is not a regular file")
        if owner is not None:
            os.fchown(descriptor, owner, owner)
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
    finally:
        os.close(descriptor)
    return len(data)


def _make_parents(workdir: str, parent: str, owner: int | None) -> None:
    root = os.path.realpath(workdir)
    missing = []
    current = parent
    while current != root and not os.path.exists(current):
        missing.append(current)
        current = os.path.dirname(current)
    for directory in reversed(missing):
        os.mkdir(directory, 0o755)
        if owner is not None:
            os.chown(directory, owner, owner)
    if not os.path.isdir(parent):
        raise BadRequest("a parent of the file path is not a directory")


def open_for_reading(workdir: str, relative: str):
    """A binary file object and its size; refuses directories and links."""
    path = resolve(workdir, relative)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFound(f"no file {relative!r} in the session directory")
    except OSError as error:
        raise BadRequest(f"cannot read {relative!r}: {error.strerror}")
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise BadRequest(f"{relative!r} is not a regular file")
    return os.fdopen(descriptor, "rb"), info.st_size


def read(workdir: str, relative: str, max_size: int) -> tuple[int, AsyncIterator[bytes]]:
    """The file's size and its bytes in READ_CHUNK pieces, at most `size` of them (the kernel may be
    appending to it meanwhile); the file closes when the iterator is done or closed."""
    handle, size = open_for_reading(workdir, relative)
    try:
        check_size(relative, size, max_size)
    except TooLarge:
        handle.close()
        raise

    async def chunks() -> AsyncIterator[bytes]:
        with handle:
            left = size
            while left > 0 and (chunk := handle.read(min(READ_CHUNK, left))):
                left -= len(chunk)
                yield chunk

    return size, chunks()


def delete(workdir: str, relative: str) -> None:
    path = resolve(workdir, relative)
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            raise BadRequest(f"{relative!r} is a directory; delete the files in it")
        os.unlink(path)
    except FileNotFoundError:
        raise NotFound(f"no file {relative!r} in the session directory")


def listing(workdir: str, limit: int = 10000) -> list[dict]:
    """Regular files under the directory (links are not followed), with sizes and modification times."""
    root = os.path.realpath(workdir)
    entries = []
    for directory, subdirectories, filenames in os.walk(root, followlinks=False):
        subdirectories.sort()
        for filename in sorted(filenames):
            path = os.path.join(directory, filename)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                entries.append({"path": os.path.relpath(path, root), "size": info.st_size,
                                "modified": info.st_mtime})
            if len(entries) >= limit:
                return entries
    return entries
