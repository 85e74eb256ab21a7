"""Run every benchmark and write the report to .bench/report.md (and print it)."""

from __future__ import annotations

import datetime
import os
import platform

from . import gateway_bench, kernel_env_bench, kernel_start_bench, model_bench, sandbox_bench, sdk_bench


def main() -> None:
    header = (f"## Benchmark run {datetime.datetime.now().isoformat(timespec='seconds')}\n\n"
              f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}\n\n")
    parts = (sandbox_bench, gateway_bench, kernel_start_bench, kernel_env_bench, sdk_bench, model_bench)
    report = header + "\n".join(part.main() for part in parts)
    os.makedirs(".bench", exist_ok=True)
    with open(".bench/report.md", "w") as handle:
        handle.write(report)
    print(report)


if __name__ == "__main__":
    main()
