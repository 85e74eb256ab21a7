"""`codeact` / `python -m codeact_sdk`: chat (an interactive REPL), run (one task), export (a transcript).

Colours are plain ANSI, on when standard output is a terminal and NO_COLOR is unset.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict

from . import events
from .arguments import positive
from .errors import CodeActError
from .eval import cli as eval_cli
from .line_editor import LineEditor
from .progress import Progress
from .session import ANSWERED, WITHDRAWN, Reply, Session
from .settings import DEFAULT_LLM_URL, ENVIRONMENT, resolve
from .transcript import export

DATA_DIR = os.path.join(os.path.expanduser("~"), ".local", "share", "codeact")
TRANSCRIPT_DIR = os.path.join(DATA_DIR, "transcripts")
IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpg"}


class Painter:
    """ANSI colours, or none."""

    CODES = {"assistant": "36", "code": "33", "stdout": "0", "stderr": "31", "note": "2", "error": "1;31",
             "user": "1;32"}

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, kind: str, text: str) -> str:
        if not self.enabled or not text:
            return text
        return f"\x1b[{self.CODES[kind]}m{text}\x1b[0m"


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection (each falls back to its environment variable)")
    group.add_argument("--llm-url", help=f"OpenAI-compatible base URL (${ENVIRONMENT['llm_url']}, "
                                         f"default {DEFAULT_LLM_URL})")
    group.add_argument("--model", help=f"model name (${ENVIRONMENT['model']}; default: the one the server lists)")
    group.add_argument("--api-key", help=f"model API key (${ENVIRONMENT['api_key']})")
    group.add_argument("--sandbox-url", help=f"sandbox server URL (${ENVIRONMENT['sandbox_url']}; default: start "
                                             "a private one, which needs the [server] extra)")
    group.add_argument("--sandbox-token", help=f"sandbox token (${ENVIRONMENT['sandbox_token']})")
    group.add_argument("--timeout", type=positive(float), help="seconds per code execution (default 60)")
    group.add_argument("--max-executions", type=positive(int, zero=True),
                       help="code executions per message (default 5)")


def add_file_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("files")
    group.add_argument("--file", action="append", default=[], metavar="PATH",
                       help="put this file in the session's directory (the code's working directory) before the "
                            "first message; repeat for more")
    group.add_argument("--output-dir", metavar="DIR",
                       help="at the end, copy the files the agent made or changed in its directory here, and save "
                            f"the images it shows here (default for images: a new directory in {DATA_DIR}/images)")


class Workspace:
    """The files of a CLI session: inputs sent before the first message; images saved as they are shown; the
    agent's new and changed files copied out at the end."""

    def __init__(self, inputs: list[str], output_dir: str | None) -> None:
        missing = [path for path in inputs if not os.path.isfile(path)]
        if missing:
            raise CodeActError(f"--file: no such file: {', '.join(missing)}")
        self.inputs = inputs
        self.output_dir = output_dir
        self.image_dir = output_dir or os.path.join(DATA_DIR, "images", time.strftime("%Y%m%d-%H%M%S"))
        self.images = 0
        self.before: dict[str, tuple] = {}

    def send_inputs(self, session: Session) -> None:
        for path in self.inputs:
            with open(path, "rb") as handle:
                session.upload(os.path.basename(path), handle.read())
        self.before = self.snapshot(session) if self.output_dir else {}

    @staticmethod
    def snapshot(session: Session) -> dict[str, tuple]:
        return {item["path"]: (item["size"], item["modified"]) for item in session.files()}

    def save_images(self, event: events.Event) -> list[str]:
        """Write the images of a result or display to files; their paths."""
        if not isinstance(event, events.Result):
            return []
        saved = []
        for mime, extension in IMAGE_TYPES.items():
            if isinstance(event.data.get(mime), str):
                os.makedirs(self.image_dir, exist_ok=True)
                self.images += 1
                path = os.path.join(self.image_dir, f"image-{self.images}.{extension}")
                with open(path, "wb") as handle:
                    handle.write(base64.b64decode(event.data[mime]))
                saved.append(path)
        return saved

    def collect(self, session: Session) -> list[str]:
        """Copy the files made or changed since the inputs went in to --output-dir; the paths written."""
        if not self.output_dir:
            return []
        written = []
        for path, state in sorted(self.snapshot(session).items()):
            parts = path.split("/")
            if self.before.get(path) == state or ".." in parts or path.startswith("/"):
                continue
            target = os.path.join(self.output_dir, *parts)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(session.download(path))
            written.append(target)
        return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codeact", description="CodeAct: an LLM agent whose actions are Python "
                                                                 "code, run in a sandboxed Jupyter kernel.")
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="interactive conversation (/reset, /save [path], exit)")
    add_connection_options(chat)
    chat.add_argument("--transcript", help=f"JSONL transcript path (default: a new file in {TRANSCRIPT_DIR})")
    chat.add_argument("--resume", help="continue the conversation in this transcript")
    chat.add_argument("--no-color", action="store_true", help="plain output (also: NO_COLOR=1)")
    add_file_options(chat)
    run = commands.add_parser("run", help="run one task, print the answer, exit non-zero on failure")
    add_connection_options(run)
    add_file_options(run)
    run.add_argument("task", help="what to do")
    run.add_argument("--json", action="store_true", help="print the whole reply (turns, executions) as JSON")
    run.add_argument("--transcript", help="also write a JSONL transcript here")
    evaluate = commands.add_parser("eval", help="compare code, JSON and text actions on the task suite")
    eval_cli.add_arguments(evaluate)
    page = commands.add_parser("web", help="the chat page's server on 127.0.0.1 (the [web] extra)")
    add_connection_options(page)
    page.add_argument("--host", default="127.0.0.1", help="address to bind; beyond loopback --token is required")
    page.add_argument("--port", type=positive(int, zero=True), default=8090, help="port (0 picks a free one)")
    page.add_argument("--db", help="the conversations' SQLite file (default: web.sqlite3 in the user's data "
                                   "directory, ~/.local/share/codeact)")
    page.add_argument("--token", help="login token, required beyond loopback (or set CODEACT_WEB_TOKEN)")
    page.add_argument("--mcp-config", metavar="FILE", help='MCP servers whose tools every conversation\'s code can '
                                                          'call: JSON {"mcpServers": {name: {command, args, env} or '
                                                          '{url, headers}}} (the [mcp] extra)')
    exporter = commands.add_parser("export", help="transcript (JSONL) to the ShareGPT conversations format")
    exporter.add_argument("transcript")
    exporter.add_argument("-o", "--output", help="write here (default: standard output)")
    return parser


def session_from(args: argparse.Namespace, transcript_path: str | None) -> Session:
    options = {"model": args.model, "llm_url": args.llm_url, "sandbox_url": args.sandbox_url,
               "api_key": args.api_key, "sandbox_token": args.sandbox_token, "timeout": args.timeout,
               "max_executions": args.max_executions}
    if getattr(args, "resume", None):
        return Session.resume(args.resume, **options)
    return Session(transcript_path=transcript_path, **options)


def render(event: events.Event, paint: Painter, out, workspace: Workspace) -> None:
    """Print one event as it happens: the model's words, the code it runs, the output (images as files)."""
    if isinstance(event, events.ModelDelta):
        out.write(paint("assistant", event.text))
    elif isinstance(event, events.ModelReply):
        out.write("\n")
    elif isinstance(event, events.CodeStarted):
        out.write(paint("note", "--- running ---\n"))
    elif isinstance(event, events.Output):
        out.write(paint(event.stream, event.text))
    elif isinstance(event, events.Result):
        images = workspace.save_images(event)
        text = event.data.get("text/plain", "")
        out.write("".join(paint("note", f"[image saved to {path}]\n") for path in images) if images else text + "\n")
    elif isinstance(event, events.ExecutionFinished):
        execution = event.execution
        if execution.error:
            out.write(paint("stderr", f"{execution.error['name']}: {execution.error['value']}\n"))
        if execution.message:
            out.write(paint("note", f"[{execution.message}]\n"))
        out.write(paint("note", f"--- {execution.status} in {execution.duration_ms:.0f} ms ---\n"))
    elif isinstance(event, events.ReplyFinished) and event.reply.stop_reason not in (ANSWERED, WITHDRAWN):
        out.write(paint("note", f"[stopped: {event.reply.stop_reason}]\n"))
    out.flush()


def chat(args: argparse.Namespace) -> int:
    paint = Painter(sys.stdout.isatty() and not args.no_color and not os.environ.get("NO_COLOR"))
    path = args.transcript or args.resume
    if path is None:
        os.makedirs(TRANSCRIPT_DIR, exist_ok=True)
        path = os.path.join(TRANSCRIPT_DIR, time.strftime("%Y%m%d-%H%M%S") + ".jsonl")
    try:
        workspace = Workspace(args.file, args.output_dir)
        with session_from(args, path) as session:
            workspace.send_inputs(session)
            print(paint("note", f"CodeAct chat: model {session.model.model} | transcript {path}\n"
                                'Enter sends; a paste is one message; """ starts and ends a multi-line one. '
                                "Ctrl-C stops a reply (twice: withdraws it). /reset starts over, /save [path] "
                                "saves the conversation, exit or Ctrl-D quits."))
            with LineEditor(os.path.join(DATA_DIR, "history")) as editor:
                try:
                    converse(session, paint, path, workspace, editor)
                finally:
                    report_files(workspace.collect(session), args.output_dir)
    except CodeActError as error:
        print(f"codeact: {error}", file=sys.stderr)
        return 2
    return 0


def converse(session: Session, paint: Painter, path: str, workspace: Workspace, editor: LineEditor) -> None:
    """The REPL's loop, until exit or end of input."""
    while True:
        try:
            message = editor.read(paint("user", "You> "), paint("user", "...  ")).strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # while typing: drop the line, as a shell does
            print()
            continue
        if not message:
            continue
        if message in ("exit", "quit", "/exit"):
            return
        if message == "/reset":
            report_files(workspace.collect(session), workspace.output_dir)  # the old kernel's files go with it
            session.reset()
            workspace.send_inputs(session)
            print(paint("note", "[conversation and kernel reset]"))
            continue
        if message.startswith("/save"):
            target = message[len("/save"):].strip() or path.rsplit(".", 1)[0] + ".sharegpt.json"
            session.export(target)
            print(paint("note", f"[saved {len(session.messages)} messages to {target}]"))
            continue
        print(paint("assistant", "Assistant> "), end="")
        try:
            reply = reply_stopping_on_ctrl_c(session, message, lambda event: render(event, paint, sys.stdout,
                                                                                    workspace))
        except CodeActError as error:
            print(paint("error", f"\nerror: {error}"))
            continue
        if reply.stop_reason == WITHDRAWN:
            print(paint("note", "\n[withdrawn: the conversation is as it was before that message]"))


def reply_stopping_on_ctrl_c(session: Session, message: str, on_event: Callable[[events.Event], None]) -> Reply:
    """The reply to one message, worked out in a thread while this one waits for Ctrl-C: the first stops the
    reply (the model's stream ends, running code is interrupted, the turn is kept as it stands), the second
    withdraws the message. Waiting here rather than in a signal handler: a Ctrl-C reaches Python code only
    when the main thread runs it, and a thread blocked reading a socket might not for a minute."""
    outcome: dict[str, object] = {}
    done = threading.Event()  # not Thread.join(): in Python 3.11 a Ctrl-C inside join() can break is_alive()

    def work() -> None:
        try:
            outcome["reply"] = session.chat(message, on_event=on_event)
        except BaseException as error:  # handed to the main thread, raised there
            outcome["error"] = error
        finally:
            done.set()

    threading.Thread(target=work, name="codeact-turn", daemon=True).start()
    presses = 0
    while not done.is_set():
        try:
            done.wait(0.1)
        except KeyboardInterrupt:
            presses += 1
            if presses == 1:
                sys.stdout.write("\n[stopping; Ctrl-C again to withdraw the message]\n")
            threading.Thread(target=session.stop, kwargs={"withdraw": presses > 1}, daemon=True).start()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["reply"]


def report_files(paths: list[str], output_dir: str | None) -> None:
    if paths:
        print(f"codeact: copied {len(paths)} file(s) to {output_dir}: "
              f"{', '.join(os.path.relpath(p, output_dir) for p in paths)}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    progress: Progress | None = None  # on a terminal, a status line on stderr; none with --json or piped

    def on_event(event: events.Event) -> None:
        if progress is not None:
            progress.on_event(event)
        for image in workspace.save_images(event):
            if progress is not None:
                progress.say(f"codeact: image saved to {image}")
            else:
                print(f"codeact: image saved to {image}", file=sys.stderr)

    try:
        workspace = Workspace(args.file, args.output_dir)
        with session_from(args, args.transcript) as session:
            workspace.send_inputs(session)
            if sys.stderr.isatty() and not args.json:
                progress = Progress(sys.stderr)
            try:
                reply = session.chat(args.task, on_event=on_event)
            finally:
                if progress is not None:
                    progress.close()
            report_files(workspace.collect(session), args.output_dir)
    except CodeActError as error:
        print(f"codeact: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("codeact: interrupted", file=sys.stderr)
        return 130
    if args.json:
        data = asdict(reply)
        data["usage"] = reply.usage
        print(json.dumps(data, indent=1, default=str))
    else:
        print(reply.solution if reply.solution is not None else reply.text)
    return 0 if reply.stop_reason == ANSWERED else 1


def web(args: argparse.Namespace) -> int:
    import asyncio

    from .mcp_tools import load_config
    from .web.store import default_path

    try:
        from .web.server import WebConfig, serve
    except ImportError as error:
        print(f"codeact: the web page needs the [web] extra ({error.name} is not installed): "
              "pip install 'codeact[web]'", file=sys.stderr)
        return 2
    base = resolve(llm_url=args.llm_url, model=args.model, api_key=args.api_key, sandbox_url=args.sandbox_url,
                   sandbox_token=args.sandbox_token, timeout=args.timeout, max_executions=args.max_executions)
    try:
        mcp_servers = tuple(load_config(args.mcp_config)) if args.mcp_config else ()
        config = WebConfig(host=args.host, port=args.port, token=args.token or os.environ.get("CODEACT_WEB_TOKEN"),
                           db_path=args.db or default_path(), base=base, mcp_servers=mcp_servers)
        config.check()
        asyncio.run(serve(config, ready=lambda line: print(line, flush=True)))
    except (CodeActError, ValueError, OSError) as error:  # a bad --mcp-config, a port in use, no sandbox
        print(f"codeact: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "web":
        sys.exit(web(args))
    if args.command == "eval":
        sys.exit(eval_cli.run(args))
    if args.command == "export":
        data = export(args.transcript, args.output)
        if not args.output:
            print(json.dumps(data, indent=1, ensure_ascii=False))
        sys.exit(0)
    sys.exit(chat(args) if args.command == "chat" else run(args))


if __name__ == "__main__":
    main()
