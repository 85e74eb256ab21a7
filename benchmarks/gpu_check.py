"""The GPU path on a real GPU machine: what the tests check against fake `nvidia-smi` and `vllm`, checked
against the real ones. Run it there: `python -m benchmarks.gpu_check [--model DIR_OR_HUB_NAME]`.

1. GPU discovery reads the real `nvidia-smi`.
2. `--dry-run` picks vLLM with every GPU; a GPU that does not exist is refused, naming those that do.
3. Pinning: the environment the launcher gives vLLM (CUDA_DEVICE_ORDER, CUDA_VISIBLE_DEVICES) makes CUDA show
   exactly the GPU that nvidia-smi calls by that index (compared by UUID, through PyTorch).
4. A GPU with memory in use (PyTorch holds 8 GiB in a child) is refused as busy, and taken with --allow-busy.
5. The launcher supervises a server on the GPU: a stand-in `vllm` (tests/fakes/vllm) is started, answers,
   and is stopped with the launcher, leaving no process.
6. Where vLLM is installed and `--model` is given: a real vLLM launch and a chat completion through it.
Each step prints one line: ok, FAILED or skipped, with what it saw. Exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import requests

from model_server import gpus

from .measure import free_port, wait_answering

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_VLLM = os.path.join(ROOT, "tests", "fakes", "vllm")
failures: list[str] = []


def report(step: str, ok: bool | None, seen: str) -> None:
    word = "skipped" if ok is None else "ok" if ok else "FAILED"
    print(f"[{word}] {step}: {seen}", flush=True)
    if ok is False:
        failures.append(step)


def codeact_model(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_server", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def dry_run_env(*args: str) -> dict[str, str]:
    """The environment variables `codeact-model --dry-run` sets for its (first) vLLM command."""
    line = codeact_model("--dry-run", *args).stdout.splitlines()[0]
    return dict(word.split("=", 1) for word in shlex.split(line) if "=" in word and word.split("=")[0].isupper())


def cuda_uuid(env: dict[str, str]) -> str:
    """The UUID of each GPU CUDA shows under this environment, through PyTorch."""
    code = ("import torch; print(','.join('GPU-' + str(torch.cuda.get_device_properties(i).uuid) "
            "for i in range(torch.cuda.device_count())))")
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model for the real vLLM launch (step 6)")
    args = parser.parse_args()

    found = gpus.discover()
    report("discovery", bool(found), "; ".join(f"{g.index}: {g.name} {g.uuid} {g.memory_used_mib}/"
                                               f"{g.memory_total_mib} MiB" for g in found) or "no GPU")
    if not found:
        sys.exit(1)

    dry = codeact_model("--dry-run", "--model", "m")
    every = ",".join(str(g.index) for g in found)
    report("auto picks vLLM on every GPU", f"CUDA_VISIBLE_DEVICES={every} vllm serve m" in dry.stdout,
           dry.stdout.strip() or dry.stderr.strip())
    missing = codeact_model("--dry-run", "--gpus", str(len(found) + 3))
    report("a missing GPU is refused", missing.returncode == 1 and "this machine has" in missing.stderr,
           missing.stderr.strip())

    has_torch = importlib.util.find_spec("torch") is not None
    for gpu in found:
        if not has_torch:
            report(f"pinning GPU {gpu.index}", None, "PyTorch is not installed")
            break
        env = dry_run_env("--gpus", str(gpu.index), "--model", "m")
        seen = cuda_uuid(env)
        report(f"pinning GPU {gpu.index}", seen == gpu.uuid, f"{env} -> CUDA shows {seen}")

    if has_torch:
        holder = subprocess.Popen([sys.executable, "-c", "import torch, time; x = torch.empty(8 << 30, "
                                   "dtype=torch.uint8, device='cuda:0'); print('held', flush=True); time.sleep(600)"],
                                  stdout=subprocess.PIPE, text=True, env={**os.environ, **dry_run_env("--gpus", "0")})
        try:
            holder.stdout.readline()
            busy = codeact_model("--dry-run", "--gpus", "0")
            allowed = codeact_model("--dry-run", "--gpus", "0", "--allow-busy")
            report("a busy GPU is refused", busy.returncode == 1 and "in use" in busy.stderr, busy.stderr.strip())
            report("--allow-busy takes it", allowed.returncode == 0, allowed.stdout.strip()[:80])
        finally:
            holder.kill()
            holder.wait()

    supervised(found)
    real_vllm(args.model, found)
    print("all passed" if not failures else f"failed: {', '.join(failures)}")
    sys.exit(1 if failures else 0)


def supervised(found: list[gpus.Gpu]) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="codeact-gpu-check-") as scratch:
        record = os.path.join(scratch, "record.jsonl")
        env = {**os.environ, "FAKE_VLLM_RECORD": record}
        launcher = subprocess.Popen([sys.executable, "-m", "model_server", "--vllm", FAKE_VLLM, "--model", "m",
                                     "--port", str(port), "--log-dir", scratch], cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            answered = wait_answering(f"http://127.0.0.1:{port}/v1/models", launcher, 60)
            started = json.loads(pathlib.Path(record).read_text().splitlines()[0]) if os.path.exists(record) else {}
        finally:
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(30)
        left = started.get("pid") and os.path.exists(f"/proc/{started['pid']}")
        report("supervised start and stop", answered and not left and started.get("cuda") == ",".join(
            str(g.index) for g in found), f"answered={answered}, CUDA_VISIBLE_DEVICES={started.get('cuda')}, "
                                          f"left running={bool(left)}")


def real_vllm(model: str | None, found: list[gpus.Gpu]) -> None:
    if importlib.util.find_spec("vllm") is None or not model:
        report("real vLLM launch", None, "vLLM is not installed here" if model else "no --model given")
        return
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="codeact-gpu-check-") as scratch:
        launcher = subprocess.Popen([sys.executable, "-m", "model_server", "--model", model, "--port", str(port),
                                     "--served-model-name", "codeact", "--log-dir", scratch, "--",
                                     "--max-model-len", "4096"], cwd=ROOT)
        started = time.monotonic()
        try:
            ready = wait_answering(f"http://127.0.0.1:{port}/v1/models", launcher, 900)
            text = ""
            if ready:
                reply = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
                    "model": "codeact", "max_tokens": 64, "temperature": 0, "stop": ["</execute>"],
                    "messages": [{"role": "user", "content": "Compute 2**10 with Python in <execute> tags."}]})
                text = reply.json()["choices"][0]["message"]["content"]
            report("real vLLM launch", ready and "<execute>" in text,
                   f"ready in {time.monotonic() - started:.0f} s; reply {text[:80]!r}")
        finally:
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(60)


if __name__ == "__main__":
    main()
