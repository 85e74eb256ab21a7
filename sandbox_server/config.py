"""The sandbox server's configuration: one frozen value built once and passed down."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace

# Environment variables for the secrets (the only settings read from the environment): safer there than on a
# command line that `ps` shows.
TOKEN_ENV = "CODEACT_SANDBOX_TOKEN"
EXECUTE_TOKEN_ENV = "CODEACT_SANDBOX_EXECUTE_TOKEN"
URL_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,}")  # a token that goes in a URL path as it is

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class Config:
    """Every knob of the sandbox server, with its default. Seconds are floats, sizes are bytes."""

    host: str = "127.0.0.1"
    port: int = 8081
    token: str | None = None
    # For clients that cannot send headers (the original CodeAct chat-ui fork): POST /t/<execute_token>/execute
    # is the original /execute route, and that token opens nothing else.
    execute_token: str | None = None
    port_file: str | None = None  # written with the bound port once listening (for --port 0)

    # Where kernels run: "local" (confined processes here) or "gateway" (Kernel / Enterprise Gateway).
    backend: str = "local"
    gateway_url: str | None = None
    gateway_token: str | None = None
    gateway_kernel: str = "python3"
    gateway_username: str = "codeact"  # KERNEL_USERNAME: who the gateway starts kernels for (its quotas, its ACLs)
    gateway_session_users: bool = False  # whether a session may name its own user (pool kernels are the server's)
    gateway_env: str | None = None  # more KERNEL_* values for every kernel, as a JSON object
    gateway_poll_interval: float = 1.0  # how often to ask which kernels the gateway still has (culling)

    # Kernels and sessions.
    pool_size: int = 4  # warm kernels kept ready; creating a session never waits for a boot
    spare_homes: int = 100  # sessions' directories made ahead (local backend): a burst starts its kernels at once
    # "fork": kernels are forked from a template process that has imported what a kernel needs (template.py),
    # booting only while it is unavailable; "boot": every kernel is a new interpreter. Local backend only.
    kernel_start: str = "fork"
    kernel_preload: str = "numpy,pandas,matplotlib"  # what the template imports besides ipykernel's own
    max_sessions: int = 200  # past this, creating a session answers 429 with Retry-After
    idle_timeout: float = 600.0  # sessions idle this long are reaped (the original's 10 minutes)
    max_lifetime: float | None = None  # optional cap on a session's age
    kernel_start_timeout: float = 30.0
    execute_timeout: float = 60.0  # per execute, as the original
    interrupt_grace: float = 1.0  # after a timeout's interrupt, how long the kernel has to go idle
    setup_timeout: float = 30.0  # for a session's setup code (tool definitions)

    # Output: capped while it streams, head and tail kept.
    max_output: int = 4 * 1024 * 1024  # characters of stdout+stderr text per execute
    max_results: int = 32 * 1024 * 1024  # bytes of MIME bundles (images) per execute
    # Hard bound on one kernel message (kernels cut theirs to fit; zmq drops a larger one). Decoding costs the
    # event loop up to ~11 ns a byte (JSON escapes), so this also bounds how long one message can hold it.
    max_message: int = 8 * 1024 * 1024

    # Requests and files.
    max_body: int = 1024 * 1024  # JSON request bodies
    max_file: int = 100 * 1024 * 1024  # one uploaded file
    compat_timeout: float = 60.0  # the original /execute route's fixed timeout

    # Isolation (applied where the OS allows; see isolation.py).
    root_dir: str | None = None  # where session directories live; a private temp dir by default
    memory_limit: int = 2 * 1024 * 1024 * 1024  # address space per kernel (rlimit) and cgroup memory
    file_size_limit: int = 1024 * 1024 * 1024  # largest file a kernel may write
    process_limit: int = 128  # processes and threads per kernel (cgroup pids; rlimit when not root)
    cpu_limit: float = 1.0  # CPU cores per kernel, summed over its processes (cgroup CPU quota); 0: no limit
    isolate: bool = True  # namespaces, uid drop, cgroups; False runs kernels as plain subprocesses
    kernel_uid_base: int = 200000  # each kernel gets its own uid from here when the server is root

    # The kernel environment (kernel_env.py) and package installs in sessions (packages.py).
    kernel_python: str | None = None  # the interpreter kernels run; default: the server's own
    package_installs: bool = True  # `pip install` in a session fetches from the host's configured index
    package_allowlist: str | None = None  # comma-separated project names: only these may be installed
    install_timeout: float = 120.0  # seconds one install request may take (resolve and download)

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")

    def check(self) -> None:
        """Refuse settings that cannot work, with the option to change."""
        if not self.token and not self.is_loopback:
            raise ValueError(
                f"refusing to serve {self.host} without a token: pass --token or set {TOKEN_ENV}, "
                "or bind 127.0.0.1"
            )
        if self.execute_token is not None:
            if not URL_TOKEN.fullmatch(self.execute_token):
                raise ValueError("--execute-token must be at least 16 characters of A-Z, a-z, 0-9, _ and - (it goes "
                                 "in a URL path)")
            if self.execute_token == self.token:
                raise ValueError("--execute-token must differ from --token: a URL is logged and shared more "
                                 "easily than a header, so it opens only /execute")
        if self.backend not in ("local", "gateway"):
            raise ValueError("--backend must be local or gateway")
        if self.gateway_session_users and self.backend != "gateway":
            raise ValueError("--gateway-session-users needs --backend gateway")
        if self.backend == "gateway" and not self.gateway_url:
            raise ValueError("--backend gateway needs --gateway-url")
        if self.gateway_env is not None:
            check_gateway_env(self.gateway_env)
        if self.kernel_start not in ("fork", "boot"):
            raise ValueError("--kernel-start must be fork or boot")
        if self.pool_size < 0:
            raise ValueError("--pool-size must be 0 or more")
        if self.spare_homes < 0:
            raise ValueError("--spare-homes must be 0 or more")
        if self.max_sessions < 1:
            raise ValueError("--max-sessions must be 1 or more")
        if self.cpu_limit and self.cpu_limit < 0.01:
            raise ValueError("--cpu-limit must be 0 (no limit) or at least 0.01 cores")
        for name in ("execute_timeout", "idle_timeout", "kernel_start_timeout", "interrupt_grace", "install_timeout",
                     "gateway_poll_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")


def check_gateway_env(text: str) -> None:
    try:
        env = json.loads(text)
    except ValueError as error:
        raise ValueError(f"--gateway-env must be a JSON object: {error}") from None
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError('--gateway-env must be a JSON object of strings, e.g. {"KERNEL_NAMESPACE": "agents"}')
    if "KERNEL_USERNAME" in env:
        raise ValueError("--gateway-env cannot set KERNEL_USERNAME: use --gateway-username")


def from_environment(base: Config | None = None, environ: dict[str, str] | None = None) -> Config:
    """Fill the tokens from the environment where they were not given explicitly."""
    base = base or Config()
    environ = os.environ if environ is None else environ
    if base.token is None and environ.get(TOKEN_ENV):
        base = replace(base, token=environ[TOKEN_ENV])
    if base.execute_token is None and environ.get(EXECUTE_TOKEN_ENV):
        base = replace(base, execute_token=environ[EXECUTE_TOKEN_ENV])
    return base
