"""Kernel start: forked from the kernel template against booted (#15), both measured in the same run.

1. bursts of 10, 50 and 100 sessions requested at once, each creating its session and running `1+1`: the
   time until all have answered, per-session p50/p99, errors, and the CPU per session of the whole machine
   (/proc/stat: this benchmark's clients included) and of the server;
2. memory per idle session over 100 sessions (each has run `1+1`): USS (what one more session costs) and
   PSS of its processes: the kernel and its lifeline (forked), or the kernel, its init and `unshare` (booted);
   and the template's own;
3. replacement: `POST /restart` (kill, start a new kernel, ready), and an execute of `os._exit(1)` (the death
   seen, a new kernel started, the answer back);
4. 100 forked sessions at once with the server's root (`--root-dir`) on the system's temporary directory and on
   /dev/shm where that is a tmpfs, and what one `mkdir` costs on each after many removals (each session makes
   and removes ~26 files and directories there: on an ext4 without a journal that is milliseconds a session);
5. with `--kernel-python PYTHON` (repeatable): 100 forked sessions at once and idle memory with kernels on the
   server's interpreter and on each one given, to compare Python versions;
6. with `--series SERVERS` (alone, ~3 minutes a server): in each of that many fresh servers, bursts of 100 after
   idle spells of 0 to 60 s (SERIES_GAPS), every burst reported: how the time to all answered spreads. On a
   virtual machine whose free memory goes back to its host, a burst that meets memory handed back long ago
   pays a host fault per page its kernels copy (docs/benchmarks.md, "the machine's memory").
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from codeact_sdk.local_sandbox import LocalSandbox
from sandbox_server.confine import beneath, mounts
from sandbox_server.testing import descendants

from .burst_ab import machine_cpu, process_cpu, sessions_at_once, wait_until_quiet
from .measure import percentile, summary, table

BURSTS = (10, 50, 100)
SERIES_GAPS = (0, 0, 10, 30, 60, 0, 45, 0)  # seconds of quiet before each burst of a series (after its clean-up)
IDLE_SESSIONS = 100
REPLACEMENTS = 20


def burst(sandbox: LocalSandbox, count: int) -> dict:
    """`count` clients, released together, each creating a session and running `1+1` (burst_ab.sessions_at_once)."""
    server = sandbox.process.pid
    before = (machine_cpu(), process_cpu(server))
    outcomes = sessions_at_once(sandbox.url, sandbox.token, count)
    after = (machine_cpu(), process_cpu(server))
    machine_ms, server_ms = (1000 * (end - start) / count for start, end in zip(before, after, strict=True))
    first = min(outcome[0] for outcome in outcomes)
    close_all(sandbox, [outcome[2] for outcome in outcomes if outcome[2]])
    return {
        "all": max(outcome[1] for outcome in outcomes) - first,
        "latency": [outcome[1] - outcome[0] for outcome in outcomes],
        "errors": sum(not outcome[3] for outcome in outcomes),
        "machine_ms": machine_ms,  # CPU of the whole machine per session, this benchmark's clients included
        "server_ms": server_ms,
    }


def close_all(sandbox: LocalSandbox, sessions: list[str]) -> None:
    headers = {"Authorization": f"Bearer {sandbox.token}"}
    with ThreadPoolExecutor(8) as executor:
        list(executor.map(lambda session: requests.delete(f"{sandbox.url}/v1/sessions/{session}", headers=headers,
                                                          timeout=60), sessions))


def memory_kb(pid: int) -> tuple[int, int]:
    """(USS, PSS) of one process, in KB."""
    uss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                uss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return uss, pss


def idle_memory(sandbox: LocalSandbox) -> dict:
    headers = {"Authorization": f"Bearer {sandbox.token}"}

    def one(_: int) -> str:
        session = requests.post(sandbox.url + "/v1/sessions", json={}, headers=headers, timeout=300).json()["id"]
        requests.post(f"{sandbox.url}/v1/sessions/{session}/execute", json={"code": "1+1"}, headers=headers,
                      timeout=300)
        return session

    with ThreadPoolExecutor(8) as executor:
        sessions = list(executor.map(one, range(IDLE_SESSIONS)))
    time.sleep(2)  # idle: the pool refilled, every kernel back in its loop
    kernels = uss = pss = 0
    template = (0, 0)
    for pid, name, argv, _started in descendants(sandbox.process.pid):
        if name == "codeact-zygote":
            template = memory_kb(pid)
            continue
        process_uss, process_pss = memory_kb(pid)
        uss += process_uss
        pss += process_pss
        kernels += name == "codeact-kernel" or b"ipykernel_launcher" in argv.split(b"\x00")[:4]
    close_all(sandbox, sessions)
    return {"kernels": kernels, "uss_mb": uss / kernels / 1024, "pss_mb": pss / kernels / 1024,
            "template_uss_mb": template[0] / 1024, "template_pss_mb": template[1] / 1024}


def replacements(sandbox: LocalSandbox) -> dict[str, list[float]]:
    headers = {"Authorization": f"Bearer {sandbox.token}"}
    session = requests.post(sandbox.url + "/v1/sessions", json={}, headers=headers, timeout=60).json()["id"]
    url = f"{sandbox.url}/v1/sessions/{session}"
    restarts, deaths = [], []
    for _ in range(REPLACEMENTS):
        started = time.perf_counter()
        requests.post(url + "/restart", headers=headers, timeout=60).raise_for_status()
        restarts.append(time.perf_counter() - started)
        started = time.perf_counter()
        reply = requests.post(url + "/execute", json={"code": "import os\nos._exit(1)"}, headers=headers,
                              timeout=60).json()
        deaths.append(time.perf_counter() - started)
        assert reply["status"] == "died", reply
    close_all(sandbox, [session])
    return {"restart": restarts, "death": deaths}


def measure(way: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="codeact-bench-") as root, \
            LocalSandbox("--kernel-start", way, "--max-sessions", "150", pool_size=4, root_dir=root) as sandbox:
        results: dict = {"bursts": {}}
        for count in BURSTS:
            wait_until_quiet(sandbox)
            results["bursts"][count] = burst(sandbox, count)
        wait_until_quiet(sandbox)
        results["memory"] = idle_memory(sandbox)
        sandbox.wait_for_pool(4, timeout=120)
        results["replacement"] = replacements(sandbox)
    return results


def filesystem_type(path: str) -> str:
    """The type of the file system `path` is on: the deepest mount point above it, the last mounted there."""
    kind, depth = "?", -1
    for point, fstype, _flags in mounts():
        if (path == point or beneath(path, [point])) and len(point) >= depth:
            kind, depth = fstype, len(point)
    return kind


def mkdir_cost_us(parent: str, count: int = 2500) -> float:
    """CPU per mkdir once as many directories were just removed, as between bursts (microseconds)."""
    with tempfile.TemporaryDirectory(dir=parent) as directory:
        for round_ in range(2):  # the second round's figure: it follows the first's removals
            started = time.process_time()
            for index in range(count):
                os.mkdir(os.path.join(directory, f"{round_}-{index}"))
            cost = (time.process_time() - started) / count * 1e6
            for index in range(count):
                os.rmdir(os.path.join(directory, f"{round_}-{index}"))
    return cost


def bursts_of_100(sandbox: LocalSandbox, bursts: int = 3) -> dict:
    """Medians of `bursts` bursts of 100, after a warm-up burst (the removals of a burst before, as in a service)."""
    wait_until_quiet(sandbox)
    burst(sandbox, 100)
    runs = []
    for _ in range(bursts):
        wait_until_quiet(sandbox)
        runs.append(burst(sandbox, 100))
    figures = {name: statistics.median(run[name] for run in runs) for name in ("all", "machine_ms", "server_ms")}
    figures["errors"] = sum(run["errors"] for run in runs)
    return figures


def root_filesystems() -> list[tuple[str, str, dict]]:
    """Bursts of 100 forked sessions with the server's root (--root-dir) on the default temporary directory and
    on /dev/shm where that is a tmpfs: every session makes ~26 files and directories there and removes them."""
    roots = [tempfile.gettempdir()]
    if filesystem_type("/dev/shm") == "tmpfs" and tempfile.gettempdir() != "/dev/shm":
        roots.append("/dev/shm")
    results = []
    for base in roots:
        with tempfile.TemporaryDirectory(prefix="codeact-bench-", dir=base) as root, \
                LocalSandbox("--max-sessions", "150", pool_size=4, root_dir=root) as sandbox:
            figures = bursts_of_100(sandbox)
        figures["mkdir_us"] = mkdir_cost_us(base)
        results.append((base, filesystem_type(base), figures))
    return results


def by_interpreter(pythons: list[str]) -> list[tuple[str, dict, dict]]:
    """Forked kernels on the server's own interpreter and on each of `pythons` (--kernel-python: a venv holding
    codeact[kernel]), a server each: (interpreter and version, bursts of 100, idle memory over 100 sessions).
    CPython 3.12 made most of what every kernel touches immortal (PEP 683): no reference counts written, so fewer
    of the template's pages copied into each kernel."""
    results = []
    for python in [sys.executable, *pythons]:
        version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                                 capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        with tempfile.TemporaryDirectory(prefix="codeact-bench-") as root, \
                LocalSandbox("--max-sessions", "150", "--kernel-python", python, pool_size=4,
                             root_dir=root) as sandbox:
            figures = bursts_of_100(sandbox)
            wait_until_quiet(sandbox)
            memory = idle_memory(sandbox)
        results.append((f"{python} (Python {version})", figures, memory))
    return results


def series(servers: int) -> str:
    """Bursts of 100 forked sessions after idle spells of SERIES_GAPS seconds, in `servers` fresh servers."""
    rows, alls = [], []
    for server in range(servers):
        with tempfile.TemporaryDirectory(prefix="codeact-bench-") as root, \
                LocalSandbox("--max-sessions", "150", pool_size=4, root_dir=root) as sandbox:
            for number, gap in enumerate(SERIES_GAPS, 1):
                wait_until_quiet(sandbox)
                time.sleep(0.5 + gap)
                run = burst(sandbox, 100)
                alls.append(run["all"])
                rows.append(f"| {server + 1} | {number} | {gap} | {run['all']:.2f} | "
                            f"{percentile(run['latency'], 0.5):.2f} / {percentile(run['latency'], 0.99):.2f} | "
                            f"{run['machine_ms']:.1f} | {run['errors']} |")
    report = ("### 100 forked sessions at once, burst after burst, after idle spells\n\n| server | burst | quiet "
              "before, s | all answered s | per-session p50 / p99 s | machine CPU ms per session | errors |\n"
              "|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")
    under = sum(seconds < 2 for seconds in alls)
    report += (f"\n{len(alls)} bursts: all answered median {statistics.median(alls):.2f} s, p90 "
               f"{percentile(alls, 0.9):.2f} s, max {max(alls):.2f} s; {under} under 2 s.\n")
    return report


def main(kernel_pythons: list[str] = ()) -> str:
    forked, booted = measure("fork"), measure("boot")
    filesystems = root_filesystems()
    rows = []
    for count in BURSTS:
        for way, results in (("forked", forked), ("booted", booted)):
            run = results["bursts"][count]
            latency = summary(run["latency"])
            rows.append((f"{count} sessions at once, {way}", latency,
                         f"all answered after {run['all']:.2f} s; errors {run['errors']}; CPU per session: "
                         f"machine {run['machine_ms']:.0f} ms, server {run['server_ms']:.1f} ms"))
    ratio = booted["bursts"][100]["all"] / forked["bursts"][100]["all"]
    report = table("Session bursts: create + `1+1`, requested at once (per-session latency)", rows)
    report += f"\n100 sessions: forked {ratio:.1f}x faster to all answered than booted.\n"
    report += "\n### Memory per idle session (over 100 sessions, each after `1+1`)\n\n"
    report += "| kernels start | kernels | USS MB per session | PSS MB per session | the template |\n"
    report += "|---|---:|---:|---:|---|\n"
    for way, results in (("forked", forked), ("booted", booted)):
        memory = results["memory"]
        shared = (f"USS {memory['template_uss_mb']:.1f} MB, PSS {memory['template_pss_mb']:.1f} MB"
                  if way == "forked" else "none")
        report += (f"| {way} | {memory['kernels']} | {memory['uss_mb']:.2f} | {memory['pss_mb']:.2f} | {shared} |\n")
    rows = []
    for what, name in (("restart", "POST /restart (kill, new kernel, ready)"),
                       ("death", "execute `os._exit(1)` (death seen, replaced, answered)")):
        for way, results in (("forked", forked), ("booted", booted)):
            samples = results["replacement"][what]
            rows.append((f"{name}, {way}", summary(samples), f"max {max(samples) * 1000:.0f} ms"))
    report += "\n" + table("Kernel replacement", rows)
    restart_ratio = (percentile(booted["replacement"]["restart"], 0.5)
                     / percentile(forked["replacement"]["restart"], 0.5))
    report += f"\nRestart median: forked {restart_ratio:.1f}x faster than booted.\n"
    report += "\n### 100 forked sessions at once, by where the server's root is (medians of 3 bursts)\n\n"
    report += ("| --root-dir | file system | all answered s | machine CPU ms per session | server CPU ms per session "
               "| errors | one mkdir after 2,500 removals, us of CPU |\n|---|---|---:|---:|---:|---:|---:|\n")
    for base, kind, figures in filesystems:
        report += (f"| {base} | {kind} | {figures['all']:.2f} | {figures['machine_ms']:.1f} "
                   f"| {figures['server_ms']:.1f} | {figures['errors']} | {figures['mkdir_us']:.1f} |\n")
    if kernel_pythons:
        report += "\n### Forked kernels by the kernels' interpreter (--kernel-python)\n\n"
        report += ("| kernels run | 100 at once: all answered s (median of 3) | machine CPU ms per session | errors "
                   "| idle session USS MB (PSS), over 100 |\n|---|---:|---:|---:|---:|\n")
        for python, figures, memory in by_interpreter(list(kernel_pythons)):
            report += (f"| {python} | {figures['all']:.2f} | {figures['machine_ms']:.1f} | {figures['errors']} "
                       f"| {memory['uss_mb']:.2f} ({memory['pss_mb']:.2f}) |\n")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel-python", action="append", default=[], metavar="PYTHON",
                        help="also measure forked kernels on this interpreter (a venv with codeact[kernel])")
    parser.add_argument("--series", type=int, metavar="SERVERS",
                        help="only bursts of 100 after idle spells, in this many fresh servers (~3 minutes each)")
    args = parser.parse_args()
    print(series(args.series) if args.series else main(args.kernel_python))
