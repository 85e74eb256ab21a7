"""The local stack: the model server and the sandbox server together (`make serve`), and a real CodeAct
task run through the SDK on the embedded model (`make demo`).

    python -m model_server.stack serve [--model NAME] [--model-port 8080] [--sandbox-port 8081] [--web-port 8090]
    python -m model_server.stack demo  [--model NAME] [--task TEXT]

Each server is waited for; one Ctrl-C stops them all (serve also starts the chat page, `codeact web`).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
import threading

from .launch import Launch
from .supervisor import StartError, Supervisor

# The demo's task, and its answer, which the demo checks (a wrong answer is an error, not a result).
DEMO_TASK = ("What is the sum of the first 50 prime numbers? Compute it with Python, then give the number in "
             "<solution></solution> tags.")
DEMO_ANSWER = "5117"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_owner(port: int) -> str | None:
    """Why 127.0.0.1:`port` cannot be bound: "PID n (command)" when /proc tells who listens there, else
    "another program"; None when it is free."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT left by an earlier run is fine
        try:
            probe.bind(("127.0.0.1", port))
            return None
        except OSError:
            pass
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                for line in list(handle)[1:]:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                        inodes.add(f"socket:[{fields[9]}]")
        except OSError:
            continue
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
                return f"PID {pid} ({command[:120]})"
        except OSError:
            continue
    return "another program"


def launches(model: str | None, model_port: int, sandbox_port: int, device: str,
             web_port: int | None = None) -> list[Launch]:
    # Stop strings returned: the original CodeAct clients (its demo, its chat-ui fork) run code only when the
    # reply ends with its `</execute>`; the SDK works either way.
    model_args = [sys.executable, "-m", "model_server", "--port", str(model_port), "--device", device,
                  "--return-stop-strings"]
    if model:
        model_args += ["--model", model]
    sandbox_args = [sys.executable, "-m", "sandbox_server", "--port", str(sandbox_port), "--pool-size", "2"]
    started = [Launch("model", model_args, port=model_port),
               Launch("sandbox", sandbox_args, port=sandbox_port, ready_path="/health", api_path="")]
    if web_port is not None:  # the chat page, over the two
        web_args = [sys.executable, "-m", "codeact_sdk", "web", "--port", str(web_port),
                    "--llm-url", f"http://127.0.0.1:{model_port}/v1", "--sandbox-url", f"http://127.0.0.1:{sandbox_port}"]
        started.append(Launch("web", web_args, port=web_port, ready_path="/", api_path=""))
    return started


def start(args: argparse.Namespace, model_port: int, sandbox_port: int, web_port: int | None = None) -> Supervisor:
    # The sandbox runs open on loopback: drop a token from the caller's environment so the SDK and the
    # server agree.
    os.environ.pop("CODEACT_SANDBOX_TOKEN", None)
    supervisor = Supervisor(launches(args.model, model_port, sandbox_port, args.device, web_port),
                            tempfile.mkdtemp(prefix="codeact-stack-"), ready_timeout=args.ready_timeout,
                            max_restarts=3)
    supervisor.start()
    return supervisor


def serve(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    supervisor = None
    for option, port in (("--model-port", args.model_port), ("--sandbox-port", args.sandbox_port),
                         ("--web-port", args.web_port)):
        owner = port_owner(port)
        if owner:
            print(f"stack: port {port} is in use by {owner}: another `make serve`? Stop it, or pass {option}",
                  file=sys.stderr)
            return 1
    try:
        supervisor = start(args, args.model_port, args.sandbox_port, args.web_port)
        model_url = f"http://127.0.0.1:{args.model_port}/v1"
        sandbox_url = f"http://127.0.0.1:{args.sandbox_port}"
        print(f"\nchat page:      http://127.0.0.1:{args.web_port}/\nmodel server:   {model_url}\n"
              f"sandbox server: {sandbox_url}\n\n"
              f"try:  curl -s -X POST {sandbox_url}/execute -d '{{\"convid\": \"demo\", \"code\": \"print(6 * 7)\"}}'\n"
              f"or:   CODEACT_LLM_URL={model_url} CODEACT_SANDBOX_URL={sandbox_url} codeact chat\n\n"
              "Ctrl-C stops them all.", flush=True)
        supervisor.watch(stop)
    except StartError as error:
        print(f"stack: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0


def demo(args: argparse.Namespace) -> int:
    from codeact_sdk import CodeActError, Session
    from codeact_sdk.cli import Painter, Workspace, render
    from codeact_sdk.session import ANSWERED

    model_port, sandbox_port = free_port(), free_port()
    supervisor = None
    try:
        supervisor = start(args, model_port, sandbox_port)
        paint = Painter(sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
        with Session(llm_url=f"http://127.0.0.1:{model_port}/v1", sandbox_url=f"http://127.0.0.1:{sandbox_port}",
                     timeout=60) as session:
            print(paint("note", f"\n--- CodeAct demo on {session.model.model} ---"))
            print(paint("user", "User> ") + args.task)
            print(paint("assistant", "Assistant> "), end="")
            workspace = Workspace([], None)
            reply = session.chat(args.task, on_event=lambda event: render(event, paint, sys.stdout, workspace))
        print(paint("note", f"\n--- {len(reply.executions)} code execution(s), stop reason: {reply.stop_reason}, "
                            f"{reply.usage.get('completion_tokens', 0)} tokens generated ---"))
        answer = reply.solution if reply.solution is not None else reply.text.strip()
        expected = args.expect if args.expect is not None else DEMO_ANSWER if args.task == DEMO_TASK else None
        if expected is None:
            print(f"Answer: {answer}")
            return 0 if reply.stop_reason == ANSWERED else 1
        right = reply.stop_reason == ANSWERED and answer.strip() == expected
        print(f"Answer: {answer} ({'right' if right else f'wrong: the answer is {expected}'})")
        return 0 if right else 1
    except (StartError, CodeActError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if supervisor is not None:
            supervisor.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model_server.stack", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("command", choices=("serve", "demo"))
    parser.add_argument("--model", help="model for the model server (default: its own default)")
    parser.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto", help="where the model runs")
    parser.add_argument("--model-port", type=int, default=8080, help="serve: model server port")
    parser.add_argument("--sandbox-port", type=int, default=8081, help="serve: sandbox server port")
    parser.add_argument("--web-port", type=int, default=8090, help="serve: the chat page's port")
    parser.add_argument("--ready-timeout", type=float, default=900.0,
                        help="seconds each server may take to become ready (the first run joins the model)")
    parser.add_argument("--task", default=DEMO_TASK, help="demo: the task to run")
    parser.add_argument("--expect", help="demo: the right answer, checked (default: the default task's own)")
    args = parser.parse_args(argv)
    sys.exit(serve(args) if args.command == "serve" else demo(args))


if __name__ == "__main__":
    main()
