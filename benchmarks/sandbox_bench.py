"""Sandbox server benchmark: our execute path against its floor and against stock Kernel Gateway.

1. execute `1+1` on a warm session over HTTP and websocket, beside raw jupyter_client on a kernel started
   here (the floor) and stock `jupyter kernelgateway` over its websocket (the original engine);
2. create session + first execute, with the warm pool refilled between samples;
3. 100 concurrent sessions x 20 executes: errors, throughput, p99;
4. memory: RSS per idle session, server peak RSS growth during a 200 MB print;
5. event-loop stalls: /health latency while a session prints escape floods and while a kernel that removed
   its caps sends 8 MB messages of JSON-escaped text (the worst decoding case).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import requests
import websocket

from codeact_sdk.local_sandbox import LocalSandbox
from sandbox_server.testing import HealthProbe, KernelGateway, descendants, plain_execute, private_kb

from .measure import free_port, rss_kb, sample, summary, table

EXECUTES = 300


def floor_jupyter_client() -> list[float]:
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel()
    try:
        return sample(lambda: client.execute_interactive("1+1", timeout=10, output_hook=lambda m: None), EXECUTES)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def stock_kernel_gateway(gateway: KernelGateway) -> tuple[list[float], list[float]]:
    """Execute latency and kernel create time used directly, as the original CodeAct used it."""
    creates = []
    for _ in range(3):
        started = time.perf_counter()
        _, socket_ = gateway.open_kernel()
        plain_execute(socket_, "1+1")
        creates.append(time.perf_counter() - started)

    executes = sample(lambda: plain_execute(socket_, "1+1"), 60)
    socket_.close()
    return executes, creates


def ours(sandbox: LocalSandbox, creates: int = 20) -> dict[str, list[float]]:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {sandbox.token}"
    session_id = http.post(sandbox.url + "/v1/sessions", json={}, timeout=60).json()["id"]
    execute_url = f"{sandbox.url}/v1/sessions/{session_id}/execute"
    results = {"http": sample(lambda: http.post(execute_url, json={"code": "1+1"}, timeout=30).json(), EXECUTES)}
    socket = websocket.create_connection(sandbox.url.replace("http", "ws") + f"/v1/sessions/{session_id}/ws",
                                         header=[f"Authorization: Bearer {sandbox.token}"], timeout=30)

    def over_socket() -> None:
        socket.send('{"type": "execute", "code": "1+1"}')
        while json.loads(socket.recv())["type"] != "done":
            pass

    results["websocket"] = sample(over_socket, EXECUTES)
    socket.close()
    http.delete(f"{sandbox.url}/v1/sessions/{session_id}", timeout=30)

    create_samples = []
    for _ in range(creates):
        sandbox.wait_for_pool(1)
        started = time.perf_counter()
        created = http.post(sandbox.url + "/v1/sessions", json={}, timeout=60).json()["id"]
        http.post(f"{sandbox.url}/v1/sessions/{created}/execute", json={"code": "1+1"}, timeout=30)
        create_samples.append(time.perf_counter() - started)
        http.delete(f"{sandbox.url}/v1/sessions/{created}", timeout=30)
    results["create"] = create_samples
    return results


def concurrency(sandbox: LocalSandbox, sessions: int = 100, executes: int = 20) -> dict:
    headers = {"Authorization": f"Bearer {sandbox.token}"}

    def create(_: int) -> str:
        response = requests.post(sandbox.url + "/v1/sessions", json={}, headers=headers, timeout=300)
        response.raise_for_status()
        return response.json()["id"]

    with ThreadPoolExecutor(8) as executor:
        ids = list(executor.map(create, range(sessions)))
    kernels = kernel_processes(sandbox.root_dir)
    kernel_rss_mb = sum(rss_kb(pid) for pid in kernels) / 1024
    inits = kernel_processes(sandbox.root_dir, b"confine.py")  # booted kernels' inits; forked ones' lifelines:
    inits += [process.pid for process in descendants(sandbox.process.pid) if process.name in ("lifeline", "cat")]
    init_private_mb = sum(private_kb(pid) for pid in inits) / 1024

    def run(session_id: str) -> tuple[list[float], int]:
        http = requests.Session()
        http.headers.update(headers)
        latencies, errors = [], 0
        for number in range(executes):
            started = time.perf_counter()
            reply = http.post(f"{sandbox.url}/v1/sessions/{session_id}/execute",
                              json={"code": f"{number}+1"}, timeout=120)
            latencies.append(time.perf_counter() - started)
            if reply.status_code != 200 or reply.json()["results"][0]["data"]["text/plain"] != str(number + 1):
                errors += 1
        return latencies, errors

    started = time.perf_counter()
    with ThreadPoolExecutor(sessions) as executor:
        outcomes = list(executor.map(run, ids))
    elapsed = time.perf_counter() - started
    latencies = [value for outcome in outcomes for value in outcome[0]]
    with ThreadPoolExecutor(8) as executor:
        list(executor.map(lambda s: requests.delete(f"{sandbox.url}/v1/sessions/{s}", headers=headers,
                                                    timeout=60), ids))
    return {
        "latency": latencies,
        "errors": sum(outcome[1] for outcome in outcomes),
        "throughput": len(latencies) / elapsed,
        "rss_per_idle_session_mb": kernel_rss_mb / max(len(kernels), 1),
        "kernels": len(kernels),
        "init_private_mb": init_private_mb / max(len(inits), 1),
    }


FORKED_NAMES = {b"ipykernel_launcher": "codeact-kernel"}


def kernel_processes(root_dir: str, program: bytes = b"ipykernel_launcher") -> list[int]:
    """A server's processes running `program`: the ipykernel interpreters, or with b"confine.py" the inits
    (their command lines name their connection files); for kernels forked from the template, the kernels,
    named codeact-kernel (their command line is the template's)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
            with open(f"/proc/{entry}/comm") as handle:
                name = handle.read().strip()
        except OSError:
            continue
        if (any(part == program or part.endswith(b"/" + program) for part in argv[:6])
                or name == FORKED_NAMES.get(program)) and any(root_dir.encode() in part for part in argv):
            found.append(int(entry))
    return found


ESCAPE_FLOOD = "print('\\x1b]' * 1_000_000)\nprint('\\x1b[31mA' * 500_000)"
UNCAPPED_MESSAGES = """
kernel = get_ipython().kernel
kernel.session.__dict__.pop("serialize", None)  # the kernel-side message cap, removed
for _ in range(20):
    kernel.session.send(kernel.iopub_socket, 'stream', {'name': 'stdout', 'text': '\\x01' * 1_300_000},
                        parent=kernel.get_parent())
"""


def loop_stalls(sandbox: LocalSandbox) -> dict[str, list[float]]:
    """/health answer times, sampled every 10 ms, while a hostile session runs each attack."""
    headers = {"Authorization": f"Bearer {sandbox.token}"}
    results = {}
    for name, code in (("escape floods", ESCAPE_FLOOD), ("uncapped 8 MB messages", UNCAPPED_MESSAGES)):
        session_id = requests.post(sandbox.url + "/v1/sessions", json={}, headers=headers, timeout=60).json()["id"]
        with HealthProbe(sandbox.url) as probe:
            for _ in range(3):
                requests.post(f"{sandbox.url}/v1/sessions/{session_id}/execute", json={"code": code},
                              headers=headers, timeout=120)
        requests.delete(f"{sandbox.url}/v1/sessions/{session_id}", headers=headers, timeout=30)
        results[name] = probe.samples
    return results


def flood_memory(sandbox: LocalSandbox) -> float:
    headers = {"Authorization": f"Bearer {sandbox.token}"}
    session_id = requests.post(sandbox.url + "/v1/sessions", json={}, headers=headers, timeout=60).json()["id"]
    before = rss_kb(sandbox.process.pid, "VmHWM")
    requests.post(f"{sandbox.url}/v1/sessions/{session_id}/execute", json={"code": "print('x' * 200_000_000)"},
                  headers=headers, timeout=120)
    requests.post(f"{sandbox.url}/v1/sessions/{session_id}/execute",
                  json={"code": "import os\nos.write(1, b'y' * 200_000_000)"}, headers=headers, timeout=120)
    growth = (rss_kb(sandbox.process.pid, "VmHWM") - before) / 1024
    requests.delete(f"{sandbox.url}/v1/sessions/{session_id}", headers=headers, timeout=30)
    return growth


def main() -> str:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="codeact-bench-") as root:
        return measure_all(root)


def measure_all(root: str) -> str:
    floor = floor_jupyter_client()
    with KernelGateway(free_port()) as stock:  # the baseline: the original CodeAct's kernels (gateway_bench: more)
        gateway_executes, gateway_creates = stock_kernel_gateway(stock)
    with LocalSandbox("--max-sessions", "150", pool_size=4, root_dir=root) as sandbox:
        sandbox.wait_for_pool(4)
        measured = ours(sandbox)
        loaded = concurrency(sandbox)
        growth = flood_memory(sandbox)
        stalls = loop_stalls(sandbox)
    floor_median = summary(floor)["median_ms"]

    def ratio(samples: list[float]) -> str:
        return f"{summary(samples)['median_ms'] / floor_median:.2f}x floor"

    gateway_median = summary(gateway_executes)["median_ms"]

    def faster(samples: list[float]) -> str:
        return f"{gateway_median / summary(samples)['median_ms']:.1f}x faster than stock Kernel Gateway"

    report = table("Execute `1+1` on a warm session", [
        ("raw jupyter_client (floor)", summary(floor), "1.00x floor"),
        ("sandbox server, websocket", summary(measured["websocket"]),
         f"{ratio(measured['websocket'])}; {faster(measured['websocket'])}"),
        ("sandbox server, HTTP", summary(measured["http"]), f"{ratio(measured['http'])}; {faster(measured['http'])}"),
        ("stock Kernel Gateway, websocket", summary(gateway_executes), ratio(gateway_executes)),
    ])
    report += "\n" + table("Session create + first execute", [
        ("sandbox server (warm pool)", summary(measured["create"]), "pool refilled between samples"),
        ("stock Kernel Gateway (kernel create)", summary(gateway_creates), "a cold kernel per conversation"),
    ])
    report += "\n" + table("100 concurrent sessions x 20 executes (HTTP)", [
        ("per-execute latency", summary(loaded["latency"]),
         f"errors {loaded['errors']}; throughput {loaded['throughput']:.0f} executes/s"),
    ])
    report += (f"\n### Memory\n\n- RSS per idle session (kernel process): {loaded['rss_per_idle_session_mb']:.1f} MB "
               f"over {loaded['kernels']} kernels\n"
               f"- the init or lifeline (PID 1 of each kernel's pid namespace): {loaded['init_private_mb']:.1f} MB "
               "private memory per session\n"
               f"- server peak RSS growth during a 200 MB print and a 200 MB os.write: {growth:.1f} MB\n")
    report += "\n" + table("Event loop under hostile output: /health answer time, same run", [
        (f"during {name}", summary(samples), f"worst {max(samples) * 1000:.0f} ms")
        for name, samples in stalls.items()])
    return report


if __name__ == "__main__":
    print(main())
