"""`codeact-sandbox` / `python -m sandbox_server`: parse options into a Config, run until a signal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import resource
import signal
import sys

from .config import EXECUTE_TOKEN_ENV, TOKEN_ENV, Config, from_environment

# One line of help per Config field; the parser is built from the dataclass so the two never drift.
HELP = {
    "host": "address to bind; anything but loopback requires a token",
    "port": "port to bind (0 picks a free one)",
    "port_file": "write the bound port to this file once listening (useful with --port 0)",
    "token": f"bearer token required on every route but /health (or set {TOKEN_ENV})",
    "execute_token": "a second token, for clients that cannot send headers: POST /t/<token>/execute is the "
                     f"original /execute route, and it opens nothing else (or set {EXECUTE_TOKEN_ENV})",
    "backend": "where kernels run: local (confined processes here) or gateway (a Kernel/Enterprise Gateway)",
    "gateway_url": "with --backend gateway: the gateway's base URL, e.g. http://gateway:8888",
    "gateway_token": "with --backend gateway: its auth token (sent as 'Authorization: token ...')",
    "gateway_kernel": "with --backend gateway: the kernelspec name to start",
    "gateway_username": "with --backend gateway: the user kernels are started for (KERNEL_USERNAME), which the "
                        "gateway's authorized_users and max_kernels_per_user apply to",
    "gateway_session_users": "with --backend gateway: let a session name its own user (the 'user' field of "
                             "POST /v1/sessions), so each user's kernels count against that user on the gateway",
    "gateway_env": "with --backend gateway: more values for every kernel's environment on the gateway, as a JSON "
                   "object, e.g. '{\"KERNEL_NAMESPACE\": \"agents\"}' (Enterprise Gateway passes on KERNEL_* names)",
    "gateway_poll_interval": "with --backend gateway: seconds between asking the gateway which of our kernels it "
                             "still has (one culled or deleted there is replaced at its session's next execute)",
    "pool_size": "warm kernels kept started, so a new session never waits for a boot",
    "spare_homes": "sessions' directories (each with its own uid and install socket) kept made ahead, so a burst of "
                   "sessions starts its kernels at once; local backend",
    "kernel_start": "how local kernels start: fork (from a template process that has imported what a kernel needs; "
                    "milliseconds each, pages shared) or boot (a new interpreter each, as before); fork boots "
                    "whenever the template is unavailable",
    "kernel_preload": "comma-separated modules the kernel template imports for its kernels (with --kernel-start "
                      "fork), besides ipykernel's own; one that starts threads cannot be preloaded",
    "max_sessions": "open sessions allowed; past it, session creation answers 429 with Retry-After",
    "idle_timeout": "seconds a session may stay unused before it is closed",
    "max_lifetime": "seconds a session may live at most (default: no limit)",
    "kernel_start_timeout": "seconds a kernel has to start and answer",
    "execute_timeout": "default seconds per execute; on timeout the kernel is interrupted",
    "interrupt_grace": "seconds an interrupted kernel has to go idle before it is killed and replaced",
    "setup_timeout": "seconds a session's setup code may run",
    "max_output": "characters of stdout+stderr kept per execute (head and tail; the middle is dropped)",
    "max_results": "bytes of results and displays (images) kept per execute",
    "max_message": "largest kernel message, in bytes: kernels cut larger ones (with a marker); the server drops "
                   "any that still arrive",
    "max_body": "largest JSON request body, in bytes",
    "max_file": "largest uploaded file, in bytes",
    "compat_timeout": "seconds per execute on the original /execute route",
    "root_dir": "directory for session directories (default: a private temporary directory)",
    "memory_limit": "bytes of address space (and cgroup memory) per kernel",
    "file_size_limit": "largest file a kernel may write, in bytes",
    "process_limit": "processes and threads per kernel (cgroup pids; rlimit when the kernel is not root)",
    "cpu_limit": "CPU cores per kernel, all its processes together (cgroup CPU quota); 0 for no limit",
    "isolate": "confine kernels (namespaces, own uid, cgroups) where the OS allows",
    "kernel_uid_base": "first uid given to kernels when the server runs as root",
    "kernel_python": "the Python interpreter kernels run, e.g. a venv's bin/python with your own packages (it "
                     "needs ipykernel; pip install 'codeact[kernel]' adds the data stack); default: this server's",
    "package_installs": "let `pip install` in a session fetch wheels from the index this host is configured to "
                        "use, into that session only (local backend)",
    "package_allowlist": "comma-separated project names: the only ones `pip install` may fetch (their "
                         "dependencies come along)",
    "install_timeout": "seconds one `pip install` request may take to resolve and download",
}


def value_type(annotation: str) -> type:
    """The type a Config field's annotation (a string, under postponed evaluation) parses to."""
    for name, kind in (("bool", bool), ("float", float), ("int", int)):
        if annotation.startswith(name):
            return kind
    return str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codeact-sandbox",
        description="The CodeAct sandbox server: a pool of confined Jupyter kernels behind an HTTP and "
                    "websocket API, compatible with the original CodeAct /execute route.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for item in dataclasses.fields(Config):
        flag = "--" + item.name.replace("_", "-")
        kind = value_type(str(item.type))
        if kind is bool:
            parser.add_argument(flag, default=item.default, action=argparse.BooleanOptionalAction,
                                help=HELP[item.name])
        else:
            parser.add_argument(flag, type=kind, default=item.default, help=HELP[item.name])
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    values = {item.name: getattr(args, item.name) for item in dataclasses.fields(Config)}
    return from_environment(Config(**values))


async def serve(config: Config) -> None:
    from .app import Server

    server = Server(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop.set)
    await stop.wait()
    logging.getLogger("sandbox_server").info("stopping: closing sessions and kernels")
    await asyncio.wait_for(server.stop(), 4.5)


def require_server_extra() -> None:
    """Exit with one line naming the extra when what the server needs is not installed."""
    try:
        import jupyter_client  # noqa: F401
        import tornado  # noqa: F401
        import zmq  # noqa: F401
    except ImportError as error:
        sys.exit(f"codeact-sandbox: the sandbox server needs the [server] extra ({error.name} is not installed): "
                 "pip install 'codeact[server]'")


def raise_open_file_limit() -> None:
    """Up to the hard limit: each session holds a dozen descriptors (its kernel's five channels, its pip socket,
    a forked kernel's pidfd and report pipe), so 100 sessions pass the usual soft limit of 1024. Kernels get
    their own limit (isolation.py)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv: list[str] | None = None) -> None:
    require_server_extra()
    raise_open_file_limit()
    from .gateway import GatewayUnavailable

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        config.check()
    except ValueError as error:
        sys.exit(f"codeact-sandbox: {error}")
    try:
        asyncio.run(serve(config))
    except (GatewayUnavailable, ValueError) as error:  # ValueError: a setting that cannot work here
        sys.exit(f"codeact-sandbox: {error}")


if __name__ == "__main__":
    main()
