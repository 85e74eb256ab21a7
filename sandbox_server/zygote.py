"""The kernel template (a "zygote"): a process of the kernel environment that has imported what a kernel needs
and forks kernels on request, so a new kernel costs a fork and an ipykernel set-up instead of a whole boot.

Run by the server (template.py) as `<kernel python> -s -E .../sandbox_server/zygote.py FD PRELOAD TMPDIR`, as
root when the server is. FD is its end of a SOCK_SEQPACKET socket pair: each request is one message (the
confine spec isolation.py builds, as JSON) with two file descriptors, the write end of the kernel's report
pipe and its log file. The template itself never reads a request: it sees the socket readable, forks a
helper, and goes on once the helper has taken the message. So the template's memory is the same at every
fork, and nothing of one session's request is in the next kernel. Per kernel, three processes:

    template (root, host namespaces; a child subreaper, so the keepers below become its children)
      helper  takes the request, enters new namespaces (unshare), forks the keeper, sends its pid and
              a pidfd back, exits
        keeper  PID 1 of the kernel's pid namespace (when namespaced): joins the cgroups, shapes the mounts
                (confine.py's functions, the same as a booted kernel), sets rlimits, forks the kernel, drops
                to the kernel's uid and seccomp; then reaps orphans, passes SIGINT/SIGTERM on, and writes
                the kernel's exit status on the report pipe. When the server's end of that pipe closes
                (the server died, or gave the kernel up) it kills everything and exits.
          kernel  drops to its uid, dies with the keeper, seccomp, closes every inherited descriptor, takes
                  the session's environment, reseeds every random generator the template imported, and
                  becomes a normal ipykernel.

The template has no threads (BLAS libraries are held to one thread), no ZMQ context and no open session:
what it imports is found by a rehearsal, a throwaway child that sets up a whole kernel and lists the
modules it loaded. Standard library only, besides what it preloads.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback

import confine  # this script's directory is sys.path[0]; both are standard library only
import seccomp

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x4000000, 0x8000000, 0x20000000, \
    0x40000000
MS_PRIVATE = 1 << 18
PR_SET_CHILD_SUBREAPER, PR_SET_DUMPABLE, PR_SET_NAME = 36, 4, 15
REQUEST_MAX = 1 << 20  # bytes of one request: a spec is a few KB
HERE = os.path.dirname(os.path.abspath(__file__))


def libc():
    return ctypes.CDLL(None, use_errno=True)


# -- the template ----------------------------------------------------------------------------------------


def rehearse(tmpdir: str) -> list[str]:
    """The modules a kernel loads once set up, found by setting one up in a throwaway child."""
    directory = tempfile.mkdtemp(prefix="rehearsal-", dir=tmpdir)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            null = os.open(os.devnull, os.O_RDWR)
            for target in (0, 1, 2):
                os.dup2(null, target)
            os.environ["IPYTHONDIR"] = os.path.join(directory, "ipython")
            connection = os.path.join(directory, "connection.json")
            with open(connection, "w") as handle:
                json.dump({"transport": "ipc", "ip": os.path.join(directory, "k"), "shell_port": 1, "iopub_port": 2,
                           "stdin_port": 3, "control_port": 4, "hb_port": 5, "key": os.urandom(16).hex(),
                           "signature_scheme": "hmac-sha256", "kernel_name": "python3"}, handle)
            from ipykernel.kernelapp import IPKernelApp

            IPKernelApp.instance().initialize(["-f", connection, "--HistoryManager.hist_file=:memory:"])
            os.write(write, "\n".join(sys.modules).encode())
        finally:
            os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 1 << 16):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    shutil.rmtree(directory, ignore_errors=True)
    return data.decode().split("\n") if data else []


def preload(modules: list[str], tmpdir: str) -> tuple[list[str], list[str]]:
    """Import what a kernel needs, then the operator's modules; (imported, failed) of the latter."""
    import ipykernel.kernelapp  # noqa: F401  (what the rehearsal itself needs)

    for name in rehearse(tmpdir):
        if name and name not in sys.modules:
            try:
                importlib.import_module(name)
            except Exception:  # (a vendored module only importable from its parent's path)
                pass
    imported, failed = [], []
    for name in modules:
        try:
            importlib.import_module(name)
            imported.append(name)
        except Exception as error:  # (reported; the template goes on without it)
            failed.append(f"{name} ({type(error).__name__}: {error})")
    return imported, failed


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


def serve(control: socket.socket, wake: int, states: list[object]) -> None:
    poller = select.poll()
    poller.register(control, select.POLLIN)
    poller.register(wake, select.POLLIN)
    while True:
        for fd, event in poller.poll():
            if fd == wake:
                drain(wake)
                reap_all()
            elif event & select.POLLIN:
                fork_helper(control, states)
            else:  # the server's end closed: it is gone
                os._exit(0)


def fork_helper(control: socket.socket, states: list[object]) -> None:
    taken_read, taken_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(taken_read)
        helper(control, taken_write, states)
    os.close(taken_write)
    taken = os.read(taken_read, 1)
    os.close(taken_read)
    if not taken:  # the helper died before taking the request: something is badly wrong here
        print("kernel template: a helper died before taking its request; exiting", file=sys.stderr, flush=True)
        os._exit(1)


def reap_all() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


# -- the helper: one request -----------------------------------------------------------------------------


def helper(control: socket.socket, taken: int, states: list[object]) -> None:
    request_id = None
    try:
        message, fds, flags, _address = socket.recv_fds(control, REQUEST_MAX, 2)
        os.write(taken, b".")
        os.close(taken)
        request = json.loads(message)
        request_id = request["id"]
        if flags & socket.MSG_TRUNC or len(fds) != 2:
            raise ValueError("malformed request")
        report, log = fds
        spec = request["spec"]
        if spec["namespaced"]:
            namespaces = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
            if not request["network"]:
                namespaces |= CLONE_NEWNET
            if libc().unshare(namespaces) != 0:
                number = ctypes.get_errno()
                raise OSError(number, f"unshare: {os.strerror(number)}")
        pid = os.fork()
        if pid == 0:
            keeper(control, spec, report, log, states)
        pidfd = os.pidfd_open(pid)
        socket.send_fds(control, [json.dumps({"id": request_id, "pid": pid}).encode()], [pidfd])
    except BaseException as error:  # (every failure is the server's to hear about)
        with_id = {"id": request_id, "error": f"{type(error).__name__}: {error}"}
        try:
            control.send(json.dumps(with_id).encode())
        finally:
            os._exit(1)
    os._exit(0)


# -- the keeper: init of the kernel's namespaces, its link to the server -----------------------------------


def keeper(control: socket.socket, spec: dict, report: int, log: int, states: list[object]) -> None:
    try:
        os.close(control.detach())
        libc().prctl(PR_SET_NAME, b"codeact-keeper", 0, 0, 0)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        confine.join_cgroups(spec["cgroups"])
        if spec["namespaced"]:
            # What `unshare --mount-proc` does: our mounts stop propagating to the host, then a /proc of the
            # new pid namespace.
            confine.mount("none", "/", None, MS_PRIVATE | confine.MS_REC)
            confine.mount("proc", "/proc", "proc", confine.MS_NOSUID | confine.MS_NODEV | confine.MS_NOEXEC)
            confine.shape_mounts(spec["writable"], spec["private"], spec["closed"], spec["readable"])
        os.chdir(spec["workdir"])
        confine.set_rlimits(inherited_address_space(spec["rlimits"]))
        kernel = os.fork()
        if kernel == 0:
            become_kernel(spec, report, states)
        if spec["uid"] is not None:
            confine.drop_privileges(spec["uid"])
        if spec["seccomp"]:
            seccomp.install()
        watch(kernel, report)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    os._exit(1)


def inherited_address_space(rlimits: dict[str, int]) -> dict[str, int]:
    """The address-space limit counts on top of what the kernel inherits: the template's mappings (hundreds of
    MB of virtual size with the data stack, shared and mostly never touched) are not memory it asks for. The
    cgroup's memory limit, where there is one, counts what it really uses."""
    with open("/proc/self/status") as handle:
        size = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmSize:"))
    return {**rlimits, "RLIMIT_AS": rlimits["RLIMIT_AS"] + size} if "RLIMIT_AS" in rlimits else rlimits


def watch(kernel: int, report: int) -> None:
    """Until the kernel exits (its status goes on the report pipe) or the server's end of it closes."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda received, frame: os.kill(kernel, received))
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda received, frame: None)  # a Python handler, so the wakeup fd hears it
    signal.set_wakeup_fd(wake_write)
    poller = select.poll()
    poller.register(wake_read, select.POLLIN)
    poller.register(report, 0)  # POLLERR: no one reads the other end any more
    while True:
        for fd, _event in poller.poll():
            if fd == report:
                os.killpg(0, signal.SIGKILL)  # the kernel and all it started (in a pid namespace, exiting would)
        drain(wake_read)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                os._exit(1)
            if pid == 0:
                break
            if pid == kernel:
                code = os.waitstatus_to_exitcode(status)  # negative: killed by that signal
                try:
                    os.write(report, f"{code}\n".encode())
                except OSError:
                    pass
                os._exit(code if code >= 0 else 128 - code)


# -- the kernel --------------------------------------------------------------------------------------------


def become_kernel(spec: dict, report: int, states: list[object]) -> None:
    try:
        os.close(report)
        parent = os.getppid()
        if spec["uid"] is not None:
            confine.drop_privileges(spec["uid"])
        # After the uid change, which clears it: die with the keeper, never orphaned.
        libc().prctl(confine.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
        # The uid change also made it undumpable, unlike a booted kernel (exec resets that): its own /proc files
        # (environ, maps) would be root's. Its memory is its own session's to read, as a booted kernel's is.
        libc().prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
        if spec["seccomp"]:
            seccomp.install()
        signal.set_wakeup_fd(-1)
        for number, handler in ((signal.SIGCHLD, signal.SIG_DFL), (signal.SIGTERM, signal.SIG_DFL),
                                (signal.SIGINT, signal.default_int_handler)):
            signal.signal(number, handler)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # nothing of the template's or another kernel's
        env = dict(spec["env"])
        if spec["uid"] is not None:
            env["USER"] = "codeact"
        os.environ.clear()
        os.environ.update(env)
        # The path a booted `python -m ipykernel_launcher` has: PYTHONPATH (the pip hook and the session's
        # packages), then the environment's own; not this script's directory. IPython adds '' as it does there.
        extra = [entry for entry in env.get("PYTHONPATH", "").split(":") if entry]
        sys.path[:] = [*extra, *(entry for entry in sys.path if entry != HERE)]
        for name in ("confine", "seccomp"):  # the template's own, not the kernel's
            sys.modules.pop(name, None)
        reseed(states)
        libc().prctl(PR_SET_NAME, b"codeact-kernel", 0, 0, 0)  # what ps and top show
        run_kernel(spec["connection_file"], spec["kernel_config"])
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


def run_kernel(connection_file: str, config: dict) -> None:
    """Set up and run an ipykernel as `python -m ipykernel_launcher -f CONNECTION_FILE` would, with two steps
    left out that copy much of the template's memory into the kernel for nothing: parsing a command line (we
    give the configuration as it is: traitlets walks every configurable class to build the parser, 3.4 MB of
    touched pages), and ipykernel's list of loaded modules' files, which only its debugger reads (every
    module object and file name touched: 4 MB). The kernel is otherwise ipykernel's own, unchanged."""
    from ipykernel.kernelapp import IPKernelApp
    from traitlets.config import Config

    sys.argv = [os.path.join(os.path.dirname(os.path.dirname(sys.modules["ipykernel"].__file__)),
                             "ipykernel_launcher.py"), "-f", connection_file]
    app = IPKernelApp.instance(config=Config(config), connection_file=connection_file)
    app.parse_command_line = lambda argv=None: None
    init_kernel = app.init_kernel

    def init_kernel_without_module_list() -> None:
        modules = sys.modules
        sys.modules = {}  # what IPythonKernel.__init__ lists; the import system keeps the real one
        try:
            init_kernel()
        finally:
            sys.modules = modules

    app.init_kernel = init_kernel_without_module_list
    app.initialize([])
    app.start()


def main(argv: list[str]) -> None:
    control = socket.socket(fileno=int(argv[1]))
    libc().prctl(PR_SET_NAME, b"codeact-zygote", 0, 0, 0)
    started = time.monotonic()
    imported, failed = preload([name for name in argv[2].split(",") if name], argv[3])
    states = random_states()
    threads = len(os.listdir("/proc/self/task"))
    gc.collect()
    gc.freeze()  # what the template holds stays out of every kernel's collections: its pages stay shared
    if libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda received, frame: None)
    signal.set_wakeup_fd(wake_write)
    control.send(json.dumps({"ready": True, "seconds": round(time.monotonic() - started, 3),
                             "modules": len(sys.modules), "preloaded": imported, "failed": failed,
                             "threads": threads, "random_states": len(states)}).encode())
    serve(control, wake_read, states)


if __name__ == "__main__":
    main(sys.argv)
