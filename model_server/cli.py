"""`codeact-model` / `python -m model_server`: an OpenAI-compatible model server that stays up.

With GPUs (found by `nvidia-smi`), vLLM pinned to them; without (or `--device cpu`), llama.cpp's server with
an embedded coder model. Everything after `--` goes to vLLM (or llama.cpp) untouched.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import tempfile
import threading

from codeact_sdk.arguments import positive

from . import embedded, gpus
from .launch import Launch, LlamaOptions, VllmOptions, llama_launch, vllm_launches
from .supervisor import StartError, Supervisor

DEFAULT_GPU_MODEL = "xingyaoww/CodeActAgent-Mistral-7b-v0.1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codeact-model", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Start and supervise an OpenAI-compatible model server: vLLM on CUDA GPUs, or llama.cpp with "
                    "an embedded model on the CPU. Arguments after `--` are passed to the server untouched.")
    parser.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                        help="gpu: vLLM; cpu: llama.cpp; auto: gpu when nvidia-smi lists a GPU")
    parser.add_argument("--model", help=f"gpu: a hub name or local directory (default {DEFAULT_GPU_MODEL}); cpu: "
                                         f"{' or '.join(embedded.MODELS)} (default {embedded.DEFAULT_MODEL}) or "
                                         "a .gguf path")
    parser.add_argument("--served-model-name", help="the name clients use (default: the model's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=positive(int), default=8080, help="port (replicas take the following ports)")
    parser.add_argument("--return-stop-strings", action="store_true",
                        help="end a reply cut by a stop string with that string (vLLM's include_stop_str_in_output, "
                             "by default for every request), as the original CodeAct clients need to run code; "
                             "on in make serve")
    gpu = parser.add_argument_group("GPU (vLLM)")
    gpu.add_argument("--gpus", help="comma-separated GPU indices, e.g. 0,1 (default: all), pinned with "
                                    "CUDA_VISIBLE_DEVICES")
    gpu.add_argument("--parallel", choices=("tensor", "data", "replicas"), default="tensor",
                     help="tensor: one server split over the GPUs; data: vLLM data parallel; replicas: "
                          "independent servers on consecutive ports")
    gpu.add_argument("--replicas", type=positive(int), default=1, help="with --parallel replicas: how many servers")
    gpu.add_argument("--max-model-len", type=positive(int), help="context length (vLLM --max-model-len)")
    gpu.add_argument("--gpu-memory-utilization", type=fraction, help="fraction of GPU memory vLLM may use")
    gpu.add_argument("--no-prefix-caching", action="store_true",
                     help="turn off prefix caching (on by default: every CodeAct turn resends the conversation)")
    gpu.add_argument("--allow-busy", action="store_true", help="use GPUs that already have memory in use")
    gpu.add_argument("--busy-threshold", type=fraction, default=0.05,
                     help="fraction of a GPU's memory in use above which it counts as busy")
    gpu.add_argument("--vllm", default="vllm", help="the vLLM executable")
    cpu = parser.add_argument_group("CPU (llama.cpp)")
    cpu.add_argument("--threads", type=positive(int), help="CPU threads (default: all cores but one on small machines)")
    cpu.add_argument("--context", type=positive(int), default=8192, help="context length in tokens")
    cpu.add_argument("--prompt-cache", action="store_true",
                     help="turn on llama-cpp-python's RAM prompt cache (helps interleaved conversations; measured "
                          "with --cache-size as its bound; see docs/model-server.md)")
    cpu.add_argument("--cache-size", type=positive(int), default=1 << 30,
                     help="with --prompt-cache: the cache's bound in bytes")
    supervision = parser.add_argument_group("supervision")
    supervision.add_argument("--ready-timeout", type=positive(float), default=600.0,
                             help="seconds to wait for readiness")
    supervision.add_argument("--max-restarts", type=positive(int, zero=True), default=5,
                             help="restarts of a crashed server")
    supervision.add_argument("--log-dir", help="where server logs go (default: a temporary directory)")
    parser.add_argument("--dry-run", action="store_true", help="print the exact commands and environment, start "
                                                              "nothing")
    return parser


def fraction(text: str) -> float:
    """An argparse type: a fraction of a GPU's memory, above 0 and at most 1."""
    value = positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be at most 1 (a fraction): {text}")
    return value


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1:]
    return argv, []


def plan(args: argparse.Namespace, extra: list[str]) -> list[Launch]:
    """The launches for these options: validates GPUs and, for the CPU path, loads the embedded model."""
    device = args.device
    if device == "auto" and args.gpus:
        device = "gpu"  # GPUs named: vLLM was asked for, even where this machine has none (a --dry-run)
    found: list[gpus.Gpu] = []
    if device in ("auto", "gpu"):
        found = gpus.discover()
        if device == "auto":
            device = "gpu" if found else "cpu"
    if device == "gpu":
        wanted = [int(part) for part in args.gpus.split(",")] if args.gpus else None
        if found:
            indices = [gpu.index for gpu in gpus.select(found, wanted, args.busy_threshold, args.allow_busy)]
        elif args.dry_run and wanted:
            print("# nvidia-smi lists no GPU here: the command is not checked against this machine",
                  file=sys.stderr)
            indices = wanted
        else:
            raise gpus.GpuError(f"{'--gpus ' + args.gpus if args.gpus else '--device gpu'}, but nvidia-smi lists "
                                "no GPU; use --device cpu")
        return vllm_launches(VllmOptions(
            model=args.model or DEFAULT_GPU_MODEL, gpus=indices, host=args.host,
            port=args.port, served_model_name=args.served_model_name, parallel=args.parallel,
            replicas=args.replicas, max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization, prefix_caching=not args.no_prefix_caching,
            return_stop_strings=args.return_stop_strings, extra=extra, executable=args.vllm))
    if not args.dry_run and importlib.util.find_spec("llama_cpp") is None:
        raise ValueError("the CPU model server needs the [cpu] extra (llama_cpp is not installed): "
                         "pip install 'codeact[cpu]'")
    model = args.model or embedded.DEFAULT_MODEL
    fd = None
    if model.endswith(".gguf"):
        if not os.path.exists(model):
            raise embedded.ModelFileError(f"no model file at {model}")
        path, alias = model, os.path.basename(model)[: -len(".gguf")]
    else:
        found_model = embedded.find(model)
        if args.dry_run:
            print(f"# {model} is joined in memory from its chunk packages at start and passed as /proc/self/fd/N",
                  file=sys.stderr)
            path = "/proc/self/fd/N"
        else:
            fd = embedded.load(found_model)
            path = f"/proc/self/fd/{fd}"
        alias = model
    return [llama_launch(LlamaOptions(model_path=path, alias=args.served_model_name or alias, host=args.host,
                                      port=args.port, context=args.context, threads=args.threads,
                                      prompt_cache=args.prompt_cache, cache_size=args.cache_size, model_fd=fd,
                                      return_stop_strings=args.return_stop_strings, extra=extra))]


def main(argv: list[str] | None = None) -> None:
    own, extra = split_extra(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    try:
        launches = plan(args, extra)
    except (gpus.GpuError, embedded.ModelFileError, ValueError) as error:
        sys.exit(f"codeact-model: {error}")
    if args.dry_run:
        for launch in launches:
            print(launch.describe())
        return
    supervisor = Supervisor(launches, args.log_dir or tempfile.mkdtemp(prefix="codeact-model-"),
                            args.ready_timeout, args.max_restarts)
    stop = threading.Event()

    def on_signal(number: int, frame: object) -> None:
        if not stop.is_set() and started.is_set():
            stop.set()
        else:
            raise KeyboardInterrupt  # during start-up: unwind, which stops what was started

    started = threading.Event()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        supervisor.start()
        started.set()
        for launch in launches:
            print(f"[model_server] serving {launch.url} (OpenAI-compatible); Ctrl-C stops it", flush=True)
        supervisor.watch(stop)
    except StartError as error:
        sys.exit(f"codeact-model: {error}")
    except KeyboardInterrupt:
        pass
    finally:
        supervisor.stop()


if __name__ == "__main__":
    main()
