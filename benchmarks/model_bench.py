"""Model server benchmark on the embedded CPU models: cold start to ready, decode tokens/s, and the time to
first token of each turn of a 5-turn CodeAct conversation with the server's prompt cache on and off.

Every CodeAct turn resends the whole conversation. llama.cpp reuses the previous request's prefix by itself,
so to show what the prompt cache is for, an unrelated request (another user's session) runs between turns:
with the cache the conversation's state comes back from RAM, without it the whole prompt is processed again.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import requests

from codeact_sdk import protocol
from model_server import embedded

from .measure import free_port

TURNS = 5


def start(model: str, prompt_cache: bool = False) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    args = [sys.executable, "-m", "model_server", "--device", "cpu", "--model", model, "--port", str(port),
            "--log-dir", tempfile.mkdtemp(prefix="codeact-bench-model-")]
    if prompt_cache:
        args.append("--prompt-cache")
    started = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 300
    while True:
        try:
            if requests.get(url + "/models", timeout=1).status_code == 200:
                return process, url, time.perf_counter() - started
        except requests.RequestException:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{model} did not start")
        time.sleep(0.05)


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(30)


def stream_timing(url: str, messages: list[dict], max_tokens: int) -> tuple[float, float, int]:
    """Time to first token, decode tokens/s after it, and tokens received."""
    started = time.perf_counter()
    response = requests.post(url + "/chat/completions", stream=True, timeout=600, json={
        "model": "bench", "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True})
    stamps = []
    for line in response.iter_lines():
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    first = stamps[0] - started
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return first, rate, len(stamps)


def conversation(turns: int) -> list[list[dict]]:
    """The message lists a 5-turn CodeAct conversation sends, each one the previous plus two messages."""
    messages = [{"role": "system", "content": protocol.SYSTEM_PROMPT},
                {"role": "user", "content": "Load the sales table, find the best month, and plot the trend."}]
    sent = []
    for turn in range(turns):
        sent.append(list(messages))
        code = "\n".join(f"value_{turn}_{i} = sum(range({i} * 1000))\nprint('step {turn}.{i}', value_{turn}_{i})"
                         for i in range(12))
        output = "\n".join(f"step {turn}.{i} {sum(range(i * 1000))}" for i in range(12))
        messages += [{"role": "assistant", "content": f"Next I compute part {turn}.\n<execute>\n{code}\n</execute>"},
                     {"role": "user", "content": protocol.OBSERVATION_PREFIX + output}]
    return sent


def ttft_per_turn(url: str) -> list[float]:
    other = [{"role": "user", "content": "Unrelated: name three prime numbers."}]
    timings = []
    for messages in conversation(TURNS):
        stream_timing(url, other, 4)  # another session's request evicts this conversation from the slot
        timings.append(stream_timing(url, messages, 4)[0])
    return timings


def main() -> str:
    lines = ["### Embedded CPU models (llama.cpp)", "",
             "| model | cold start to ready s (median of 3) | decode tok/s | 5-turn TTFT s, cache on | "
             "5-turn TTFT s, cache off | off/on (turns 2-5) |", "|---|---:|---:|---|---|---:|"]
    for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        embedded.ensure(name, progress=None)
        starts = []
        for _ in range(3):
            process, url, seconds = start(name)
            starts.append(seconds)
            stop(process)
        process, url, _ = start(name, prompt_cache=True)
        try:
            _, rate, _ = stream_timing(url, [{"role": "user", "content": "Write a Python function that sorts a "
                                                                          "list with merge sort, with comments."}], 128)
            cached = ttft_per_turn(url)
        finally:
            stop(process)
        process, url, _ = start(name, prompt_cache=False)
        try:
            uncached = ttft_per_turn(url)
        finally:
            stop(process)
        ratio = statistics.mean(uncached[1:]) / statistics.mean(cached[1:])
        lines.append(f"| {name} | {statistics.median(starts):.2f} | {rate:.1f} | "
                     f"{' / '.join(f'{t:.2f}' for t in cached)} | {' / '.join(f'{t:.2f}' for t in uncached)} | "
                     f"{ratio:.1f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(main())
