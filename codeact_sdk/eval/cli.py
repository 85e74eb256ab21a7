"""`codeact eval` / `python -m codeact_sdk.eval`: run a task suite (the project's own, or `--suite PATH`) in each
action mode under a stated protocol, and print the table."""

from __future__ import annotations

import argparse
import os
import sys

from ..arguments import positive
from ..errors import CodeActError
from ..settings import resolve
from . import actions, report, suite
from .runner import FEEDBACK, Evaluation, Protocol, select


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llm-url", help="OpenAI-compatible base URL ($CODEACT_LLM_URL)")
    parser.add_argument("--model", help="model name ($CODEACT_MODEL; default: the one the server lists)")
    parser.add_argument("--api-key", help="model API key ($CODEACT_API_KEY)")
    parser.add_argument("--sandbox-url", help="sandbox for the code mode (default: a private one)")
    parser.add_argument("--sandbox-token", help="sandbox token ($CODEACT_SANDBOX_TOKEN)")
    parser.add_argument("--suite", metavar="PATH", help="a task suite directory (format: docs/eval.md; default: "
                                                         "the project's own, codeact_sdk/eval/suites/codeact)")
    parser.add_argument("--modes", default=",".join(actions.MODES), help="comma-separated: code,json,text")
    parser.add_argument("--tasks", action="append", help="task id glob or domain (repeatable), e.g. 'dna' or "
                                                          "'travel-0*'")
    parser.add_argument("--limit", type=positive(int), help="at most this many tasks per domain")
    parser.add_argument("--parallel", type=positive(int), default=1, help="tasks run at once")
    parser.add_argument("--output", help="results directory; an interrupted run resumes there "
                                         "(default: eval-runs/<suite>-<model>)")
    parser.add_argument("--timeout", type=positive(float), default=60.0, help="seconds per code execution")
    protocol = parser.add_argument_group("protocol (what published evaluations fix; recorded in the report)")
    protocol.add_argument("--turns", type=positive(int), default=10,
                          help="turn limit per task: model replies, feedback turns included")
    protocol.add_argument("--feedback", action="store_true",
                          help=f"after a wrong answer, say {FEEDBACK!r} and let the model try again within the "
                               "turn limit (MINT's protocol); default: the first answer counts")
    protocol.add_argument("--check", choices=suite.CHECKS,
                          help="answer checking: tolerant (numbers within 0.01, case and punctuation aside) or exact "
                               "(default: the suite's own, else tolerant)")
    protocol.add_argument("--temperature", type=positive(float, zero=True), default=0.0, help="sampling temperature")
    protocol.add_argument("--max-tokens", type=positive(int), default=512, help="tokens per model reply")


def run(args: argparse.Namespace) -> int:
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in actions.MODES]
    if unknown:
        print(f"codeact eval: unknown mode {', '.join(unknown)}; use {', '.join(actions.MODES)}", file=sys.stderr)
        return 2
    try:
        chosen = suite.load(args.suite)
    except CodeActError as error:
        print(f"codeact eval: {error}", file=sys.stderr)
        return 2
    tasks = select(chosen.tasks, args.tasks, args.limit)
    if not tasks:
        print("codeact eval: no task matches --tasks", file=sys.stderr)
        return 2
    settings = resolve(llm_url=args.llm_url, model=args.model, api_key=args.api_key, sandbox_url=args.sandbox_url,
                       sandbox_token=args.sandbox_token, timeout=args.timeout)
    protocol = Protocol(turn_limit=args.turns, feedback=args.feedback, check=args.check or chosen.check,
                        temperature=args.temperature, max_tokens=args.max_tokens)
    output = args.output or os.path.join(
        "eval-runs", f"{chosen.name}-{settings.model or 'model'}".replace("/", "_"))
    evaluation = Evaluation(settings, output, modes, chosen, protocol, progress=sys.stderr)
    try:
        results = evaluation.run(tasks, args.parallel)
    except CodeActError as error:
        print(f"codeact eval: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished tasks are in {output}; run the same command to resume", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)  # without waiting for the model calls under way in worker threads
    text = report.write(report.build(evaluation.run_info, results), os.path.join(output, "report.json"),
                        os.path.join(output, "report.md"))
    print(text)
    print(f"results, transcripts and reports in {output}")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="codeact eval", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
