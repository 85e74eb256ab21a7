"""Counters and a latency histogram, rendered in the Prometheus text format (no client library needed)."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable

LATENCY_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.executions: Counter[str] = Counter()  # by status
        self.sessions_created = 0
        self.sessions_reaped = 0
        self.rejected = 0  # creations refused at the session cap
        self.kernels_started: Counter[str] = Counter()  # local kernels, by way: "fork" or "boot"
        self.bucket_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def observe_execution(self, status: str, seconds: float) -> None:
        self.executions[status] += 1
        self.bucket_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def render(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> str:
        lines = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        for name, (help_text, read) in gauges.items():
            metric(name, "gauge", help_text, [("", read())])
        statuses = ("ok", "error", "timeout", "restarted", "died")
        metric("codeact_executions_total", "counter", "Executions by final status.",
               [(f'{{status="{status}"}}', self.executions[status]) for status in statuses])
        metric("codeact_timeouts_total", "counter", "Executions that hit their timeout.",
               [("", self.executions["timeout"] + self.executions["restarted"])])
        metric("codeact_restarts_total", "counter", "Kernels killed and replaced after a timeout.",
               [("", self.executions["restarted"])])
        metric("codeact_deaths_total", "counter", "Kernels that died while running code.",
               [("", self.executions["died"])])
        metric("codeact_sessions_created_total", "counter", "Sessions created.", [("", self.sessions_created)])
        metric("codeact_sessions_reaped_total", "counter", "Sessions closed for idleness or age.",
               [("", self.sessions_reaped)])
        metric("codeact_sessions_rejected_total", "counter", "Session creations refused at the cap.",
               [("", self.rejected)])
        metric("codeact_kernels_started_total", "counter", "Local kernels started, forked from the template or booted.",
               [(f'{{way="{way}"}}', self.kernels_started[way]) for way in ("fork", "boot")])
        name = "codeact_execute_duration_seconds"
        lines.append(f"# HELP {name} Execute latency, from request to result.")
        lines.append(f"# TYPE {name} histogram")
        cumulative = 0
        for bound, count in zip(LATENCY_BUCKETS, self.bucket_counts, strict=False):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {cumulative}')
        total = sum(self.bucket_counts)
        lines.append(f'{name}_bucket{{le="+Inf"}} {total}')
        lines.append(f"{name}_sum {self.latency_sum:g}")
        lines.append(f"{name}_count {total}")
        return "\n".join(lines) + "\n"
