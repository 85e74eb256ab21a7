"""The kernel template (a "zygote"): a process of the kernel environment that has imported what a kernel needs
and forks kernels on request, so a new kernel costs a fork and an ipykernel set-up instead of a whole boot.

Run by the server (template.py) as `<kernel python> -s -E .../zygote.py FD PRELOAD TMPDIR KERNEL_CONFIG WAY`, as
root when the server is; WAY is `namespaced`, or `plain` where kernels get no namespaces. FD is its end of a
SOCK_SEQPACKET socket pair: each request is one message (the confine spec isolation.py builds, as JSON) with
two file descriptors: the kernel's log file, and the write end of a pipe on which the kernel tells the server
that its event loop runs (then it closes it). The template itself never reads a request: it sees the socket
readable, forks a kernel, and goes on once the kernel has taken the message. So the template's memory is the
same at every fork, and nothing of one session's request is in the next kernel. Per kernel, two processes:

    template (root, host namespaces; makes a new pid namespace for each kernel, then enters its own again)
      lifeline  reads a pipe whose other end only the server holds, spawned (vfork and exec): our own 65
                bytes of code (lifeline.py, 7 KB), or `cat` where that cannot run (~0.1 MB);
                when namespaced, PID 1 of the kernel's pid namespace, ignoring SIGCHLD so orphans are reaped
                at once; else a shell that kills the kernel's process group. The end of the pipe (the
                server gave the kernel up, or died) ends it, and so the kernel and everything it started.
      kernel    (PID 2 there) takes the request, sends the server its pid, a pidfd, its report pipe and its
                lifeline; enters its other new namespaces (unshare), joins the cgroups, shapes the mounts
                (confine.py's functions, the same as a booted kernel), sets rlimits, drops to its uid,
                seccomp, closes every inherited descriptor, takes the session's environment, reseeds every
                random generator the template imported, and becomes a normal ipykernel, with the application
                and IPython shell the template made (pointed at its own session first) and the output hooks
                installed before it answers; once its event loop runs it writes to the server's ready
                pipe. The template is its parent, and writes its exit status on its
                report pipe when it reaps it; a kernel outlives the template.

The template has no threads (BLAS libraries are held to one thread), no ZMQ context and no open session:
what it imports is found by a rehearsal, a throwaway child that sets up a whole kernel and lists the
modules it loaded. Then it makes what of a kernel needs no socket: ipykernel's application, configured,
and IPython's shell (`prepare_kernel`). A second rehearsal, a throwaway child of the prepared template, runs
a whole forked kernel until it has answered REHEARSED_CELLS (`rehearse_kernel`): the template imports what
that kernel still imported, and gives every function it called a new code object, made one after the other
(`pack_called_code`), so the pages each kernel writes to run them are few. Then the template warms up: it
runs one kernel of its own in its own process through the same cells, takes it down and puts back all it
changed (`warm_up`), keeping the caches it warmed; then it fills its allocators' free space
(free_space.py), so kernels' new objects do not land in holes over its pages, and last puts its populated
anonymous memory on huge pages where it can (huge_pages.py), so each fork copies fewer page-table entries.
It never runs a session's code. Standard library only, besides what it preloads.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import logging
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Callable

import confine  # this script's directory is sys.path[0]; all four are standard library only
import seccomp
from free_space import fill_free_space
from huge_pages import collapse_anonymous_memory
from lifeline import write_lifeline

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x4000000, 0x8000000, 0x20000000, \
    0x40000000
MS_PRIVATE = 1 << 18
PR_SET_CHILD_SUBREAPER, PR_SET_DUMPABLE, PR_SET_NAME = 36, 4, 15
REQUEST_MAX = 1 << 20  # bytes of one request: a spec is a few KB
# What the rehearsals run: a value, a print, an error (the code every session soon runs: display, streams,
# IPython's tracebacks).
REHEARSED_CELLS = ("1+1", "print('rehearsal')", "1/0")
REHEARSED_STATUSES = ["ok", "ok", "error"]
READY_FD = 3  # in a kernel, the server's ready pipe until its event loop runs; the only descriptor past stderr
HERE = os.path.dirname(os.path.abspath(__file__))
# The options of ipykernel's application a kernel reads as it starts: the same in every kernel (read_trait_defaults).
APPLICATION_OPTIONS = ("displayhook_class", "exec_files", "exec_lines", "extensions", "extra_extensions", "gui",
                       "kernel_class", "matplotlib", "outstream_class", "pylab")


LIBC = confine.libc()
for _name in ("prctl", "unshare", "setns", "mount"):  # looked up here, once, not in every kernel
    getattr(LIBC, _name)


# -- the template ----------------------------------------------------------------------------------------


def in_throwaway_child(tmpdir: str, run: Callable[[str, Callable[[bytes], None]], None], timeout: float) -> bytes:
    """What `run(connection_file, report)`, called in a child of the template, passes to `report`: the child has a
    kernel's connection file (IPC, in a directory of its own, removed after), an IPython directory there, and
    none of the template's descriptors; it is killed once it has reported, or after `timeout` (then b"")."""
    # A short name: the kernel's sockets go in it, and the server checks its root for its own kernels' paths
    # (<root>/sXXXXXX/kNNNNNNN/k-5) against the 107 bytes of a socket path.
    directory = tempfile.mkdtemp(prefix="r", dir=tmpdir)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.closerange(3, write)  # (the server's socket among them: only the template's)
            os.closerange(write + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            null = os.open(os.devnull, os.O_RDWR)
            for target in (0, 1, 2):
                os.dup2(null, target)
            os.chdir(directory)
            connection = kernel_files(directory)

            def report(data: bytes) -> None:
                while data:
                    data = data[os.write(write, data):]
                os.close(write)

            run(connection, report)
        finally:
            os._exit(0)
    os.close(write)
    data = b""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(read, select.POLLIN)
    try:
        while (remaining := deadline - time.monotonic()) > 0 and poller.poll(remaining * 1000):
            chunk = os.read(read, 1 << 16)
            if not chunk:
                break
            data += chunk
        else:
            data = b""  # (past the deadline)
    finally:
        os.close(read)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        shutil.rmtree(directory, ignore_errors=True)
    return data


def kernel_files(directory: str) -> str:
    """A kernel's connection file (IPC sockets in `directory`) and IPython directory (IPYTHONDIR) there."""
    os.environ["IPYTHONDIR"] = os.path.join(directory, "ipython")
    os.mkdir(os.environ["IPYTHONDIR"])
    connection = os.path.join(directory, "connection.json")
    with open(connection, "w") as handle:
        json.dump({"transport": "ipc", "ip": os.path.join(directory, "k"), "shell_port": 1, "iopub_port": 2,
                   "stdin_port": 3, "control_port": 4, "hb_port": 5, "key": os.urandom(16).hex(),
                   "signature_scheme": "hmac-sha256", "kernel_name": "python3"}, handle)
    return connection


def run_cells(connection: str, timeout: float) -> list[str]:
    """Run REHEARSED_CELLS in the kernel at `connection`, as its client; the status of each reply."""
    from jupyter_client.blocking import BlockingKernelClient  # (the client's modules are not the kernel's)

    client = BlockingKernelClient(connection_file=connection)
    client.load_connection_file()
    client.start_channels(hb=False)
    try:
        client.wait_for_ready(timeout=timeout)
        return [client.execute_interactive(cell, timeout=timeout, output_hook=lambda message: None)["content"]["status"]
                for cell in REHEARSED_CELLS]
    finally:
        client.stop_channels()
        client.context.term()


def rehearse(tmpdir: str) -> list[str]:
    """The modules a kernel loads once set up, found by setting one up in a throwaway child."""

    def set_up(connection: str, report: Callable[[bytes], None]) -> None:
        from ipykernel.kernelapp import IPKernelApp

        IPKernelApp.instance().initialize(["-f", connection, "--HistoryManager.hist_file=:memory:"])
        report("\n".join(sys.modules).encode())

    data = in_throwaway_child(tmpdir, set_up, timeout=60.0)
    return data.decode().split("\n") if data else []


def preload(modules: list[str], tmpdir: str) -> tuple[list[str], list[str]]:
    """Import what a kernel needs, then the operator's modules; (imported, failed) of the latter."""
    import ipykernel.kernelapp  # noqa: F401  (what the rehearsal itself needs)

    import_quietly(rehearse(tmpdir))
    imported, failed = [], []
    for name in modules:
        try:
            importlib.import_module(name)
            imported.append(name)
        except Exception as error:  # (reported; the template goes on without it)
            failed.append(f"{name} ({type(error).__name__}: {error})")
    return imported, failed


def import_quietly(names: list[str]) -> None:
    for name in names:
        if name and name not in sys.modules:
            try:
                importlib.import_module(name)
            except Exception:  # (a vendored module only importable from its parent's path)
                pass


def rehearse_kernel(tmpdir: str, prepared: dict, timeout: float = 30.0) -> dict | None:
    """What a forked kernel does that the template has not done, found by running one: a throwaway child of the
    prepared template becomes a kernel as a forked kernel does (`run_kernel`, in a directory of its own, without
    the confinement) and answers a client in the same process (a kernel_info, then REHEARSED_CELLS). It reports the
    functions the kernel's threads called (by their code: file, first line, name), the modules it imported and
    the regular expressions it compiled. None if it did not answer within `timeout`."""

    def answer(connection: str, report: Callable[[bytes], None]) -> None:
        import jupyter_client.blocking  # noqa: F401  (the client's modules are not the kernel's)

        before = set(sys.modules)
        compiled_before = set(re._cache)
        called: set[tuple[str, int, str]] = set()
        recording = [True]

        def record(frame, event: str, arg: object) -> None:
            if event == "call" and recording[0]:
                called.add(code_key(frame.f_code))

        def client() -> None:
            try:
                statuses = run_cells(connection, timeout)
                recording[0] = False
                if statuses == REHEARSED_STATUSES:
                    patterns = [(pattern.decode("latin-1") if isinstance(pattern, bytes) else pattern,
                                 isinstance(pattern, bytes), flags)
                                for _kind, pattern, flags in set(re._cache) - compiled_before]
                    report(json.dumps({"called": sorted(called), "modules": sorted(set(sys.modules) - before),
                                       "patterns": patterns}).encode())
            finally:
                os._exit(0)

        threading.Thread(target=client, daemon=True).start()  # before the profile: it records the kernel
        threading.setprofile(record)
        sys.setprofile(record)
        run_kernel(connection, {"output_cap": 1 << 20, "message_cap": 1 << 20}, prepared)

    data = in_throwaway_child(tmpdir, answer, timeout)
    if not data:
        return None
    learned = json.loads(data)
    return {"called": {tuple(key) for key in learned["called"]}, "modules": learned["modules"],
            "patterns": [(pattern.encode("latin-1") if is_bytes else pattern, flags)
                         for pattern, is_bytes, flags in learned["patterns"]]}


def warm_up(tmpdir: str, config: dict, prepared: dict, timeout: float = 30.0) -> str | None:
    """Run one kernel in the template itself, as a forked kernel runs (`run_kernel`, with an application and a
    shell of its own), until it has answered REHEARSED_CELLS; then take it down and put back all it changed
    (`remember_state`). What stays is what a kernel's first run warms once for the whole process, which each
    kernel did again, on pages it then had to copy: IPython's and the libraries' caches (abc's subclass checks,
    types' attribute caches, traitlets' per-class tables), lazily made state of C libraries (OpenSSL's HMAC,
    sqlite's, libzmq's), the code objects' first-call counters: an idle kernel's private memory, 11.0 -> 10.6 MB
    (-> 9.8 MB with `free_space`, which fills the holes it leaves too). Why it failed, or None; the template has
    no thread left either way, or the server does not use it."""
    from tornado.ioloop import IOLoop
    from traitlets.config import SingletonConfigurable

    descriptors = open_descriptors()
    restore = remember_state()
    directory = tempfile.mkdtemp(prefix="w", dir=tmpdir)
    problems: list[str] = []
    try:
        connection = kernel_files(directory)
        for cls in subclasses(SingletonConfigurable):  # its own application, shell and kernel, not the template's
            cls._instance = None
        app, _shell = make_application(config)
        loop = IOLoop.current()  # the loop app.start() runs

        def client() -> None:
            try:
                statuses = run_cells(connection, timeout)
                if statuses != REHEARSED_STATUSES:
                    problems.append(f"its cells answered {statuses}")
            except Exception as error:
                problems.append(f"its client: {type(error).__name__}: {error}")
            finally:
                loop.add_callback(loop.stop)  # (thread-safe; also stops a loop that has yet to start)

        thread = threading.Thread(target=client, name="codeact warm-up client")
        thread.start()
        try:
            run_kernel(connection, {"output_cap": 1 << 20, "message_cap": 1 << 20}, prepared)
        except BaseException as error:  # (its client then fails to connect, and ends)
            problems.append(f"the kernel: {type(error).__name__}: {error}")
        thread.join()
        try:
            for stream in (sys.stdout, sys.stderr):  # ipykernel's, each with a thread that reads its descriptor
                if stream is not sys.__stdout__ and stream is not sys.__stderr__ and hasattr(stream, "close"):
                    stream.close()
            app.close()  # its sockets, its iopub and control threads, its zmq context
            loop.close(all_fds=False)
        except Exception as error:  # (a thread it leaves is found below)
            problems.append(f"taking it down: {type(error).__name__}: {error}")
    finally:
        restore()
        shutil.rmtree(directory, ignore_errors=True)
    gc.collect()  # what the kernel made, gone, closes what it opened; but ipykernel's output streams each leave
    # a pipe that nothing closes (raw descriptors, held by no object that would close them again)
    left = {fd: target for fd, target in open_descriptors().items() if fd not in descriptors}
    for fd in [fd for fd, target in left.items() if target.startswith("pipe:")]:
        os.close(fd)
        del left[fd]
    if left:
        problems.append(f"descriptors left open: {sorted(left.values())}")
    threads = [thread.name for thread in threading.enumerate() if thread is not threading.main_thread()]
    if threads:
        problems.append(f"threads left: {threads}")
    return "; ".join(problems) or None


def open_descriptors() -> dict[int, str]:
    found = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (the listing's own, closed by now)
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return found


def remember_state() -> Callable[[], None]:
    """What running a kernel in this process changes, saved; the function returned puts it back, so the kernel
    leaves no trace a forked kernel could see: every module's globals (what `sys` holds: streams, hooks, argv;
    lazily made module state such as ipykernel's comm manager; builtins), the contents of sys.path and
    os.environ, signal handlers, the loggers' handlers (ipykernel adds one to tornado's in each kernel),
    traitlets' singletons (IPKernelApp.instance(), the kernel's, the shell's), and the standard descriptors.
    What changes inside other objects stays: the caches the run warmed. A module the run imported stays too, and
    so does a module bound as another's attribute (`package.sub`). Not undone: exit handlers (a forked kernel
    ends by os._exit, and runs none)."""
    from traitlets.config import SingletonConfigurable

    modules = [(module, dict(vars(module))) for module in list(sys.modules.values())
               if isinstance(module, types.ModuleType)]
    singletons = {cls: cls.__dict__.get("_instance") for cls in subclasses(SingletonConfigurable)}
    path, environ = list(sys.path), dict(os.environ)
    handlers = {number: signal.getsignal(number) for number in signal.valid_signals()
                if signal.getsignal(number) is not None}
    loggers = {logger: (list(logger.handlers), logger.level, logger.propagate, logger.disabled)
               for logger in all_loggers()}
    # ipykernel's output streams put 1 and 2 back from copies, which our output hook (kernel_hooks.py) has by
    # then pointed at /dev/null: what the template says afterwards would go nowhere.
    standard = [os.dup(fd) for fd in (0, 1, 2)]

    def restore() -> None:
        for module, saved in modules:
            namespace = vars(module)
            for name in [name for name in namespace if name not in saved]:
                if not isinstance(namespace[name], types.ModuleType):
                    del namespace[name]
            for name, value in saved.items():
                if namespace.get(name, value) is not value or name not in namespace:
                    namespace[name] = value
        for cls in subclasses(SingletonConfigurable):
            cls._instance = singletons.get(cls)
        sys.path[:] = path
        os.environ.clear()
        os.environ.update(environ)
        for number, handler in handlers.items():
            if signal.getsignal(number) is not handler:
                signal.signal(number, handler)
        for logger in all_loggers():  # (one made since had no handlers before: ipykernel makes tornado's)
            logger_handlers, level, propagate, disabled = loggers.get(logger, ([], logger.level, logger.propagate,
                                                                               logger.disabled))
            logger.handlers[:] = logger_handlers
            logger.setLevel(level)
            logger.propagate, logger.disabled = propagate, disabled
        for fd, copy in enumerate(standard):
            os.dup2(copy, fd)
            os.close(copy)

    return restore


def all_loggers() -> list[logging.Logger]:
    return [logging.getLogger(), *(logger for logger in list(logging.Logger.manager.loggerDict.values())
                                   if isinstance(logger, logging.Logger))]


def subclasses(cls: type) -> list[type]:
    found, todo = [], [cls]
    while todo:
        found.append(todo.pop())
        todo.extend(found[-1].__subclasses__())
    return found


def code_key(code: types.CodeType) -> tuple[str, int, str]:
    return code.co_filename, code.co_firstlineno, code.co_name


def pack_called_code(called: set[tuple[str, int, str]]) -> list[types.CodeType]:
    """Give every function a kernel calls a new copy of its code object, made now, one after the other (and so
    the code of the closures they make, which lives in their constants). Each call in a kernel writes to the
    code object it runs (its reference count; in CPython 3.11 its warm-up counter and specialised
    instructions), and every page it writes becomes the kernel's own copy: made at import, those code objects
    were spread over pages of code no kernel runs. Returns the old code objects, which the template keeps:
    freed, their memory would be reused by kernels' allocations, scattered again."""
    copies: dict[int, types.CodeType] = {}
    old: list[types.CodeType] = []

    def copy(code: types.CodeType) -> types.CodeType:
        if id(code) not in copies:
            constants = tuple(copy(constant) if type(constant) is types.CodeType and code_key(constant) in called
                              else constant for constant in code.co_consts)
            old.append(code)
            copies[id(code)] = code.replace(co_consts=constants)
        return copies[id(code)]

    for function in gc.get_objects():
        if type(function) is types.FunctionType and code_key(function.__code__) in called:
            function.__code__ = copy(function.__code__)
    return old


def random_states() -> list[object]:
    """Every random generator held at module level in what the template imported: each kernel reseeds them
    (`random`'s, numpy's legacy global state, sympy's own Random, ...), so no two kernels share a stream."""
    import random

    kinds: tuple[type, ...] = (random.Random,)
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        kinds += (numpy_random.RandomState, numpy_random.Generator)
    found: dict[int, object] = {}
    for module in list(sys.modules.values()):
        for value in list(getattr(module, "__dict__", {}).values()):
            try:
                if isinstance(value, kinds) and not isinstance(value, random.SystemRandom):
                    found[id(value)] = value
            except Exception:  # (a proxy whose __class__ raises)
                continue
    return list(found.values())


def reseed(states: list[object]) -> None:
    import random

    for state in states:
        if isinstance(state, random.Random):
            state.seed()
        elif hasattr(state, "bit_generator"):  # numpy Generator: a fresh bit generator's state
            state.bit_generator.state = type(state.bit_generator)().state
        else:  # numpy RandomState
            state.seed()
    multiprocessing = sys.modules.get("multiprocessing.process")
    if multiprocessing is not None:  # its authkey is drawn once, at import
        multiprocessing.current_process().authkey = os.urandom(32)


def serve(control: socket.socket, wake: int, prepared: dict) -> None:
    reports: dict[int, int] = {}  # a kernel's pid -> the write end of its report pipe
    poller = select.poll()
    poller.register(control, select.POLLIN)
    poller.register(wake, select.POLLIN)
    while True:
        for fd, event in poller.poll():
            if fd == wake:
                drain(wake)
                reap_all(reports)
            elif event & select.POLLIN:
                fork_kernel(control, prepared, reports)
            else:  # the server's end closed: it is gone
                os._exit(0)


def fork_kernel(control: socket.socket, prepared: dict, reports: dict[int, int]) -> None:
    """Fork the process that takes the next request and becomes its kernel, with its lifeline first: where
    kernels are namespaced, the lifeline is PID 1 of a new pid namespace (unshare(CLONE_NEWPID) puts only the
    children made after it there, so the kernel is PID 2), and the template then enters its own namespace
    again (setns), which leaves the next kernel a namespace of its own."""
    taken_read, taken_write = os.pipe2(os.O_CLOEXEC)
    report_read, report_write = os.pipe2(os.O_CLOEXEC)
    lifeline_read, lifeline_write = os.pipe2(os.O_CLOEXEC)
    own = prepared["pid_namespace"]
    problem = None
    unshared = own is not None and LIBC.unshare(CLONE_NEWPID) == 0
    if own is not None and not unshared:
        problem = f"unshare(CLONE_NEWPID): {os.strerror(ctypes.get_errno())}"
    pid = -1
    try:
        if problem is None:
            try:
                spawn_lifeline(prepared["lifeline"], lifeline_read)
                pid = os.fork()
            except OSError as error:  # (a lifeline that died at once leaves a namespace no one can enter)
                problem = f"the kernel's lifeline: {error}"
        if pid == 0:
            kernel(control, taken_write, report_read, lifeline_write, None, prepared)
    finally:  # (the template's own: a kernel never returns)
        if unshared and LIBC.setns(own, CLONE_NEWPID) != 0:
            print("kernel template: cannot enter its own pid namespace again; exiting", file=sys.stderr, flush=True)
            os._exit(1)
    if problem is not None:  # still someone must take the request, to tell the server why not
        pid = os.fork()
        if pid == 0:
            kernel(control, taken_write, report_read, lifeline_write, problem, prepared)
    for fd in (taken_write, report_read, lifeline_read, lifeline_write):
        os.close(fd)
    reports[pid] = report_write
    taken = os.read(taken_read, 1)
    os.close(taken_read)
    if not taken:  # the kernel died before taking the request: something is badly wrong here
        print("kernel template: a kernel died before taking its request; exiting", file=sys.stderr, flush=True)
        os._exit(1)


def lifeline_command(namespaced: bool, directory: str) -> tuple[list[str], str | None]:
    """What each kernel's lifeline runs, and why no lifeline can run here (None when one can). It reads the pipe
    only the server holds the other end of, and ends when that end closes (the server gave the kernel up, or
    died). Namespaced, it is PID 1 of the kernel's namespace, whose end kills everything in it; it ignores
    SIGCHLD, so the orphans the kernel leaves it are reaped at once: our own program (lifeline.py, written in
    `directory`) where it runs, else `env -i --ignore-signal=CHLD cat`. Otherwise it is a shell that kills the
    kernel's process group, whose id the kernel writes first."""
    if not namespaced:
        script = 'read group; read end; test -z "$group" || kill -s KILL -- "-$group"'
        argv = [shutil.which("sh") or "/bin/sh", "-c", script]
        return argv, check_lifeline(argv)
    candidates, errors = [], []
    try:
        own = write_lifeline(directory)
        if own is not None:
            candidates.append([own])
    except OSError as error:
        errors.append(f"{directory}: {error}")
    candidates.append([shutil.which("env") or "/usr/bin/env", "-i", "--ignore-signal=CHLD",
                       shutil.which("cat") or "cat"])
    for argv in candidates:
        error = check_lifeline(argv)
        if error is None:
            return argv, None
        errors.append(error)
    return candidates[-1], "; ".join(errors)


def spawn_lifeline(argv: list[str], pipe: int) -> int:
    """posix_spawn: vfork and exec, so no copy of the template's page tables, and a process of 7 KB (`cat`:
    ~0.1 MB)."""
    return os.posix_spawn(argv[0], argv, {}, file_actions=[
        (os.POSIX_SPAWN_DUP2, pipe, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ], setsid=True)


def check_lifeline(argv: list[str]) -> str | None:
    """Why a lifeline cannot run here (ours, in a directory mounted noexec; `env --ignore-signal` is GNU coreutils
    8.31 or later), or None."""
    with open(os.devnull, "rb") as null:
        try:
            result = subprocess.run(argv, stdin=null, capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"{' '.join(argv)}: {error}"
    if result.returncode != 0:
        return f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.decode(errors='replace').strip()}"
    return None


def reap_all(reports: dict[int, int]) -> None:
    """Reap every child that exited; a kernel's status goes on its report pipe, which the server reads."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        report = reports.pop(pid, None)
        if report is not None:  # (else a lifeline, or an orphan of a kernel that is not namespaced)
            try:
                os.write(report, f"{os.waitstatus_to_exitcode(status)}\n".encode())  # negative: by that signal
            except OSError:  # the server let the kernel go
                pass
            os.close(report)


def drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


# -- the kernel --------------------------------------------------------------------------------------------


def kernel(control: socket.socket, taken: int, report: int, lifeline: int, problem: str | None,
           prepared: dict) -> None:
    spec, log, ready = take_request(control, taken, report, lifeline, problem, prepared)
    become_kernel(spec, log, ready, prepared)


def take_request(control: socket.socket, taken: int, report: int, lifeline: int, problem: str | None,
                 prepared: dict) -> tuple[dict, int, int]:
    """The next request (spec, log and the write end of the server's ready pipe), in the kernel's new namespaces.
    The server hears the kernel's pid (as it sees it), a pidfd, the read end of its report pipe and the write end
    of its lifeline; or why not."""
    request_id = None
    try:
        if prepared["pid_namespace"] is not None:
            os.close(prepared["pid_namespace"])
        message, fds, flags, _address = socket.recv_fds(control, REQUEST_MAX, 2)
        os.write(taken, b".")
        os.close(taken)
        request = json.loads(message)
        request_id = request["id"]
        if problem is not None:
            raise OSError(problem)
        if flags & socket.MSG_TRUNC or len(fds) != 2:
            raise ValueError("malformed request")
        spec = request["spec"]
        # /proc is still the host's here: its `self` is this process's pid as the server sees it.
        pid = int(os.readlink("/proc/self"))
        if spec["namespaced"]:
            if os.getpid() != 2:  # (1 is its lifeline)
                raise OSError("the template could not make a pid namespace")
            namespaces = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
            if spec["own_network"]:
                namespaces |= CLONE_NEWNET
            if LIBC.unshare(namespaces) != 0:
                number = ctypes.get_errno()
                raise OSError(number, f"unshare: {os.strerror(number)}")
        os.setsid()
        os.write(lifeline, f"{os.getpid()}\n".encode())  # the process group a lifeline that is not PID 1 kills
        pidfd = os.pidfd_open(os.getpid())
        socket.send_fds(control, [json.dumps({"id": request_id, "pid": pid}).encode()], [pidfd, report, lifeline])
        for fd in (pidfd, report, lifeline, control.detach()):
            os.close(fd)
        return spec, fds[0], fds[1]
    except BaseException as error:  # (every failure is the server's to hear about)
        with_id = {"id": request_id, "error": f"{type(error).__name__}: {error}"}
        try:
            control.send(json.dumps(with_id).encode())
        finally:
            os._exit(1)


def inherited_address_space(rlimits: dict[str, int]) -> dict[str, int]:
    """The address-space limit counts on top of what the kernel inherits: the template's mappings (hundreds of
    MB of virtual size with the data stack, shared and mostly never touched) are not memory it asks for. The
    cgroup's memory limit, where there is one, counts what it really uses."""
    with open("/proc/self/status") as handle:
        size = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmSize:"))
    return {**rlimits, "RLIMIT_AS": rlimits["RLIMIT_AS"] + size} if "RLIMIT_AS" in rlimits else rlimits


def become_kernel(spec: dict, log: int, ready: int, prepared: dict) -> None:
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        confine.join_cgroups(spec["cgroups"])
        if spec["own_network"]:
            confine.bring_loopback_up()
        if spec["namespaced"]:
            # What `unshare --mount-proc` does: our mounts stop propagating to the host, then a /proc of the
            # new pid namespace.
            confine.mount("none", "/", None, MS_PRIVATE | confine.MS_REC)
            confine.mount("proc", "/proc", "proc", confine.MS_NOSUID | confine.MS_NODEV | confine.MS_NOEXEC)
            confine.shape_mounts(spec["writable"], spec["private"], spec["closed"], spec["readable"])
        os.chdir(spec["workdir"])
        confine.set_rlimits(inherited_address_space(spec["rlimits"]))
        if spec["uid"] is not None:
            confine.drop_privileges(spec["uid"])
        # The uid change also made it undumpable, unlike a booted kernel (exec resets that): its own /proc files
        # (environ, maps) would be root's. Its memory is its own session's to read, as a booted kernel's is.
        LIBC.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
        if spec["seccomp"]:
            seccomp.install(prepared["seccomp"])
        signal.set_wakeup_fd(-1)
        for number, handler in ((signal.SIGCHLD, signal.SIG_DFL), (signal.SIGTERM, signal.SIG_DFL),
                                (signal.SIGINT, signal.default_int_handler)):
            signal.signal(number, handler)
        os.dup2(ready, READY_FD, inheritable=False)
        os.closerange(READY_FD + 1, prepared["open_max"])  # nothing of the template's or another kernel's
        env = dict(spec["env"])
        if spec["uid"] is not None:
            env["USER"] = "codeact"
        os.environ.clear()
        os.environ.update(env)
        # The path a booted `python -m ipykernel_launcher` has: PYTHONPATH (the pip hook and the session's
        # packages), then the environment's own; not this script's directory. IPython adds '' as it does there.
        extra = [entry for entry in env.get("PYTHONPATH", "").split(":") if entry]
        sys.path[:] = [*extra, *(entry for entry in sys.path if entry != HERE)]
        for name in ("confine", "free_space", "huge_pages", "lifeline", "seccomp"):  # the template's, not the kernel's
            sys.modules.pop(name, None)
        reseed(prepared["random_states"])
        LIBC.prctl(PR_SET_NAME, b"codeact-kernel", 0, 0, 0)  # what ps and top show
        run_kernel(spec["connection_file"], spec["hook_limits"], prepared, READY_FD)
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def prepare_kernel(config: dict) -> dict:
    """Half of a kernel's set-up, done once here: ipykernel's application with IPython's configuration and
    profile, and IPython's shell (magics, formatters, the user namespace's builtins, the compiler). None of it
    needs a socket, a thread or anything of a session, and made in each kernel it cost ~15 ms of CPU and
    ~7 MB of copied pages. IPKernelApp.instance() and the shell's instance() return these in every kernel,
    which `run_kernel` points at its own session first. Also the hooks' code, compiled once."""
    without_shell_channel_thread()
    control_on_main_thread()
    greets_subscribers = subscriptions_heard_after_sends()
    flushes_only_what_was_written()
    make_application(config)
    with open(os.path.join(HERE, "kernel_hooks.py")) as handle:
        hooks = compile(handle.read(), "<codeact kernel setup>", "exec")
    # What IPython records at the end of its start-up (the modules `%reset -f` keeps): made here, because a
    # set of 1,100 module names made in the kernel touches every name's page (2 MB).
    return {"hooks": hooks, "module_names": frozenset(sys.modules), "iopub_welcome": greets_subscribers}


def make_application(config: dict) -> tuple:
    """ipykernel's application (IPKernelApp.instance()) and IPython's shell (ZMQInteractiveShell.instance()), as a
    kernel's set-up makes them up to its sockets."""
    from ipykernel.compiler import XCachingCompiler
    from ipykernel.kernelapp import IPKernelApp
    from ipykernel.zmqshell import ZMQInteractiveShell
    from IPython.core.application import BaseIPythonApplication
    from IPython.core.extensions import BUILTINS_EXTS
    from traitlets.config import Config

    app = IPKernelApp.instance(config=Config(config))
    # The configuration is given as it is: traitlets' command-line parser walks every configurable class to
    # build itself (3.4 MB of touched pages in each kernel that ran it).
    app.parse_command_line = lambda argv=None: None
    BaseIPythonApplication.initialize(app, [])  # what IPKernelApp.initialize starts with: config files, profile
    # As IPythonKernel.__init__ makes it, less the kernel, which each kernel sets.
    shell = ZMQInteractiveShell.instance(parent=app, profile_dir=app.profile_dir, user_module=None, user_ns=None,
                                         kernel=None, compiler_class=XCachingCompiler)
    read_trait_defaults(app, shell)
    # IPython loads its own extensions (storemagic) by first importing the bare name, which fails after a search
    # of every directory on the path (the kernel's own among them); it then loads IPython.extensions.NAME and
    # marks NAME as one of its own. The template does the marking and names the module it ends up loading.
    app.default_extensions = [f"IPython.extensions.{name}" if name in BUILTINS_EXTS else name
                              for name in app.default_extensions]
    BUILTINS_EXTS.update({name: True for name in BUILTINS_EXTS if f"IPython.extensions.{name}"
                          in app.default_extensions})
    # IPython's own extensions hold nothing of a session's (storemagic: its magics, registered on the shell; its
    # store is the profile's, opened on first use, once a kernel has pointed the shell at its own profile), so
    # they are loaded here, once; ipykernel then finds them loaded in each kernel. Where one fails, each kernel
    # tries it again and says why, as IPython does. Extensions named in IPython's configuration files load in
    # each kernel, as before.
    for name in app.default_extensions:
        with contextlib.suppress(Exception):
            shell.extension_manager.load_extension(name)
    return app, shell


def read_trait_defaults(app: object, shell: object) -> None:
    """traitlets makes a trait's default value on its first read, in whichever process reads it first. IPython
    makes its display formatters (a dozen configured objects) when a cell first shows a value: in each kernel, a
    third of its first `1+1`; made here, every kernel shares them. A kernel's first output then also read those
    formatters' own defaults and made two more formatters, its first cell made IPython's input transformers, its
    set-up read the application's options: ~40 defaults made in every kernel, 0.5 ms of its CPU (median, one
    kernel at a time, against 2.1 ms for its first `1+1`'s cell). Read here once, every
    kernel finds them made. Only what holds no session's state: the shell's output, input and history machinery
    (a session's history is its own from `history_manager.reset`) and the application's configuration; not its
    session (a key and an id per kernel) or the directories it derives from the environment."""
    display = shell.display_formatter
    for configurable in (shell, display, display.ipython_display_formatter, display.mimebundle_formatter,
                         *display.formatters.values(), shell.displayhook, shell.display_pub, shell.history_manager):
        for name in configurable.trait_names():
            getattr(configurable, name)
    for name in APPLICATION_OPTIONS:
        getattr(app, name, None)


def without_shell_channel_thread() -> None:
    """Kernels take shell messages on their main thread, as ipykernel 6 did. ipykernel 7 receives them in a
    thread of their own and passes each on to the main thread through a pair of sockets, for subshells (cells
    that run beside a busy one), which nothing of ours asks for: per kernel one thread, one event loop and
    socket pairs more to start, and two thread hops more per message. ipykernel 7 runs this way when the
    thread is None, except that an execute with top-level `await` reads the thread's `parent_thread`; so the
    kernel gets a stand-in that is false, whose parent thread is the main thread, and tells clients that it has
    no subshells. Nothing to do with ipykernel 6."""
    import ipykernel.kernelapp
    import ipykernel.kernelbase

    if not hasattr(ipykernel.kernelapp, "ShellChannelThread"):
        return

    class NoShellChannelThread:
        @property
        def parent_thread(self) -> threading.Thread:
            return threading.main_thread()

        def __bool__(self) -> bool:
            return False

    ipykernel.kernelapp.ShellChannelThread = lambda *args, **kwargs: NoShellChannelThread()
    ipykernel.kernelbase.Kernel._supports_kernel_subshells = property(lambda self: bool(self.shell_channel_thread))


def control_on_main_thread() -> None:
    """Kernels take control messages on their main thread, as ipykernel 5 did. ipykernel 6 and 7 take them in a
    thread of their own, with an event loop of its own, so that a debugger or an interrupt message is heard while
    a cell runs; the server opens no control channel (kernel.CHANNELS: an interrupt is a signal, a shutdown a
    kill), so per kernel that thread and its loop would wait for nothing (measured: 0.8 ms less of a kernel's
    CPU, half the kernels each way inside bursts of 100). The kernel gets a stand-in that is false, as ipykernel
    6 reads a kernel without the thread, whose event loop is the main thread's: a client that does connect to
    control still gets its replies, once no cell runs."""
    import ipykernel.kernelapp
    from tornado.ioloop import IOLoop

    if not hasattr(ipykernel.kernelapp, "ControlThread"):
        return

    class ControlOnMainThread:
        @property
        def io_loop(self) -> IOLoop:
            return IOLoop.current()

        def start(self) -> None:
            pass

        def stop(self) -> None:
            pass

        def is_alive(self) -> bool:
            return False

        def __bool__(self) -> bool:
            return False

    ipykernel.kernelapp.ControlThread = lambda *args, **kwargs: ControlOnMainThread()


def subscriptions_heard_after_sends() -> bool:
    """ipykernel's iopub thread hears new subscriptions (to greet each subscriber with an iopub_welcome) through a
    ZMQStream on its XPUB socket, and sends on that same socket directly. A send also takes in whatever the socket's
    peers sent, and with it the wake-up the stream waits for: in 1-4% of kernel starts the greeting came ~0.2 s late
    (the stream's next wake-up) or never. After each send, in that thread, the kernel now reads what is waiting
    itself. Whether ipykernel greets subscribers (iopub_welcome, JEP 65; its iopub an XPUB socket, since late
    2025): where it does not, nothing to do, and the server asks each kernel a kernel_info instead."""
    import ipykernel.iostream
    import zmq

    thread_class = ipykernel.iostream.IOPubThread
    if not hasattr(thread_class, "_handle_subscription"):
        return False
    really_send = thread_class._really_send

    def send_then_hear(self: ipykernel.iostream.IOPubThread, *args: object, **kwargs: object) -> None:
        really_send(self, *args, **kwargs)
        if threading.current_thread() is not self.thread or self.socket is None:
            return  # (a multiprocessing child pipes to its parent, or the thread is gone: not its socket's to read)
        try:
            while self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._handle_subscription(self.socket.recv_multipart(zmq.NOBLOCK))
        except zmq.ZMQError:
            pass

    thread_class._really_send = send_then_hear
    return True


def flushes_only_what_was_written() -> None:
    """ipykernel flushes stdout and stderr around everything that could follow output (a result, an error, an
    input request, the reply, the idle status): ~10 flushes in each execute. Each one, from the main thread, hands
    the stream's flush to the iopub thread and waits until that thread has run it: two thread switches, even for
    a stream nothing was written to since its last flush. A forked kernel's streams now flush only when there is
    something to send (text waiting, or a flush already due); what was written is sent, in order, as before.
    Measured, one kernel at a time: a first `1+1` took 1.1 ms less of the kernel's CPU (5.5 -> 4.4 ms). A stream
    that does not keep what this reads (another ipykernel) flushes as ipykernel does."""
    import ipykernel.iostream

    stream_class = ipykernel.iostream.OutStream
    flush = stream_class.flush

    def flush_when_written(self: ipykernel.iostream.OutStream) -> None:
        try:
            idle = not self._flush_pending and not self._subprocess_flush_pending and self.echo is None
            if idle:
                with self._buffer_lock:
                    idle = not any(buffer.tell() for buffer in self._buffers.values())
        except AttributeError:  # (a stream that does not keep these)
            idle = False
        if not idle:
            flush(self)

    stream_class.flush = flush_when_written


def run_kernel(connection_file: str, hook_limits: dict[str, int], prepared: dict, ready: int | None = None) -> None:
    """Set up and run an ipykernel as `python -m ipykernel_launcher -f CONNECTION_FILE` would, with the
    template's application and shell (`prepare_kernel`), each pointed at this session: its IPython profile
    and directory, environment, history session and kernel. Two steps are left out that copy much of the
    template's memory into the kernel for nothing: ipykernel's list of loaded modules' files, which only its
    debugger reads (every module object and file name touched: 4 MB), and IPython's set of module names,
    made in the template instead. It has no heartbeat channel, which the server does not use, no shell-channel
    thread (`without_shell_channel_thread`, set once in the template) and no control thread
    (`control_on_main_thread`). Then the output
    and message caps (kernel_hooks.py), which a booted kernel gets from a first execute. Once its event loop
    runs, it writes to `ready` (the server's pipe) and closes it: the server needs no kernel_info to know it
    will take messages. The kernel is otherwise ipykernel's own, unchanged."""
    from ipykernel.kernelapp import IPKernelApp
    from ipykernel.zmqshell import ZMQInteractiveShell
    from IPython.core.application import BaseIPythonApplication
    from IPython.core.profiledir import ProfileDir
    from IPython.paths import get_ipython_dir
    from IPython.utils.path import get_home_dir
    from tornado.ioloop import IOLoop

    sys.argv = [os.path.join(os.path.dirname(os.path.dirname(sys.modules["ipykernel"].__file__)),
                             "ipykernel_launcher.py"), "-f", connection_file]
    app = IPKernelApp.instance()
    shell = ZMQInteractiveShell.instance()
    app.connection_file = connection_file

    def adopt_session(self: IPKernelApp, argv: list | None = None) -> None:
        """In place of BaseIPythonApplication.initialize, done in the template: this session's IPython directory
        and profile (under its runtime directory), and what the shell took from the template's surroundings."""
        self.ipython_dir = shell.ipython_dir = session_ipython_dir() or get_ipython_dir()
        self.profile_dir = shell.profile_dir = ProfileDir.create_profile_dir_by_name(self.ipython_dir, "default",
                                                                                     self.config)
        shell.db = None  # (its profile's store, opened on first use: nothing the template may have opened)
        shell.home_dir = get_home_dir()
        shell.starting_dir = os.getcwd()
        shell.init_environment()  # ipykernel's TERM, PAGER, ... in this kernel's environment
        shell.history_manager.reset(new_session=True)  # its own session, begun now, here

    init_kernel = app.init_kernel

    def init_kernel_without_module_list() -> None:
        modules = sys.modules
        sys.modules = {}  # what IPythonKernel.__init__ lists; the import system keeps the real one
        try:
            init_kernel()
        finally:
            sys.modules = modules
        shell.kernel = shell.parent = app.kernel  # what IPythonKernel.__init__ gives the shell it makes

    def init_code() -> None:  # IPython's InteractiveShellApp.init_code, with the set of module names made before
        app._run_startup_files()
        app._run_exec_lines()
        app._run_exec_files()
        if app.hide_initial_ns:
            shell.user_ns_hidden.update(shell.user_ns)
        app._run_cmd_line_code()
        app._run_module()
        sys.stdout.flush()
        sys.stderr.flush()
        shell._sys_modules_keys = prepared["module_names"]  # (not copied: that touches every name)

    app.init_kernel = init_kernel_without_module_list
    # No heartbeat: the server never pings (it sees a kernel's death by its pidfd and report pipe), and a heartbeat
    # is a zmq context of its own, with three threads, in every kernel.
    app.init_heartbeat = lambda: None
    # The server wrote the connection file with the paths this kernel binds (IPC sockets, no port to choose):
    # ipykernel would only read it back to find nothing to change (0.3 ms).
    app.write_connection_file = lambda: None
    if all(hasattr(app, name) for name in ("_run_startup_files", "_run_exec_lines", "_run_exec_files",
                                           "_run_cmd_line_code", "_run_module")):
        app.init_code = init_code
    initialize = BaseIPythonApplication.initialize
    BaseIPythonApplication.initialize = adopt_session  # what IPKernelApp.initialize calls first, via super()
    try:
        app.initialize([])
    finally:
        BaseIPythonApplication.initialize = initialize
        for name in ("init_kernel", "init_code", "init_heartbeat", "write_connection_file", "parse_command_line"):
            app.__dict__.pop(name, None)
    namespace = shell.user_ns
    exec(prepared["hooks"], namespace)
    namespace.pop("install_output_cap")(hook_limits["output_cap"])
    namespace.pop("install_message_cap")(hook_limits["message_cap"])
    namespace.pop("install_interrupt_wakeup")()
    if ready is not None:
        IOLoop.current().add_callback(tell_ready, ready)  # run once app.start() has set the kernel's handlers
    app.start()


def tell_ready(ready: int) -> None:
    try:
        os.write(ready, b"r")
    finally:
        os.close(ready)


def session_ipython_dir() -> str | None:
    """IPYTHONDIR, which the server sets to a directory in the kernel's runtime directory, made here; None where it
    is unset or cannot be made, for IPython's own lookup and its fallbacks (which first find the home and XDG
    directories, resolving every link: a third of pointing IPython at the session)."""
    directory = os.environ.get("IPYTHONDIR")
    if not directory or not os.path.isabs(directory):
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return None
    return directory if os.access(directory, os.W_OK) else None


def own_pid_namespace(namespaced: bool) -> int | None:
    """A descriptor of the template's pid namespace, to enter again after making one for a kernel; None where
    kernels are not namespaced (not root, or --no-isolate): kernels are then plain children."""
    return os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC) if namespaced else None


def main(argv: list[str]) -> None:
    control = socket.socket(fileno=int(argv[1]))
    control.set_inheritable(False)  # (passed to it by the server) kernels have it, lifelines must not
    LIBC.prctl(PR_SET_NAME, b"codeact-zygote", 0, 0, 0)
    started = time.monotonic()
    imported, failed = preload([name for name in argv[2].split(",") if name], argv[3])
    prepared = prepare_kernel(json.loads(argv[4]))
    learned = rehearse_kernel(argv[3], prepared)
    if learned is not None:  # (else kernels work the same, with more of the template's pages copied)
        import_quietly(learned["modules"])
        for pattern, flags in learned["patterns"]:  # (re's cache: kernels find them compiled)
            with contextlib.suppress(re.error):
                re.compile(pattern, flags)
        prepared["module_names"] = frozenset(sys.modules)
        prepared["old_code"] = pack_called_code(learned["called"])
    warm_up_started = time.monotonic()
    print("kernel template: warming up, with a kernel of its own", file=sys.stderr, flush=True)  # (if it dies there)
    warm_up_error = warm_up(argv[3], json.loads(argv[4]), prepared)
    warm_up_seconds = time.monotonic() - warm_up_started
    prepared["random_states"] = random_states()
    prepared["pid_namespace"] = own_pid_namespace(argv[5] == "namespaced")
    prepared["seccomp"] = seccomp.compiled() if seccomp.supported() else None
    prepared["lifeline"], lifeline_error = lifeline_command(prepared["pid_namespace"] is not None, argv[3])
    # It holds the write end of each live kernel's report pipe.
    prepared["open_max"] = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (prepared["open_max"],) * 2)
    threads = len(os.listdir("/proc/self/task"))
    gc.collect()
    prepared["fillers"] = fill_free_space()  # last: what the template allocates after it makes holes again
    gc.freeze()  # what the template holds stays out of every kernel's collections: its pages stay shared
    huge_pages, huge_pages_error = collapse_anonymous_memory()  # fewer page-table entries for each fork to copy
    if LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda received, frame: None)
    signal.set_wakeup_fd(wake_write)
    control.send(json.dumps({"ready": True, "seconds": round(time.monotonic() - started, 3),
                             "modules": len(sys.modules), "preloaded": imported, "failed": failed,
                             "threads": threads, "random_states": len(prepared["random_states"]),
                             "packed": len(prepared["old_code"]) if learned is not None else None,
                             "lifeline_error": lifeline_error, "iopub_welcome": prepared["iopub_welcome"],
                             "warm_up": warm_up_error or round(warm_up_seconds, 3),
                             "huge_pages": huge_pages, "huge_pages_error": huge_pages_error}).encode())
    serve(control, wake_read, prepared)


if __name__ == "__main__":
    main(sys.argv)
