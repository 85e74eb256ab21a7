"""The kernel template (a "zygote"): a process of the kernel environment that has imported what a kernel needs
and forks kernels on request, so a new kernel costs a fork and an ipykernel set-up instead of a whole boot.

Run by the server (template.py) as `<kernel python> -s -E .../zygote.py FD PRELOAD TMPDIR KERNEL_CONFIG WAY`, as
root when the server is; WAY is `namespaced`, or `plain` where kernels get no namespaces. FD is its end of a
SOCK_SEQPACKET socket pair: each request is one message (the confine spec isolation.py builds, as JSON) with
two file descriptors, the write end of the kernel's report pipe and its log file. The template itself never
reads a request: it sees the socket readable, forks the kernel's keeper, and goes on once the keeper has
taken the message. So the template's memory is the same at every fork, and nothing of one session's request
is in the next kernel. Per kernel, two processes:

    template (root, host namespaces; makes a new pid namespace for each keeper, then enters its own again)
      keeper  PID 1 of the kernel's pid namespace (when namespaced): takes the request, sends its pid and a
              pidfd back, enters its other new namespaces (unshare), forks the kernel, drops to the kernel's
              uid and seccomp; then reaps orphans, passes SIGINT/SIGTERM on, and writes the kernel's exit
              status on the report pipe. When the server's end of that pipe closes (the server died, or gave
              the kernel up) it kills everything and exits. It does as little as it can before the fork:
              every page it writes is a page that later becomes its own (2 MB a keeper).
        kernel  joins the cgroups, shapes the mounts (confine.py's functions, the same as a booted kernel),
                sets rlimits, drops to its uid, dies with the keeper, seccomp, closes every inherited descriptor, takes
                the session's environment, reseeds every random generator the template imported, and
                becomes a normal ipykernel, with the application and IPython shell the template made
                (pointed at its own session first) and the output hooks installed before it answers.

The template has no threads (BLAS libraries are held to one thread), no ZMQ context and no open session:
what it imports is found by a rehearsal, a throwaway child that sets up a whole kernel and lists the
modules it loaded. Then it makes what of a kernel needs no socket: ipykernel's application, configured,
and IPython's shell (`prepare_kernel`). It never runs a cell. Standard library only, besides what it
preloads.
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


LIBC = ctypes.CDLL(None, use_errno=True)
for _name in ("prctl", "unshare", "setns"):  # looked up here, once, not in every keeper and kernel
    getattr(LIBC, _name)


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


def serve(control: socket.socket, wake: int, prepared: dict) -> None:
    poller = select.poll()
    poller.register(control, select.POLLIN)
    poller.register(wake, select.POLLIN)
    while True:
        for fd, event in poller.poll():
            if fd == wake:
                drain(wake)
                reap_all()
            elif event & select.POLLIN:
                fork_keeper(control, prepared)
            else:  # the server's end closed: it is gone
                os._exit(0)


def fork_keeper(control: socket.socket, prepared: dict) -> None:
    """Fork the process that takes the next request and keeps its kernel, as PID 1 of a new pid namespace
    where the template may make one: unshare(CLONE_NEWPID) puts only the children made after it there, and
    entering its own again (setns) leaves the next keeper a namespace of its own."""
    taken_read, taken_write = os.pipe()
    own = prepared["pid_namespace"]
    in_new_namespace = own is not None and LIBC.unshare(CLONE_NEWPID) == 0
    try:
        pid = os.fork()
        if pid == 0:
            os.close(taken_read)
            keeper(control, taken_write, prepared)
    finally:  # (the template's own: a keeper never returns)
        if in_new_namespace and LIBC.setns(own, CLONE_NEWPID) != 0:
            print("kernel template: cannot enter its own pid namespace again; exiting", file=sys.stderr, flush=True)
            os._exit(1)
    os.close(taken_write)
    taken = os.read(taken_read, 1)
    os.close(taken_read)
    if not taken:  # the keeper died before taking the request: something is badly wrong here
        print("kernel template: a keeper died before taking its request; exiting", file=sys.stderr, flush=True)
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


# -- the keeper: init of the kernel's namespaces, its link to the server -----------------------------------


def take_request(control: socket.socket, taken: int, prepared: dict) -> tuple[dict, int, int]:
    """The next request (spec, report pipe, log), in the keeper's new namespaces; the server hears the keeper's
    pid (as the server sees it) and a pidfd, or why not."""
    request_id = None
    try:
        if prepared["pid_namespace"] is not None:
            os.close(prepared["pid_namespace"])
        message, fds, flags, _address = socket.recv_fds(control, REQUEST_MAX, 2)
        os.write(taken, b".")
        os.close(taken)
        request = json.loads(message)
        request_id = request["id"]
        if flags & socket.MSG_TRUNC or len(fds) != 2:
            raise ValueError("malformed request")
        report, log = fds
        spec = request["spec"]
        # /proc is still the host's here: its `self` is this process's pid as the server sees it.
        pid = int(os.readlink("/proc/self"))
        if spec["namespaced"]:
            if os.getpid() != 1:
                raise OSError("the template could not make a pid namespace")
            namespaces = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
            if not request["network"]:
                namespaces |= CLONE_NEWNET
            if LIBC.unshare(namespaces) != 0:
                number = ctypes.get_errno()
                raise OSError(number, f"unshare: {os.strerror(number)}")
        pidfd = os.pidfd_open(os.getpid())
        socket.send_fds(control, [json.dumps({"id": request_id, "pid": pid}).encode()], [pidfd])
        os.close(pidfd)
        return spec, report, log
    except BaseException as error:  # (every failure is the server's to hear about)
        with_id = {"id": request_id, "error": f"{type(error).__name__}: {error}"}
        try:
            control.send(json.dumps(with_id).encode())
        finally:
            os._exit(1)


def keeper(control: socket.socket, taken: int, prepared: dict) -> None:
    spec, report, log = take_request(control, taken, prepared)
    try:
        os.close(control.detach())
        LIBC.prctl(PR_SET_NAME, b"codeact-keeper", 0, 0, 0)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        kernel = os.fork()
        if kernel == 0:
            become_kernel(spec, report, prepared)
        if spec["uid"] is not None:
            confine.drop_privileges(spec["uid"])
        if spec["seccomp"]:
            seccomp.install(prepared["seccomp"])
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


def become_kernel(spec: dict, report: int, prepared: dict) -> None:
    try:
        os.close(report)
        confine.join_cgroups(spec["cgroups"])
        if spec["namespaced"]:
            # What `unshare --mount-proc` does: our mounts stop propagating to the host, then a /proc of the
            # new pid namespace.
            confine.mount("none", "/", None, MS_PRIVATE | confine.MS_REC)
            confine.mount("proc", "/proc", "proc", confine.MS_NOSUID | confine.MS_NODEV | confine.MS_NOEXEC)
            confine.shape_mounts(spec["writable"], spec["private"], spec["closed"], spec["readable"])
        os.chdir(spec["workdir"])
        confine.set_rlimits(inherited_address_space(spec["rlimits"]))
        parent = os.getppid()
        if spec["uid"] is not None:
            confine.drop_privileges(spec["uid"])
        # After the uid change, which clears it: die with the keeper, never orphaned.
        LIBC.prctl(confine.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
        # The uid change also made it undumpable, unlike a booted kernel (exec resets that): its own /proc files
        # (environ, maps) would be root's. Its memory is its own session's to read, as a booted kernel's is.
        LIBC.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
        if spec["seccomp"]:
            seccomp.install(prepared["seccomp"])
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
        reseed(prepared["random_states"])
        LIBC.prctl(PR_SET_NAME, b"codeact-kernel", 0, 0, 0)  # what ps and top show
        run_kernel(spec["connection_file"], spec["hook_limits"], prepared)
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
    from ipykernel.compiler import XCachingCompiler
    from ipykernel.kernelapp import IPKernelApp
    from ipykernel.zmqshell import ZMQInteractiveShell
    from IPython.core.application import BaseIPythonApplication
    from traitlets.config import Config

    app = IPKernelApp.instance(config=Config(config))
    # The configuration is given as it is: traitlets' command-line parser walks every configurable class to
    # build itself (3.4 MB of touched pages in each kernel that ran it).
    app.parse_command_line = lambda argv=None: None
    BaseIPythonApplication.initialize(app, [])  # what IPKernelApp.initialize starts with: config files, profile
    # As IPythonKernel.__init__ makes it, less the kernel, which each kernel sets.
    ZMQInteractiveShell.instance(parent=app, profile_dir=app.profile_dir, user_module=None, user_ns=None,
                                 kernel=None, compiler_class=XCachingCompiler)
    with open(os.path.join(HERE, "kernel_hooks.py")) as handle:
        hooks = compile(handle.read(), "<codeact kernel setup>", "exec")
    # What IPython records at the end of its start-up (the modules `%reset -f` keeps): made here, because a
    # set of 1,100 module names made in the kernel touches every name's page (2 MB).
    return {"hooks": hooks, "module_names": frozenset(sys.modules)}


def run_kernel(connection_file: str, hook_limits: dict[str, int], prepared: dict) -> None:
    """Set up and run an ipykernel as `python -m ipykernel_launcher -f CONNECTION_FILE` would, with the
    template's application and shell (`prepare_kernel`), each pointed at this session: its IPython profile
    and directory, environment, history session and kernel. Two steps are left out that copy much of the
    template's memory into the kernel for nothing: ipykernel's list of loaded modules' files, which only its
    debugger reads (every module object and file name touched: 4 MB), and IPython's set of module names,
    made in the template instead. Then the output and message caps (kernel_hooks.py), which a booted kernel
    gets from a first execute. The kernel is otherwise ipykernel's own, unchanged."""
    from ipykernel.kernelapp import IPKernelApp
    from ipykernel.zmqshell import ZMQInteractiveShell
    from IPython.core.application import BaseIPythonApplication
    from IPython.core.profiledir import ProfileDir
    from IPython.paths import get_ipython_dir
    from IPython.utils.path import get_home_dir

    sys.argv = [os.path.join(os.path.dirname(os.path.dirname(sys.modules["ipykernel"].__file__)),
                             "ipykernel_launcher.py"), "-f", connection_file]
    app = IPKernelApp.instance()
    shell = ZMQInteractiveShell.instance()
    app.connection_file = connection_file

    def adopt_session(self: IPKernelApp, argv: list | None = None) -> None:
        """In place of BaseIPythonApplication.initialize, done in the template: this session's IPython directory
        and profile (under its runtime directory), and what the shell took from the template's surroundings."""
        self.ipython_dir = shell.ipython_dir = get_ipython_dir()
        self.profile_dir = shell.profile_dir = ProfileDir.create_profile_dir_by_name(self.ipython_dir, "default",
                                                                                     self.config)
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
    if all(hasattr(app, name) for name in ("_run_startup_files", "_run_exec_lines", "_run_exec_files",
                                           "_run_cmd_line_code", "_run_module")):
        app.init_code = init_code
    initialize = BaseIPythonApplication.initialize
    BaseIPythonApplication.initialize = adopt_session  # what IPKernelApp.initialize calls first, via super()
    try:
        app.initialize([])
    finally:
        BaseIPythonApplication.initialize = initialize
        for name in ("init_kernel", "init_code", "parse_command_line"):
            app.__dict__.pop(name, None)
    namespace = shell.user_ns
    exec(prepared["hooks"], namespace)
    namespace.pop("install_output_cap")(hook_limits["output_cap"])
    namespace.pop("install_message_cap")(hook_limits["message_cap"])
    app.start()


def own_pid_namespace(namespaced: bool) -> int | None:
    """A descriptor of the template's pid namespace, to enter again after making one for a keeper; None where
    kernels are not namespaced (not root, or --no-isolate): keepers are then plain children."""
    return os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC) if namespaced else None


def main(argv: list[str]) -> None:
    control = socket.socket(fileno=int(argv[1]))
    LIBC.prctl(PR_SET_NAME, b"codeact-zygote", 0, 0, 0)
    started = time.monotonic()
    imported, failed = preload([name for name in argv[2].split(",") if name], argv[3])
    prepared = prepare_kernel(json.loads(argv[4]))
    prepared["random_states"] = random_states()
    prepared["pid_namespace"] = own_pid_namespace(argv[5] == "namespaced")
    prepared["seccomp"] = seccomp.compiled() if seccomp.supported() else None
    threads = len(os.listdir("/proc/self/task"))
    gc.collect()
    gc.freeze()  # what the template holds stays out of every kernel's collections: its pages stay shared
    if LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda received, frame: None)
    signal.set_wakeup_fd(wake_write)
    control.send(json.dumps({"ready": True, "seconds": round(time.monotonic() - started, 3),
                             "modules": len(sys.modules), "preloaded": imported, "failed": failed,
                             "threads": threads, "random_states": len(prepared["random_states"])}).encode())
    serve(control, wake_read, prepared)


if __name__ == "__main__":
    main(sys.argv)
