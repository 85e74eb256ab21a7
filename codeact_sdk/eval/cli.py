"""`codeact eval` / `python -m codeact_sdk.eval`: run the suite in each action mode and print the table."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from ..errors import CodeActError
from ..settings import resolve
from . import actions, report
from .runner import Evaluation, Run, load_suite, select


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llm-url", help="OpenAI-compatible base URL ($CODEACT_LLM_URL)")
    parser.add_argument("--model", help="model name ($CODEACT_MODEL; default: the one the server lists)")
    parser.add_argument("--api-key", help="model API key ($CODEACT_API_KEY)")
    parser.add_argument("--sandbox-url", help="sandbox for the code mode (default: a private one)")
    parser.add_argument("--sandbox-token", help="sandbox token ($CODEACT_SANDBOX_TOKEN)")
    parser.add_argument("--modes", default=",".join(actions.MODES), help="comma-separated: code,json,text")
    parser.add_argument("--tasks", action="append", help="task id glob or domain (repeatable), e.g. 'dna' or "
                                                          "'travel-0*'")
    parser.add_argument("--limit", type=int, help="at most this many tasks per domain")
    parser.add_argument("--turns", type=int, default=10, help="turn limit per task (model replies)")
    parser.add_argument("--parallel", type=int, default=1, help="tasks run at once")
    parser.add_argument("--output", help="results directory; an interrupted run resumes there "
                                         "(default: eval-runs/<model>)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per code execution")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens per model reply")


def run(args: argparse.Namespace) -> int:
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in actions.MODES]
    if unknown:
        print(f"codeact eval: unknown mode {', '.join(unknown)}; use {', '.join(actions.MODES)}", file=sys.stderr)
        return 2
    suite = load_suite()
    tasks = select(suite["tasks"], args.tasks, args.limit)
    if not tasks:
        print("codeact eval: no task matches --tasks", file=sys.stderr)
        return 2
    settings = resolve(llm_url=args.llm_url, model=args.model, api_key=args.api_key, sandbox_url=args.sandbox_url,
                       sandbox_token=args.sandbox_token, timeout=args.timeout)
    settings = replace(settings, max_tokens=args.max_tokens)
    output = args.output or os.path.join("eval-runs", (settings.model or "model").replace("/", "_"))
    evaluation = Evaluation(settings, output, modes, args.turns, suite["version"], progress=sys.stderr)
    try:
        results = evaluation.run(tasks, args.parallel)
    except CodeActError as error:
        print(f"codeact eval: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished tasks are in {output}; run the same command to resume", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)  # without waiting for the model calls under way in worker threads
    run_info = Run(evaluation.settings.model, settings.llm_url, suite["version"], modes, args.turns)
    text = report.write(report.build(run_info, results), os.path.join(output, "report.json"),
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
