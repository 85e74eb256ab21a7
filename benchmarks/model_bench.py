"""Model server benchmark on the embedded CPU models: cold start to ready, decode tokens/s, and, turn by
turn, the time to first token and the server's resident memory.

Every CodeAct turn resends the whole conversation. One conversation alone: llama.cpp reuses the previous
request's prefix in its slot, so each turn processes only what is new and TTFT stays flat while the context
fills; RSS is measured after each turn, with the default settings and (the baseline, in the same run) with
llama-cpp-python's own default `logits_all`, which kept logits for every position. Conversations interleaved
with others (an unrelated request between turns): without the RAM prompt cache the whole prompt is processed
again each turn; with it (`--prompt-cache`, bounded by `--cache-size`) the state comes back from RAM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import requests

from codeact_sdk import protocol
from model_server import embedded

from .measure import free_port, rss_kb, wait_answering

TURNS = 5  # interleaved conversations
LONG_TURNS = 12  # one conversation filling most of the default 8192-token context


def start(model: str, *options: str) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    args = [sys.executable, "-m", "model_server", "--device", "cpu", "--model", model, "--port", str(port),
            "--log-dir", tempfile.mkdtemp(prefix="codeact-bench-model-"), *options]
    started = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    if not wait_answering(url + "/models", process, 300):
        raise RuntimeError(f"{model} did not start")
    return process, url, time.perf_counter() - started


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(30)
    shutil.rmtree(process.args[process.args.index("--log-dir") + 1], ignore_errors=True)  # ours, from start()


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
    """The message lists a CodeAct conversation sends, each one the previous plus two messages (~450 tokens)."""
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


def server_rss_mb(launcher: subprocess.Popen) -> float:
    """Resident memory of the model server's processes (the launcher and what it started)."""
    pids, index = [launcher.pid], 0
    while index < len(pids):
        for task in os.listdir(f"/proc/{pids[index]}/task"):
            with open(f"/proc/{pids[index]}/task/{task}/children") as handle:
                pids += [int(pid) for pid in handle.read().split()]
        index += 1
    return sum(rss_kb(pid) for pid in pids) / 1024


def long_conversation(model: str, *options: str) -> tuple[list[float], list[float]]:
    """TTFT and server RSS after each turn of one conversation, alone on the server."""
    process, url, _ = start(model, *options)
    timings, rss = [], []
    try:
        for messages in conversation(LONG_TURNS):
            timings.append(stream_timing(url, messages, 8)[0])
            rss.append(server_rss_mb(process))
    finally:
        stop(process)
    return timings, rss


def series(values: list[float], digits: int = 2) -> str:
    return " / ".join(f"{value:.{digits}f}" for value in values)


def main() -> str:
    lines = ["### Embedded CPU models (llama.cpp)", "",
             "| model | cold start to ready s (median of 3) | decode tok/s | 5-turn TTFT s, interleaved, cache on | "
             "5-turn TTFT s, interleaved, cache off | off/on (turns 2-5) |", "|---|---:|---:|---|---|---:|"]
    long_runs = []
    for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        os.close(embedded.load(embedded.find(name), progress=None))  # the first verification is not timed
        starts = []
        for _ in range(3):
            process, url, seconds = start(name)
            starts.append(seconds)
            stop(process)
        process, url, _ = start(name, "--prompt-cache")
        try:
            _, rate, _ = stream_timing(url, [{"role": "user", "content": "Write a Python function that sorts a "
                                                                          "list with merge sort, with comments."}], 128)
            cached = ttft_per_turn(url)
        finally:
            stop(process)
        process, url, _ = start(name)
        try:
            uncached = ttft_per_turn(url)
        finally:
            stop(process)
        ratio = statistics.mean(uncached[1:]) / statistics.mean(cached[1:])
        lines.append(f"| {name} | {statistics.median(starts):.2f} | {rate:.1f} | {series(cached)} | "
                     f"{series(uncached)} | {ratio:.1f}x |")
        long_runs.append((name, "default", *long_conversation(name)))
        long_runs.append((name, "--prompt-cache", *long_conversation(name, "--prompt-cache")))
        # The baseline: what the server did before codeact set --logits_all false (passed through after `--`).
        long_runs.append((name, "baseline: logits_all", *long_conversation(name, "--", "--logits_all", "true")))
    lines += ["", f"One conversation alone, {LONG_TURNS} turns of ~450 tokens (context 8192): time to first token "
              "and the server's RSS after each turn.", "",
              "| model | settings | TTFT s per turn | median TTFT s | RSS MB per turn | peak RSS MB |",
              "|---|---|---|---:|---|---:|"]
    for name, settings, timings, rss in long_runs:
        lines.append(f"| {name} | {settings} | {series(timings)} | {statistics.median(timings):.2f} | "
                     f"{series(rss, 0)} | {max(rss):.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(main())
