"""Model server benchmark on the embedded CPU models: cold start to ready, decode tokens/s, and, turn by
turn, the time to first token and the server's resident memory.

Every CodeAct turn resends the whole conversation. One conversation alone: llama.cpp reuses the previous
request's prefix in its slot, and the last reply's tokens are already there (the server wrote them), so each
turn processes only the new observation, whatever the conversation's length. The
tokens each turn processed are read from the server's log; RSS is measured after each turn, with the default
settings and (the baseline, in the same run) with llama-cpp-python's own default `logits_all`, which kept
logits for every position. What a processed token costs still rises with the context (each one attends to all
the earlier ones): the floor, llama.cpp's own prompt processing at each depth, is measured in process.
Conversations interleaved with others (an unrelated request between turns): without the RAM prompt cache the
whole prompt is processed again each turn; with it (`--prompt-cache`, bounded by `--cache-size`) the state
comes back from RAM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import requests

from codeact_sdk import protocol
from model_server import embedded
from model_server.launch import default_threads

from .measure import free_port, rss_kb, wait_answering

TURNS = 5  # interleaved conversations
LONG_TURNS = 12  # one conversation filling most of the default 8192-token context
DEPTHS = (0, 1024, 2048, 3072, 4096, 5120, 6144)  # context depths at which the floor is measured


class Streamed(NamedTuple):
    first: float  # seconds to the first token
    rate: float  # tokens/s after it
    tokens: int
    prompt_tokens: int  # the prompt's size, from the usage on the finishing chunk


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
    shutil.rmtree(log_dir(process), ignore_errors=True)  # ours, from start()


def log_dir(process: subprocess.Popen) -> str:
    return process.args[process.args.index("--log-dir") + 1]


def stream_timing(url: str, messages: list[dict], max_tokens: int) -> Streamed:
    started = time.perf_counter()
    response = requests.post(url + "/chat/completions", stream=True, timeout=600, json={
        "model": "bench", "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True})
    stamps, prompt_tokens = [], 0
    for line in response.iter_lines():
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        prompt_tokens = chunk.get("usage", {}).get("prompt_tokens", prompt_tokens)
        if chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
    ended = time.perf_counter()
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    # A reply that is at once a stop string has no first token: its prompt time is the whole request.
    return Streamed((stamps[0] if stamps else ended) - started, rate, len(stamps), prompt_tokens)


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
        timings.append(stream_timing(url, messages, 4).first)
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


class Turn(NamedTuple):
    ttft: float  # seconds
    processed: int  # prompt tokens llama.cpp evaluated for this turn (the rest came from its slot)
    context: int  # the prompt's size
    rss: float  # the server's resident memory after the turn, MB


def long_conversation(model: str, *options: str) -> list[Turn]:
    """One conversation alone on the server. Before each turn, an untimed request puts the last reply into
    llama.cpp's slot, as the server's writing it would have in the SDK's loop; the turn then brings only its
    observation, and the server's log says how many tokens it processed."""
    process, url, _ = start(model, *options)
    turns = []
    try:
        with open(os.path.join(log_dir(process), "llama.cpp.log")) as log:
            for messages in conversation(LONG_TURNS):
                if messages[-2]["role"] == "assistant":
                    stream_timing(url, messages[:-1], 1)
                log.read()  # that request's lines; its prefix line comes before its first token
                reply = stream_timing(url, messages, 8)
                reused = PREFIX_HIT.findall(log.read())
                processed = int(reused[-1]) if reused else reply.prompt_tokens
                turns.append(Turn(reply.first, processed, reply.prompt_tokens, server_rss_mb(process)))
    finally:
        stop(process)
    return turns


# llama-cpp-python's line when a request reuses its slot's prefix (absent: the whole prompt is processed).
PREFIX_HIT = re.compile(r"prefix-match hit, remaining (\d+) prompt tokens to eval")


def prompt_cost_by_depth(model: str, chunk: int = 512) -> list[float]:
    """The floor: ms a token for llama.cpp itself (in this process, the server's prompt threads) to process
    `chunk` tokens at each of DEPTHS tokens of context."""
    import llama_cpp  # the [cpu] extra; only this benchmark needs it in-process

    fd = embedded.load(embedded.find(model), progress=None)
    threads = default_threads()[1]
    llm = llama_cpp.Llama(f"/proc/self/fd/{fd}", n_ctx=DEPTHS[-1] + chunk, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    try:
        text = "\n".join(f"value_{i} = sum(range({i} * 1000))  # step {i}" for i in range(2000))
        tokens = llm.tokenize(text.encode())[:DEPTHS[-1] + chunk]
        costs, position = [], 0
        for depth in DEPTHS:
            llm.eval(tokens[position:depth])
            started = time.perf_counter()
            llm.eval(tokens[depth:depth + chunk])
            costs.append((time.perf_counter() - started) * 1000 / chunk)
            position = depth + chunk
    finally:
        llm.close()
        os.close(fd)
    return costs


def series(values: list[float], digits: int = 2) -> str:
    return " / ".join(f"{value:.{digits}f}" for value in values)


def main() -> str:
    lines = ["### Embedded CPU models (llama.cpp)", "",
             "| model | cold start to ready s (median of 3) | decode tok/s | 5-turn TTFT s, interleaved, cache on | "
             "5-turn TTFT s, interleaved, cache off | off/on (turns 2-5) |", "|---|---:|---:|---|---|---:|"]
    long_runs, floors = [], []
    for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        os.close(embedded.load(embedded.find(name), progress=None))  # the first verification is not timed
        starts = []
        for _ in range(3):
            process, url, seconds = start(name)
            starts.append(seconds)
            stop(process)
        process, url, _ = start(name, "--prompt-cache")
        try:
            rate = stream_timing(url, [{"role": "user", "content": "Write a Python function that sorts a list "
                                                                    "with merge sort, with comments."}], 128).rate
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
        long_runs.append((name, "default", long_conversation(name)))
        long_runs.append((name, "--prompt-cache", long_conversation(name, "--prompt-cache")))
        # The baseline: what the server did before codeact set --logits_all false (passed through after `--`).
        long_runs.append((name, "baseline: logits_all", long_conversation(name, "--", "--logits_all", "true")))
        floors.append((name, prompt_cost_by_depth(name)))
    lines += ["", f"One conversation alone, {LONG_TURNS} turns of a ~290-token reply and a ~280-token observation "
              "(context 8192), the reply put into the slot before each turn as writing it would: time to first "
              "token, the prompt tokens processed (the rest came from llama.cpp's slot), the prompt's size, and "
              "the server's RSS after each turn.", "",
              "| model | settings | TTFT s per turn | median TTFT s | tokens processed per turn | "
              "prompt tokens per turn | RSS MB per turn | peak RSS MB |", "|---|---|---|---:|---|---|---|---:|"]
    for name, settings, turns in long_runs:
        lines.append(f"| {name} | {settings} | {series([t.ttft for t in turns])} | "
                     f"{statistics.median(t.ttft for t in turns):.2f} | {series([t.processed for t in turns], 0)} | "
                     f"{series([t.context for t in turns], 0)} | {series([t.rss for t in turns], 0)} | "
                     f"{max(t.rss for t in turns):.0f} |")
    lines += ["", "The floor: llama.cpp's own prompt processing, 512 tokens at each depth of context, in process "
              "(ms a token).", "", "| model | " + " | ".join(f"at {depth}" for depth in DEPTHS) + " |",
              "|---|" + "---:|" * len(DEPTHS)]
    for name, costs in floors:
        lines.append(f"| {name} | " + " | ".join(f"{cost:.1f}" for cost in costs) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(main())
