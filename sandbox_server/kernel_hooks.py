"""Code that runs inside each kernel, shipped as source when the kernel starts.

ipykernel sends what a cell prints in messages as large as the print: `print("x" * 200_000_000)` arrives
as one 200 MB message. This hook caps each stream per execution inside the kernel, keeping the head and
a bounded tail, so the server never receives the flood. The server still caps on its side (user code can
undo this hook in its own kernel) and bounds the size of any one message.

Every message the kernel sends is also held under the server's --max-message: a larger one (a 70 MB
string as a cell's value) would make zmq drop the connection it came on. `install_message_cap` cuts such
a message's text with the same marker, so the session keeps working and the client sees what was cut.

Self-contained on purpose: the gateway backend ships this file's source to kernels that cannot import
this package.
"""


def install_output_cap(limit):
    """Cap what each of stdout and stderr carries per execution to about `limit` characters."""
    import collections
    import sys

    marker = "\n[... output truncated: {count} characters omitted ...]\n"
    head_limit = limit // 2
    tail_limit = limit - head_limit

    class CappedWriter:
        def __init__(self, name):
            self.name = name
            self.original_write = None
            self.reset()

        def attach(self):
            # IPython swaps each stream's write for a history-recording wrapper around every cell and
            # restores it after, which would drop a wrapper installed once; so attach per execution, and
            # detach after. A cell with top-level `await` runs without IPython's wrapper: left in place, this
            # writer became the next cell's "original" and every later print recursed until it failed.
            self.stream = getattr(sys, self.name)
            self.original_write = self.stream.write
            self.stream.write = self.write
            self.reset()

        def detach(self):
            if self.original_write is not None and getattr(self.stream, "write", None) == self.write:
                self.stream.write = self.original_write

        def reset(self):
            self.written = 0
            self.tail = collections.deque()
            self.tail_size = 0
            self.dropped = 0

        def write(self, text):
            if not isinstance(text, str):
                return self.original_write(text)
            room = head_limit - self.written
            if room > 0:
                kept = text[:room]
                self.written += len(kept)
                self.original_write(kept)
                text = text[len(kept) :]
            if text:
                self.tail.append(text)
                self.tail_size += len(text)
                while self.tail_size > tail_limit:
                    first = self.tail.popleft()
                    excess = self.tail_size - tail_limit
                    if len(first) > excess:
                        self.tail.appendleft(first[excess:])
                        self.tail_size -= excess
                        self.dropped += excess
                    else:
                        self.tail_size -= len(first)
                        self.dropped += len(first)
            return len(text)

        def flush_tail(self):
            if self.original_write is None:
                return
            if self.dropped:
                self.original_write(marker.format(count=self.dropped))
            if self.tail:
                self.original_write("".join(self.tail))
            self.reset()

    writers = [CappedWriter("stdout"), CappedWriter("stderr")]

    # ipykernel copies what is written to file descriptors 1 and 2 (os.write, subprocesses) to the
    # kernel process's own stdout/stderr, a log file whose growth the file-size limit stops, and then
    # its copying thread dies and the writer blocks. From here on those copies go nowhere.
    import os

    for name in ("stdout", "stderr"):
        copy = getattr(getattr(sys, name), "_original_stdstream_copy", None)
        if isinstance(copy, int):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, copy)
            os.close(null)

    def before_execute(*args):
        for writer in writers:
            writer.attach()

    def after_execute(*args):
        for writer in writers:
            writer.flush_tail()
            writer.detach()

    shell = get_ipython()  # noqa: F821 - defined in every IPython kernel
    shell.events.register("pre_execute", before_execute)
    shell.events.register("post_execute", after_execute)


def install_message_cap(limit):
    """Cut any message the kernel sends whose content would pass `limit` bytes, marking where."""
    import json

    marker = "\n[... output truncated: {count} characters omitted ...]\n"
    session = get_ipython().kernel.session  # noqa: F821 - defined in every IPython kernel
    original = session.serialize

    def shrink(value, room):
        """The value with every string over `room` characters cut to its head and tail around the marker."""
        if isinstance(value, str) and len(value) > room:
            half = max(room // 2, 1)
            return value[:half] + marker.format(count=len(value) - 2 * half) + value[-half:]
        if isinstance(value, dict):
            return {key: shrink(item, room) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [shrink(item, room) for item in value]
        return value

    def serialize(msg, ident=None):
        frames = original(msg, ident)
        if len(frames[-1]) <= limit:  # the content frame, the only one user code can make large
            return frames
        room = limit // 4  # bytes per character are at most 4 in UTF-8 (and 6 once JSON-escaped)
        while room > 64:
            content = shrink(msg["content"], room)
            if len(json.dumps(content, ensure_ascii=False).encode(errors="replace")) <= limit:
                break
            room //= 4
        else:
            content = {"name": "stderr", "text": marker.format(count=len(frames[-1]))}
        return original({**msg, "content": content}, ident)

    session.serialize = serialize


def install_interrupt_wakeup():
    """Let an interrupt stop a cell that awaits. On SIGINT during an awaiting cell, ipykernel's signal handler
    schedules the cell's cancellation on the event loop; but the loop is blocked waiting for events, and a
    callback added from its own thread wakes nothing, so the cell went on until its await ended by itself
    (`await asyncio.sleep(600)` outlived the interrupt, and the timeout's restart then lost the session's
    state). Every signal now also writes to a socket the loop watches, which wakes it."""
    import asyncio
    import signal
    import socket

    loop = asyncio.get_event_loop()  # the kernel's, started or about to be
    ends = socket.socketpair()
    for end in ends:
        end.setblocking(False)

    def drain():
        try:
            while ends[0].recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    loop.add_reader(ends[0].fileno(), drain)
    signal.set_wakeup_fd(ends[1].fileno(), warn_on_full_buffer=False)


def _codeact_file_operation(operation, path, *args):
    """File access for backends whose kernels live on another machine (the gateway backend): confined to
    the directory the kernel started in; refuses absolute paths, `..` and links that leave it."""
    import base64
    import json
    import os

    root = _codeact_file_operation.root
    if path != "." and (not path or path.startswith("/") or ".." in path.split("/") or "" in path.split("/")):
        raise ValueError(f"file path {path!r} must be relative, without '..' or empty components")
    target = os.path.realpath(os.path.join(root, path))
    if target != root and not target.startswith(root + os.sep):
        raise ValueError(f"file path {path!r} leaves the session directory")
    if operation == "write":
        data, truncate = args
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb" if truncate else "ab") as handle:
            handle.write(base64.b64decode(data))
        return ""
    if operation == "size":
        return str(os.path.getsize(target))
    if operation == "read":
        offset, size = args
        with open(target, "rb") as handle:
            handle.seek(offset)
            return base64.b64encode(handle.read(size)).decode()
    if operation == "delete":
        os.unlink(target)
        return ""
    if operation == "list":
        found = []
        for directory, _, names in os.walk(root):
            for name in sorted(names):
                full = os.path.join(directory, name)
                if os.path.isfile(full) and not os.path.islink(full):
                    info = os.stat(full)
                    found.append({"path": os.path.relpath(full, root), "size": info.st_size,
                                  "modified": info.st_mtime})
        return json.dumps(found)
    raise ValueError(f"unknown file operation {operation!r}")


_codeact_file_operation.root = __import__("os").path.realpath(__import__("os").getcwd())


def _codeact_enter_home(path):
    """Gateway kernels all start in the gateway's directory: each session gets a directory of its own there
    (`path`, relative), which its kernels enter at start and the files API is confined to."""
    import os

    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chdir(path)
    _codeact_file_operation.root = os.path.realpath(os.getcwd())


def _codeact_remove_home():
    """When the session closes: its directory goes, before its kernel."""
    import os
    import shutil

    os.chdir(os.path.dirname(_codeact_file_operation.root))
    shutil.rmtree(_codeact_file_operation.root, ignore_errors=True)
