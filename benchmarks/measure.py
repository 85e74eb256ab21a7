"""Timing helpers shared by the benchmarks: samples in seconds, reported as milliseconds."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable

from model_server.stack import free_port  # noqa: F401 - re-exported for the benchmarks
from model_server.supervisor import answers


def sample(action: Callable[[], object], count: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        action()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return samples


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "median_ms": round(statistics.median(samples) * 1000, 3),
        "p99_ms": round(percentile(samples, 0.99) * 1000, 3),
    }


def table(title: str, rows: list[tuple[str, dict[str, float], str]]) -> str:
    """A Markdown table of rows (name, summary, note)."""
    lines = [f"### {title}", "", "| what | n | median ms | p99 ms | note |", "|---|---:|---:|---:|---|"]
    for name, stats, note in rows:
        lines.append(f"| {name} | {stats['n']} | {stats['median_ms']:.2f} | {stats['p99_ms']:.2f} | {note} |")
    return "\n".join(lines) + "\n"


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def wait_answering(url: str, process: subprocess.Popen, timeout: float, interval: float = 0.05) -> bool:
    """Poll `url` until it answers 200 (True); False once `process` has exited or `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while not answers(url, timeout=1):
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
