"""`codeact` / `python -m codeact_sdk`: chat (an interactive REPL), run (one task), export (a transcript).

Colours are plain ANSI, on when standard output is a terminal and NO_COLOR is unset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

from . import events
from .errors import CodeActError
from .eval import cli as eval_cli
from .session import ANSWERED, Session
from .settings import DEFAULT_LLM_URL, ENVIRONMENT
from .transcript import export

TRANSCRIPT_DIR = os.path.join(os.path.expanduser("~"), ".local", "share", "codeact", "transcripts")


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
    group.add_argument("--timeout", type=float, help="seconds per code execution (default 60)")
    group.add_argument("--max-executions", type=int, help="code executions per message (default 5)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codeact", description="CodeAct: an LLM agent whose actions are Python "
                                                                 "code, run in a sandboxed Jupyter kernel.")
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="interactive conversation (/reset, /save [path], exit)")
    add_connection_options(chat)
    chat.add_argument("--transcript", help=f"JSONL transcript path (default: a new file in {TRANSCRIPT_DIR})")
    chat.add_argument("--resume", help="continue the conversation in this transcript")
    chat.add_argument("--no-color", action="store_true", help="plain output (also: NO_COLOR=1)")
    run = commands.add_parser("run", help="run one task, print the answer, exit non-zero on failure")
    add_connection_options(run)
    run.add_argument("task", help="what to do")
    run.add_argument("--json", action="store_true", help="print the whole reply (turns, executions) as JSON")
    run.add_argument("--transcript", help="also write a JSONL transcript here")
    evaluate = commands.add_parser("eval", help="compare code, JSON and text actions on the task suite")
    eval_cli.add_arguments(evaluate)
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


def render(event: events.Event, paint: Painter, out) -> None:
    """Print one event as it happens: the model's words, the code it runs, the output."""
    if isinstance(event, events.ModelDelta):
        out.write(paint("assistant", event.text))
    elif isinstance(event, events.ModelReply):
        out.write("\n")
    elif isinstance(event, events.CodeStarted):
        out.write(paint("note", "--- running ---\n"))
    elif isinstance(event, events.Output):
        out.write(paint(event.stream, event.text))
    elif isinstance(event, events.Result):
        text = event.data.get("text/plain", "")
        images = [mime for mime in event.data if mime.startswith("image/")]
        out.write((f"[{', '.join(images)}]" if images else text) + "\n")
    elif isinstance(event, events.ExecutionFinished):
        execution = event.execution
        if execution.error:
            out.write(paint("stderr", f"{execution.error['name']}: {execution.error['value']}\n"))
        if execution.message:
            out.write(paint("note", f"[{execution.message}]\n"))
        out.write(paint("note", f"--- {execution.status} in {execution.duration_ms:.0f} ms ---\n"))
    elif isinstance(event, events.ReplyFinished) and event.reply.stop_reason != ANSWERED:
        out.write(paint("note", f"[stopped: {event.reply.stop_reason}]\n"))
    out.flush()


def chat(args: argparse.Namespace) -> int:
    paint = Painter(sys.stdout.isatty() and not args.no_color and not os.environ.get("NO_COLOR"))
    path = args.transcript or args.resume
    if path is None:
        os.makedirs(TRANSCRIPT_DIR, exist_ok=True)
        path = os.path.join(TRANSCRIPT_DIR, time.strftime("%Y%m%d-%H%M%S") + ".jsonl")
    with session_from(args, path) as session:
        print(paint("note", f"CodeAct chat: model {session.model.model} | transcript {path}\n"
                            "Type a message; /reset starts over, /save [path] saves the conversation, exit quits."))
        while True:
            try:
                line = input(paint("user", "You> "))
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            message = line.strip()
            if not message:
                continue
            if message in ("exit", "quit", "/exit"):
                return 0
            if message == "/reset":
                session.reset()
                print(paint("note", "[conversation and kernel reset]"))
                continue
            if message.startswith("/save"):
                target = message[len("/save"):].strip() or path.rsplit(".", 1)[0] + ".sharegpt.json"
                session.export(target)
                print(paint("note", f"[saved {len(session.messages)} messages to {target}]"))
                continue
            try:
                print(paint("assistant", "Assistant> "), end="")
                session.chat(message, on_event=lambda event: render(event, paint, sys.stdout))
            except KeyboardInterrupt:
                print(paint("note", "\n[interrupted]"))
            except CodeActError as error:
                print(paint("error", f"\nerror: {error}"))


def run(args: argparse.Namespace) -> int:
    try:
        with session_from(args, args.transcript) as session:
            reply = session.chat(args.task)
    except CodeActError as error:
        print(f"codeact: {error}", file=sys.stderr)
        return 2
    if args.json:
        data = asdict(reply)
        data["usage"] = reply.usage
        print(json.dumps(data, indent=1, default=str))
    else:
        print(reply.solution if reply.solution is not None else reply.text)
    return 0 if reply.stop_reason == ANSWERED else 1


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
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
