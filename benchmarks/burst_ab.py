"""A/B of session bursts (#15) between this checkout and another, alternated in one run: this machine's speed
drifts by a fifth within an hour, so bursts measured in separate runs do not compare.

    git worktree add ../base REV
    python -m benchmarks.burst_ab ../base [--rounds 2] [--bursts 3] [--count 100]

Each round measures the other checkout, then this one. A measurement starts a server from that checkout's own
directory (`python -m` puts the working directory first on sys.path, so a server started from here would run
this code whatever PYTHONPATH says), makes one warm-up burst, then `--bursts` bursts, each on a quiet server
(the pool refilled, its spare session directories made, no clean-up running), and reads around each the
machine's CPU (/proc/stat, without idle, iowait and steal) and the server's, the template's and the new
kernels' (/proc/PID/stat).

The measurement (`--measure`) runs this file by its path with the other checkout first on the path, so it uses
only what both have: LocalSandbox, `descendants` and Config (whose `spare_homes` may be missing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from codeact_sdk.local_sandbox import LocalSandbox

TICKS = os.sysconf("SC_CLK_TCK")
FIGURES = ("all_s", "p50_s", "machine_ms", "server_ms", "template_ms", "kernels_ms")


def process_cpu(pid: int) -> float:
    """Seconds of CPU of a process, its threads included (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_cpu() -> float:
    with open("/proc/stat") as handle:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, handle.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / TICKS


def sessions_at_once(url: str, token: str, count: int) -> list[tuple[float, float, str | None, bool]]:
    """`count` clients, each on a connection of its own opened beforehand, released together: each creates a
    session and runs `1+1` in it. Per client (started, answered, session id, whether it answered 2).

    One thread of asyncio speaking HTTP/1.1 itself, so that the clients cost the machine they share with the
    server little: 100 threads of `requests` took ~2.7 ms of CPU per session, one GIL among them, and spread
    their first requests over ~140 ms, which is not "at once"."""
    address = urlsplit(url)

    async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
                   payload: dict) -> tuple[int, dict]:
        body = json.dumps(payload).encode()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\nAuthorization: Bearer {token}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
        return int(head[0].split()[1]), json.loads(await reader.readexactly(int(fields["content-length"])))

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  go: asyncio.Event) -> tuple[float, float, str | None, bool]:
        await go.wait()
        started = time.perf_counter()
        status, created = await post(reader, writer, "/v1/sessions", {})
        if status != 201:
            return started, time.perf_counter(), None, False
        status, reply = await post(reader, writer, f"/v1/sessions/{created['id']}/execute", {"code": "1+1"})
        ok = status == 200 and reply["results"][0]["data"]["text/plain"] == "2"
        return started, time.perf_counter(), created["id"], ok

    async def burst() -> list[tuple[float, float, str | None, bool]]:
        connections = [await asyncio.open_connection(address.hostname, address.port) for _ in range(count)]
        go = asyncio.Event()
        clients = [asyncio.ensure_future(one(reader, writer, go)) for reader, writer in connections]
        go.set()
        try:
            return await asyncio.wait_for(asyncio.gather(*clients), 300)
        finally:
            for _reader, writer in connections:
                writer.close()

    return asyncio.run(burst())


def wait_until_quiet(sandbox: LocalSandbox, timeout: float = 120.0) -> None:
    """The pool refilled, the spare session directories made again, and the last burst's sessions removed: their
    directories and cgroups go in the background (rm runs), which would otherwise take a share of the CPU of the
    next burst. Imports what it uses from the checkout being measured, whose Config may have no `spare_homes`."""
    import requests

    from sandbox_server.config import Config
    from sandbox_server.testing import descendants

    sandbox.wait_for_pool(4, timeout=timeout)
    deadline = time.monotonic() + timeout
    spare_homes = getattr(Config(), "spare_homes", 0)  # (the option is newer than burst_ab)
    while (any(process[1] == "rm" for process in descendants(sandbox.process.pid))
           or requests.get(sandbox.url + "/health", timeout=10).json().get("spare_homes", 0) < spare_homes):
        if time.monotonic() > deadline:
            raise TimeoutError("the server's clean-up of earlier sessions, or its spare directories, did not end")
        time.sleep(0.1)


def measure(count: int, bursts: int) -> None:
    import requests

    from codeact_sdk.local_sandbox import LocalSandbox
    from sandbox_server.testing import descendants

    def burst(sandbox: LocalSandbox) -> dict:
        headers = {"Authorization": f"Bearer {sandbox.token}"}
        server = sandbox.process.pid
        template = next(process[0] for process in descendants(server) if process[1] == "codeact-zygote")
        before = {process[0] for process in descendants(server)}
        cpu = (machine_cpu(), process_cpu(server), process_cpu(template))
        outcomes = sessions_at_once(sandbox.url, sandbox.token, count)
        after = (machine_cpu(), process_cpu(server), process_cpu(template))
        kernels = sum(process_cpu(process[0]) for process in descendants(server)
                      if process[0] not in before and process[1] == "codeact-kernel")
        with ThreadPoolExecutor(8) as executor:
            list(executor.map(lambda session: requests.delete(f"{sandbox.url}/v1/sessions/{session}",
                                                              headers=headers, timeout=60),
                              [outcome[2] for outcome in outcomes if outcome[2]]))
        per_session = [1000 * (end - start) / count for start, end in zip(cpu, after, strict=True)]
        return {"all_s": max(outcome[1] for outcome in outcomes) - min(outcome[0] for outcome in outcomes),
                "p50_s": statistics.median(outcome[1] - outcome[0] for outcome in outcomes),
                "machine_ms": per_session[0], "server_ms": per_session[1], "template_ms": per_session[2],
                "kernels_ms": 1000 * kernels / count, "errors": sum(not outcome[3] for outcome in outcomes)}

    with tempfile.TemporaryDirectory(prefix="codeact-ab-") as root, \
            LocalSandbox("--kernel-start", "fork", "--max-sessions", str(count + 50), pool_size=4,
                         root_dir=root) as sandbox:
        wait_until_quiet(sandbox)
        time.sleep(0.5)
        burst(sandbox)  # warm-up
        for _ in range(bursts):
            wait_until_quiet(sandbox)
            time.sleep(0.5)
            print(json.dumps(burst(sandbox)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", help="another checkout of this project (e.g. a git worktree at an earlier commit)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.count, args.bursts)
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"other": os.path.abspath(args.other), "this": here}
    results: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            command = [sys.executable, os.path.abspath(__file__), tree, "--measure", "--bursts", str(args.bursts),
                       "--count", str(args.count)]
            output = subprocess.run(command, cwd=tree, env={**os.environ, "PYTHONPATH": tree}, check=True,
                                    capture_output=True, text=True, timeout=1800).stdout
            for line in output.splitlines():
                results[name].append(json.loads(line))
                print(name, line, flush=True)
    print(f"\n| checkout | bursts | errors | {' | '.join(FIGURES)} (medians) |")
    print(f"|---|---:|---:|{'---:|' * len(FIGURES)}")
    for name, runs in results.items():
        medians = " | ".join(f"{statistics.median(run[figure] for run in runs):.2f}" for figure in FIGURES)
        print(f"| {name} ({trees[name]}) | {len(runs)} | {sum(run['errors'] for run in runs)} | {medians} |")


if __name__ == "__main__":
    main()
