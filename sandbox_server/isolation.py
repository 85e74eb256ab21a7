"""How kernels are confined: probe what this OS allows once, then build each kernel's launch.

Each piece degrades on its own, and the start-up report says which ones apply:
- namespaces (`unshare`, root on Linux): no network, own pid space (the server's pid does not exist
  there, so a kernel cannot signal it), own /proc; the kernel talks over the IPC transport.
- a mount namespace: the host read-only, a private /tmp and /dev/shm, only the session's directories
  writable; an interpreter under a 0700 directory (pyenv under /root) is made reachable there rather
  than by loosening the host's permissions; ipc and uts namespaces too.
- an unprivileged uid per kernel when the server is root, unique on the host (uids.py), so sessions
  cannot read each other's files or share a process limit.
- a tiny init as PID 1 of the pid namespace, reaping orphans.
- no_new_privs and a seccomp filter (seccomp.py).
- rlimits: address space, file size, open files; process count when the kernel is not root.
- cgroups (v1 or v2, where a hierarchy is writable): memory and pids limits, and a CPU quota where the cpu
  controller is writable too, so a session's processes together cannot take more than their share.
- a scrubbed environment: the server's secrets never reach a kernel; PATH leads to the kernel environment
  (kernel_env.py), never to the host's interpreters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace

from . import seccomp
from .kernel_env import KernelEnvironment
from .packages import PREFIX

log = logging.getLogger("sandbox_server.isolation")

# Variables a kernel inherits from the server; everything else (tokens, keys) stays out.
CONFINE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "confine.py")
KEPT_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM", "PYTHONHASHSEED")
# After the kernel environment's bin directory: the system's, not the server's PATH (which may lead to pyenv
# shims or another Python's pip).
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
CGROUP_ROOT = "/sys/fs/cgroup"
# The kernel's configuration beyond ipykernel's defaults (a booted kernel gets it on its command line, a forked
# one as a traitlets Config): IPython's history lives in memory, never in a file of the session's.
KERNEL_CONFIG = {"HistoryManager": {"hist_file": ":memory:"}}


@dataclass(frozen=True)
class Capabilities:
    """What this machine lets the server apply, found once at start-up."""

    namespaces: bool = False
    drop_uid: bool = False
    cgroup: str | None = None  # "v1", "v2" or None
    cgroup_cpu: bool = False  # the cpu controller is usable too
    rlimit_nproc: bool = False
    seccomp: bool = False
    notes: tuple[str, ...] = ()

    def report(self, cpu_limit: float = 0.0) -> str:
        applied = ["working directory", "scrubbed environment", "rlimits (address space, file size)"]
        if self.namespaces:
            applied.append("network+pid+mount+ipc namespaces (read-only host, private /tmp and /dev/shm, init)")
        if self.drop_uid:
            applied.append("unprivileged uid per kernel")
        if self.rlimit_nproc:
            applied.append("process rlimit")
        if self.seccomp:
            applied.append("no_new_privs + seccomp filter")
        if self.cgroup:
            quota = f"+cpu (--cpu-limit {cpu_limit:g})" if self.cgroup_cpu and cpu_limit else ""
            applied.append(f"cgroup {self.cgroup} memory+pids{quota}")
        text = "isolation: " + ", ".join(applied)
        if self.notes:
            text += "; not applied: " + "; ".join(self.notes)
        return text


def closed_ancestors(paths: list[str]) -> dict[str, list[str]]:
    """For each directory that others cannot traverse on the way to `paths`, the children needed.

    Inside the kernel's mount namespace each such directory is covered by an empty tmpfs and only the
    needed children are put back (bound from the host, or covered again when closed too), so the kernel
    reaches its interpreter and its home and nothing else of, say, /root.
    """
    closed: dict[str, list[str]] = {}
    for path in paths:
        parts = path.split(os.sep)
        for depth in range(2, len(parts)):  # ancestors only: the path itself must just be readable
            ancestor = os.sep.join(parts[:depth])
            try:
                mode = os.stat(ancestor).st_mode
            except OSError:
                break
            if not mode & 0o001:
                child = os.sep.join(parts[: depth + 1])
                children = closed.setdefault(ancestor, [])
                if child not in children:
                    children.append(child)
    return dict(sorted(closed.items(), key=lambda item: item[0].count(os.sep)))


def scrubbed_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The server's harmless variables and the kernel's own. MPLBACKEND is left unset: ipykernel then picks
    matplotlib's inline backend, which turns plt.show() and a figure as a cell's value into PNGs."""
    env = {name: os.environ[name] for name in KEPT_ENV if name in os.environ}
    env.update({"PYTHONUNBUFFERED": "1", "JPY_SESSION_NAME": "codeact"})
    env.update(extra or {})
    return env


@dataclass
class KernelLaunch:
    """Everything needed to start one confined kernel: `argv` is what the server runs to boot it, `spec` what
    confine.py (booted) or the kernel template (forked, template.py) applies."""

    argv: list[str]
    workdir: str
    uid: int | None
    spec: dict = field(default_factory=dict)
    cgroups: list[str] = field(default_factory=list)
    namespaced: bool = False  # the kernel has its own namespaces (booted: under `unshare`, as its child)
    network: bool = False
    dies_with_server: bool = False  # the launch itself arranges to die with the server


class Isolation:
    """Builds kernel launches for one server; owns the server's cgroup directories."""

    def __init__(self, capabilities: Capabilities, environment: KernelEnvironment, memory_limit: int,
                 file_size_limit: int, process_limit: int, cpu_limit: float = 0.0) -> None:
        self.capabilities = capabilities
        self.environment = environment
        self.memory_limit = memory_limit
        self.file_size_limit = file_size_limit
        self.process_limit = process_limit
        self.cpu_limit = cpu_limit if capabilities.cgroup_cpu else 0.0
        self.cgroup_parents: list[str] = []
        self._closed: dict[str, list[str]] | None = None
        self.interpreter_paths = list(environment.paths)
        self.setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
        if capabilities.cgroup:
            remove_stale_cgroups(capabilities.cgroup)
            self.cgroup_parents = make_cgroup_parents(capabilities.cgroup, f"codeact-{os.getpid()}",
                                                      cpu=self.cpu_limit > 0)

    def launch(self, kernel_name: str, workdir: str, home_dir: str, connection_file: str, uid: int | None,
               network: bool, env: dict[str, str] | None = None, readable: tuple[str, ...] = ()) -> KernelLaunch:
        """`home_dir` is the kernel's HOME (dotfiles, caches, the session's installed packages under .local);
        `env` adds to its environment; `readable` are directories of the server's it must read."""
        caps = self.capabilities
        uid = uid if caps.drop_uid else None
        cgroups = self.make_kernel_cgroups(kernel_name)
        runtime_dir = os.path.dirname(connection_file)
        spec = {
            "workdir": workdir,
            "uid": uid,
            "namespaced": caps.namespaces,
            "own_network": caps.namespaces and not network,  # a network namespace of its own, loopback only
            # What the kernel may write: its directory, its home and its runtime directory (sockets, IPython
            # profile), and its own /tmp and /dev/shm, each at most the memory it may use (tmpfs pages are
            # charged to its memory cgroup too). The rest of the host is read-only to it.
            "writable": sorted({workdir, home_dir, runtime_dir}),
            "private": {"/tmp": self.memory_limit, "/dev/shm": self.memory_limit},
            "readable": [*self.interpreter_paths, *readable],
            "seccomp": caps.seccomp,
            "rlimits": {
                "RLIMIT_AS": self.memory_limit,
                "RLIMIT_FSIZE": self.file_size_limit,
                "RLIMIT_NOFILE": 1024,
                **({"RLIMIT_NPROC": self.process_limit} if uid is not None else {}),
            },
            "cgroups": cgroups,
            "closed": self.closed_directories(workdir) if caps.namespaces and uid is not None else {},
            # IPython's profile and history live with the kernel's runtime files, not in the session's
            # directory, which holds only what the user's code makes.
            "env": scrubbed_environment({
                "IPYTHONDIR": os.path.join(runtime_dir, "ipython"),
                "HOME": home_dir,
                "PATH": ":".join([os.path.join(home_dir, PREFIX, "bin"), self.environment.bin_dir, *SYSTEM_PATH]),
                **(env or {}),
            }),
            "connection_file": connection_file,
        }
        spec["argv"] = [self.environment.python, "-m", "ipykernel_launcher", "-f", connection_file,
                        *(f"--{section}.{name}={value}" for section, values in KERNEL_CONFIG.items()
                          for name, value in values.items())]
        confine = [sys.executable, "-E", "-s", "-S", CONFINE_SCRIPT, json.dumps(spec)]
        if caps.namespaces:
            flags = ["--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--uts"]
            if not network:
                flags.insert(0, "--net")
            argv = ["unshare", *flags, "--", *confine]
        else:
            argv = confine
        if self.setpriv:
            # The launcher dies with the server (and `--kill-child` takes the kernel with it): no orphans
            # even when the server is killed outright.
            argv = [self.setpriv, "--pdeathsig", "KILL", "--", *argv]
        return KernelLaunch(argv=argv, workdir=workdir, uid=uid, spec=spec, cgroups=cgroups,
                            namespaced=caps.namespaces, network=network, dies_with_server=self.setpriv is not None)

    def closed_directories(self, workdir: str) -> dict[str, list[str]]:
        """What to open in the kernel's mount namespace: its interpreter and the server's root (two levels
        above every session directory, so computed once)."""
        if self._closed is None:
            self._closed = closed_ancestors([*self.interpreter_paths, os.path.dirname(os.path.dirname(workdir))])
        return self._closed

    def make_kernel_cgroups(self, kernel_name: str) -> list[str]:
        made = []
        for parent in self.cgroup_parents:
            path = os.path.join(parent, kernel_name)
            try:
                os.mkdir(path)
                write_cgroup_limits(path, self.memory_limit, self.process_limit, self.cpu_limit)
                made.append(path)
            except OSError as error:
                log.warning("cgroup %s not created: %s", path, error)
        if self.cpu_limit:
            for parent in self.cgroup_parents:
                weigh_kernels(parent)
        return made

    @staticmethod
    def remove_cgroups(paths: list[str]) -> None:
        for path in paths:
            try:
                os.rmdir(path)
            except OSError:
                pass  # still has a dying process; the parent's removal at shutdown retries

    def close(self) -> None:
        for parent in self.cgroup_parents:
            for name in os.listdir(parent) if os.path.isdir(parent) else []:
                child = os.path.join(parent, name)
                if os.path.isdir(child):
                    self.remove_cgroups([child])
            self.remove_cgroups([parent])


CPU_PERIOD_US = 100_000  # the CFS quota is enforced per period; the kernel's default


def write_cgroup_limits(path: str, memory: int, processes: int, cpu: float = 0.0) -> None:
    """Write the limits this cgroup directory has files for (a v1 directory holds one controller's)."""
    quota = int(cpu * CPU_PERIOD_US)
    limits = [
        ("memory.limit_in_bytes", memory),  # v1
        ("memory.max", memory),  # v2
        ("memory.swap.max", 0),  # v2: no swap escape
        ("pids.max", processes),
    ]
    if quota:
        limits += [("cpu.cfs_period_us", CPU_PERIOD_US), ("cpu.cfs_quota_us", quota),  # v1, in this order
                   ("cpu.max", f"{quota} {CPU_PERIOD_US}")]  # v2
    for filename, value in limits:
        target = os.path.join(path, filename)
        if os.path.exists(target):
            with open(target, "w") as handle:
                handle.write(str(value))


CPU_WEIGHTS = (("cpu.shares", 1024, 262144), ("cpu.weight", 100, 10000))  # v1, v2: (file, one process, most)


def weigh_kernels(parent: str) -> None:
    """Give the server's cgroup the CPU weight of as many processes as it holds kernels. Left at the default,
    all kernels together would weigh as much as one process beside the server's own: measured with 100
    sessions, throughput fell from about 275 to 190 executes/s. Counted when a kernel is added; a kernel gone
    since counts until the next one (each is held to its quota anyway)."""
    targets = [(os.path.join(parent, filename), one, most) for filename, one, most in CPU_WEIGHTS
               if os.path.exists(os.path.join(parent, filename))]
    if not targets:
        return  # a v1 memory or pids hierarchy: no weight to set
    with os.scandir(parent) as entries:  # the entries' types come with the listing: no stat per kernel
        kernels = sum(entry.is_dir(follow_symlinks=False) for entry in entries)
    for target, one, most in targets:
        with contextlib.suppress(OSError), open(target, "w") as handle:
            handle.write(str(min(most, one * max(kernels, 1))))


def make_cgroup_parents(version: str, name: str, cpu: bool = False) -> list[str]:
    parents = [os.path.join(root, name) for root in cgroup_roots(version, cpu)]
    made = []
    for parent in parents:
        try:
            os.makedirs(parent, exist_ok=True)
            if version == "v2":
                with open(os.path.join(parent, "cgroup.subtree_control"), "w") as handle:
                    handle.write("+memory +pids" + (" +cpu" if cpu else ""))
            made.append(parent)
        except OSError as error:
            log.warning("cgroup %s not usable: %s", parent, error)
    return made


def cgroup_roots(version: str, cpu: bool = True) -> list[str]:
    """Where our cgroups go: one hierarchy per controller (v1), or the unified one (v2)."""
    if version == "v1":
        controllers = ("memory", "pids", "cpu") if cpu else ("memory", "pids")
        return [os.path.join(CGROUP_ROOT, controller) for controller in controllers]
    return [CGROUP_ROOT]


def remove_stale_cgroups(version: str) -> None:
    """Remove the empty cgroups of servers that are gone: one killed outright (SIGKILL, OOM) could not."""
    for root in cgroup_roots(version):
        for name in os.listdir(root) if os.access(root, os.W_OK) else []:
            owner = name.removeprefix("codeact-")
            if owner == name or not owner.isdigit() or process_exists(int(owner)):
                continue
            parent = os.path.join(root, name)
            children = [os.path.join(parent, child) for child in os.listdir(parent)
                        if os.path.isdir(os.path.join(parent, child))]
            Isolation.remove_cgroups([*children, parent])  # a cgroup still holding a process stays


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True


def probe_cgroup_cpu(version: str) -> bool:
    """Whether kernels' cgroups can get a CPU quota too (optional: memory and pids are what protect the
    machine; the quota shares it fairly)."""
    if version == "v1":
        cpu = os.path.join(CGROUP_ROOT, "cpu")
        return os.access(cpu, os.W_OK) and os.path.exists(os.path.join(cpu, "cpu.cfs_quota_us"))
    with open(os.path.join(CGROUP_ROOT, "cgroup.controllers")) as handle:
        return "cpu" in handle.read().split()


def probe_cgroup() -> tuple[str | None, str | None]:
    """Which cgroup hierarchy this process can create limited groups in, or why none."""
    if not sys.platform.startswith("linux"):
        return None, "cgroups (not Linux)"
    v1 = cgroup_roots("v1", cpu=False)
    if all(os.access(p, os.W_OK) and os.path.exists(os.path.join(p, "cgroup.procs")) for p in v1):
        return "v1", None
    controllers = os.path.join(CGROUP_ROOT, "cgroup.controllers")
    if os.path.exists(controllers) and os.access(CGROUP_ROOT, os.W_OK):
        with open(controllers) as handle:
            available = handle.read().split()
        if {"memory", "pids"} <= set(available):
            return "v2", None
    return None, "cgroups (no writable memory+pids hierarchy)"


def probe(environment: KernelEnvironment, isolate: bool = True, uid_base: int = 200000,
          timeout: float = 20.0) -> Capabilities:
    """Find what applies here by trying it: the kernel environment's interpreter, confined, must import
    ipykernel."""
    if not isolate:
        return Capabilities(notes=("namespaces, uid drop, cgroups, seccomp (--no-isolate)",))
    notes = []
    linux = sys.platform.startswith("linux")
    root = linux and os.geteuid() == 0
    namespaces = root and shutil.which("unshare") is not None
    if not root:
        notes.append("namespaces and uid drop (need root on Linux)")
    elif not namespaces:
        notes.append("namespaces (no `unshare` on PATH: install util-linux)")
    cgroup, why = probe_cgroup() if root else (None, "cgroups (need root)")
    if why:
        notes.append(why)
    cgroup_cpu = cgroup is not None and probe_cgroup_cpu(cgroup)
    if cgroup and not cgroup_cpu:
        notes.append("CPU quota (no writable cpu cgroup controller)")
    filtering = linux and seccomp.supported()
    if linux and not filtering:
        notes.append(f"seccomp (no filter for the {os.uname().machine} architecture)")
    elif not linux:
        notes.append("seccomp (not Linux)")
    candidate = Capabilities(namespaces=namespaces, drop_uid=root, rlimit_nproc=root, seccomp=filtering)
    if filtering and not try_launch(candidate, environment, uid_base, timeout):
        candidate = replace(candidate, seccomp=False)
        if try_launch(candidate, environment, uid_base, timeout):
            notes.append("seccomp (the OS refused the filter)")
        else:
            candidate = replace(candidate, seccomp=filtering)
    if namespaces and not try_launch(candidate, environment, uid_base, timeout):
        notes.append("namespaces (a confined test kernel did not start)")
        candidate = replace(candidate, namespaces=False)
    if candidate.drop_uid and not try_launch(candidate, environment, uid_base, timeout):
        notes.append(f"uid drop (uid {uid_base} cannot run {environment.python}; kernels run as root)")
        candidate = replace(candidate, namespaces=False, drop_uid=False, rlimit_nproc=False)
    return replace(candidate, cgroup=cgroup, cgroup_cpu=cgroup_cpu, notes=tuple(notes))


def try_launch(capabilities: Capabilities, environment: KernelEnvironment, uid_base: int, timeout: float) -> bool:
    """Whether a kernel launched with these capabilities gets as far as importing ipykernel."""
    import tempfile

    from .uids import UidLeases

    leases = UidLeases(uid_base) if capabilities.drop_uid else None
    with tempfile.TemporaryDirectory(prefix="codeact-probe-") as container:
        uid = leases.claim(container) if leases else None
        try:
            workdir, runtime = os.path.join(container, "work"), os.path.join(container, "kernel")
            for path in (workdir, runtime):
                os.mkdir(path, 0o700)
                if uid is not None:
                    os.chown(path, uid, uid)
            isolation = Isolation(capabilities, environment, 2**31, 2**20, 64)
            launch = isolation.launch("probe", workdir, workdir, os.path.join(runtime, "unused"), uid, network=False)
            spec = json.loads(launch.argv[-1])
            spec["argv"] = [environment.python, "-c", "import ipykernel"]
            argv = [*launch.argv[:-1], json.dumps(spec)]
            try:
                return subprocess.run(argv, timeout=timeout, capture_output=True).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                return False
        finally:
            if leases:
                leases.release(uid)
                leases.close()
