"""Launch commands as pure functions: what to run, with which environment, on which port.

vLLM: tensor parallel over the given GPUs by default; data parallel, or independent replicas (one per
GPU group, on consecutive ports) when asked; prefix caching on, since every CodeAct turn resends the whole
conversation; pinned with CUDA_VISIBLE_DEVICES. llama.cpp: `python -m model_server.llama_server`
(llama-cpp-python's server, with usage in streamed replies) on a GGUF file. Either can return the stop
string that ended a reply, as the original CodeAct clients need.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Launch:
    """One server process to start and supervise."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the inherited environment
    port: int = 8080
    host: str = "127.0.0.1"
    ready_path: str = "/v1/models"  # answers 200 once the server can serve
    api_path: str = "/v1"
    pass_fds: tuple[int, ...] = ()  # inherited by the server (the embedded model's in-memory file)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.api_path}"

    def describe(self) -> str:
        """The exact command line, with its environment, as a shell would take it."""
        env = " ".join(f"{key}={shlex.quote(value)}" for key, value in sorted(self.env.items()))
        return (env + " " if env else "") + " ".join(shlex.quote(part) for part in self.argv)


@dataclass(frozen=True)
class VllmOptions:
    model: str
    gpus: list[int]
    host: str = "127.0.0.1"
    port: int = 8080
    served_model_name: str | None = None
    parallel: str = "tensor"  # "tensor", "data" or "replicas"
    replicas: int = 1  # with parallel == "replicas": how many servers (GPUs split evenly between them)
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    prefix_caching: bool = True
    return_stop_strings: bool = False  # include_stop_str_in_output by default (vllm_path/codeact_vllm.py)
    extra: list[str] = field(default_factory=list)  # after `--`, passed through untouched
    executable: str = "vllm"


# The directory of the vLLM middleware module, put on vLLM's PYTHONPATH: stdlib only, it loads in any
# environment vLLM runs in, which need not be ours.
VLLM_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_path")


def vllm_launches(options: VllmOptions) -> list[Launch]:
    if not options.gpus:
        raise ValueError("vLLM needs at least one GPU; use --device cpu for the embedded model")
    if options.parallel == "replicas":
        if options.replicas < 1 or len(options.gpus) % options.replicas:
            raise ValueError(f"--replicas {options.replicas} does not divide the {len(options.gpus)} GPUs evenly")
        size = len(options.gpus) // options.replicas
        groups = [options.gpus[start:start + size] for start in range(0, len(options.gpus), size)]
    else:
        groups = [options.gpus]
    launches = []
    for number, group in enumerate(groups):
        port = options.port + number
        argv = [options.executable, "serve", options.model, "--host", options.host, "--port", str(port)]
        if options.served_model_name:
            argv += ["--served-model-name", options.served_model_name]
        if options.parallel == "data":
            argv += ["--data-parallel-size", str(len(group))]
        elif len(group) > 1:
            argv += ["--tensor-parallel-size", str(len(group))]
        argv.append("--enable-prefix-caching" if options.prefix_caching else "--no-enable-prefix-caching")
        if options.max_model_len:
            argv += ["--max-model-len", str(options.max_model_len)]
        if options.gpu_memory_utilization:
            argv += ["--gpu-memory-utilization", str(options.gpu_memory_utilization)]
        # nvidia-smi numbers GPUs in PCI bus order; CUDA by default numbers the fastest first. On a machine
        # with mixed GPUs, index 1 of one is not index 1 of the other unless CUDA is told the order.
        env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(str(index) for index in group)}
        if options.return_stop_strings:
            argv += ["--middleware", "codeact_vllm.IncludeStopStrings"]
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [VLLM_PATH, os.environ.get("PYTHONPATH")]))
        argv += options.extra
        launches.append(Launch(f"vllm-{number}" if len(groups) > 1 else "vllm", argv, env, port, options.host))
    return launches


@dataclass(frozen=True)
class LlamaOptions:
    model_path: str
    alias: str
    host: str = "127.0.0.1"
    port: int = 8080
    context: int = 8192
    threads: int | None = None  # generation threads; default: leave a core for the sandbox
    prompt_cache: bool = False  # llama-cpp-python's RAM cache; see docs/model-server.md before turning it on
    cache_size: int = 1 << 30  # the RAM cache's bound in bytes, when it is on
    return_stop_strings: bool = False  # end a reply cut by a stop string with it (llama_server.py)
    model_fd: int | None = None  # model_path is /proc/self/fd/N of this descriptor, passed to the server
    extra: list[str] = field(default_factory=list)


def default_threads(cores: int | None = None) -> tuple[int, int]:
    """Generation and prompt-processing threads. Generation leaves a core for the sandbox's kernels (two on
    larger machines); prompt processing runs right after an execution, when the kernels are idle, so it
    takes every core."""
    cores = cores or os.cpu_count() or 1
    generation = max(1, cores - 1) if cores <= 8 else cores - 2
    return generation, cores


def llama_launch(options: LlamaOptions) -> Launch:
    threads, batch_threads = default_threads()
    threads = options.threads or threads
    argv = [sys.executable, "-m", "model_server.llama_server", "--model", options.model_path,
            "--model_alias", options.alias, "--host", options.host, "--port", str(options.port),
            "--n_ctx", str(options.context), "--n_threads", str(threads),
            "--n_threads_batch", str(max(threads, batch_threads)),
            "--cache", "true" if options.prompt_cache else "false",
            *(["--cache_size", str(options.cache_size)] if options.prompt_cache else []),
            # llama-cpp-python's server keeps logits for every position by default (only `echo` with
            # `logprobs` needs them): n_ctx x vocabulary floats, 5 GB at 8192 tokens of Qwen2.5, touched as
            # the context fills. Off, the server's memory is the model, the KV cache and one batch's logits.
            "--logits_all", "false",
            # By default a new request (even a readiness probe of /v1/models) cuts off the completion being
            # streamed; requests must queue instead.
            "--interrupt_requests", "false",
            *(["--return_stop_strings", "true"] if options.return_stop_strings else []), *options.extra]
    fds = (options.model_fd,) if options.model_fd is not None else ()
    return Launch("llama.cpp", argv, {}, options.port, options.host, pass_fds=fds)
