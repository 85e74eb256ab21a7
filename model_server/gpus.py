"""GPU discovery through `nvidia-smi`, and the check that the GPUs asked for exist and are free."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

QUERY = ["--query-gpu=index,uuid,name,memory.used,memory.total", "--format=csv,noheader,nounits"]


class GpuError(RuntimeError):
    """A GPU asked for is missing or busy, or the GPUs cannot be listed."""


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_used_mib: int
    memory_total_mib: int

    @property
    def used_fraction(self) -> float:
        return self.memory_used_mib / self.memory_total_mib if self.memory_total_mib else 0.0


def parse(output: str) -> list[Gpu]:
    gpus = []
    for line in output.strip().splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 5:
            raise GpuError(f"unexpected nvidia-smi line: {line!r}")
        index, uuid, name, used, total = fields
        gpus.append(Gpu(int(index), uuid, name, int(float(used)), int(float(total))))
    return gpus


def discover(timeout: float = 15.0) -> list[Gpu]:
    """The machine's GPUs; an empty list where there is no `nvidia-smi` or it finds no device."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []
    try:
        result = subprocess.run([executable, *QUERY], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise GpuError(f"nvidia-smi did not answer within {timeout:g} s")
    if result.returncode != 0:
        if "No devices were found" in result.stdout + result.stderr:
            return []
        raise GpuError(f"nvidia-smi failed ({result.returncode}): {(result.stderr or result.stdout).strip()[:300]}")
    return parse(result.stdout)


def select(available: list[Gpu], wanted: list[int] | None, busy_threshold: float,
           allow_busy: bool) -> list[Gpu]:
    """The GPUs to use: those named (all by default), refusing any that is missing or busy."""
    by_index = {gpu.index: gpu for gpu in available}
    if wanted is None:
        wanted = sorted(by_index)
    missing = [index for index in wanted if index not in by_index]
    if missing:
        have = ", ".join(str(index) for index in sorted(by_index)) or "none"
        raise GpuError(f"GPU {', '.join(map(str, missing))} does not exist (this machine has: {have}); "
                       "change --gpus")
    chosen = [by_index[index] for index in wanted]
    busy = [gpu for gpu in chosen if gpu.used_fraction > busy_threshold]
    if busy and not allow_busy:
        described = "; ".join(f"GPU {gpu.index} ({gpu.name}) has {gpu.memory_used_mib} of "
                              f"{gpu.memory_total_mib} MiB in use" for gpu in busy)
        raise GpuError(f"{described}: another process is using it; choose others with --gpus, or pass "
                       "--allow-busy")
    return chosen
