"""The gateway backend on Kernel Gateway and on Enterprise Gateway, side by side in one run: what an execute
costs through each, a kernel start through each, how soon a death is noticed, and what one sandbox server
spends per gateway session (its CPU per execute, its memory per session), with and without
deploy/kernel_gateway_config.py. docs/scale-out.md reads its sizing from these figures."""

from __future__ import annotations

import os
import tempfile
import time

import requests

from codeact_sdk.local_sandbox import LocalSandbox
from sandbox_server.testing import EnterpriseGateway, KernelGateway, plain_execute

from .measure import free_port, rss_kb, sample, summary, table
from .sandbox_bench import ours

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EG_PYTHON = os.path.join(ROOT, ".venv-enterprise-gateway", "bin", "python")  # make enterprise-gateway
DEPLOY_CONFIG = os.path.join(ROOT, "deploy", "kernel_gateway_config.py")
SESSIONS = 30  # held at once, for the server's memory per session
DEATHS = 5
CPU_EXECUTES = 300


def gateway(kind: str, workdir: str, config: str | None = None) -> KernelGateway:
    if kind == "Kernel Gateway":
        return KernelGateway(free_port(), workdir, config=config)
    return EnterpriseGateway(free_port(), workdir, config=config, python=EG_PYTHON)


def plain_client(gateway: KernelGateway, quickack: bool = False) -> list[float]:
    """A plain client's execute `1+1` on the gateway's websocket (as the original CodeAct used it)."""
    kernel_id, client = gateway.open_kernel("bench")
    try:
        return sample(lambda: plain_execute(client, "1+1", quickack), 60, warmup=10)
    finally:
        client.close()
        requests.delete(f"{gateway.url}/api/kernels/{kernel_id}", timeout=60)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def through_sandbox(gateway: KernelGateway, root: str) -> dict:
    """Our backend on `gateway`: executes, creates from a warm pool and from none, deaths, server costs."""
    results: dict = {}
    with LocalSandbox("--backend", "gateway", "--gateway-url", gateway.url, pool_size=2,
                      root_dir=os.path.join(root, "warm")) as sandbox:
        sandbox.wait_for_pool(2)
        results.update(ours(sandbox, creates=10))
        headers = {"Authorization": f"Bearer {sandbox.token}"}
        session = requests.post(sandbox.url + "/v1/sessions", json={}, headers=headers, timeout=60).json()["id"]
        http = requests.Session()
        http.headers.update(headers)
        pids = {"server": sandbox.process.pid, "gateway": gateway.process.pid}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        for _ in range(CPU_EXECUTES):
            http.post(f"{sandbox.url}/v1/sessions/{session}/execute", json={"code": "1+1"}, timeout=60)
        for name, pid in pids.items():
            results[f"{name}_cpu_ms_per_execute"] = (cpu_seconds(pid) - before[name]) * 1000 / CPU_EXECUTES
        results["death"] = deaths(sandbox, session)
        rss_before = rss_kb(sandbox.process.pid)
        held = [requests.post(sandbox.url + "/v1/sessions", json={}, headers=headers, timeout=120).json()["id"]
                for _ in range(SESSIONS)]
        for session_id in held:
            requests.post(f"{sandbox.url}/v1/sessions/{session_id}/execute", json={"code": "1+1"},
                          headers=headers, timeout=60)
        results["server_kb_per_session"] = (rss_kb(sandbox.process.pid) - rss_before) / SESSIONS
    with LocalSandbox("--backend", "gateway", "--gateway-url", gateway.url, pool_size=0,
                      root_dir=os.path.join(root, "cold")) as sandbox:
        headers = {"Authorization": f"Bearer {sandbox.token}"}

        def create_and_run() -> None:
            created = requests.post(sandbox.url + "/v1/sessions", json={}, headers=headers, timeout=120).json()["id"]
            requests.post(f"{sandbox.url}/v1/sessions/{created}/execute", json={"code": "1+1"}, headers=headers,
                          timeout=60)
            requests.delete(f"{sandbox.url}/v1/sessions/{created}", headers=headers, timeout=60)

        results["cold_create"] = sample(create_and_run, 5, warmup=1)
    return results


def deaths(sandbox: LocalSandbox, session: str) -> list[float]:
    """From an execute of os._exit until its `died` answer, DEATHS times."""
    headers = {"Authorization": f"Bearer {sandbox.token}"}
    times = []
    for _ in range(DEATHS):
        started = time.perf_counter()
        requests.post(f"{sandbox.url}/v1/sessions/{session}/execute", headers=headers, timeout=60,
                      json={"code": "import os\nos._exit(1)"})
        times.append(time.perf_counter() - started)
    return times


def tuned_deaths(gateway: KernelGateway, root: str) -> list[float]:
    with LocalSandbox("--backend", "gateway", "--gateway-url", gateway.url, pool_size=1, root_dir=root) as sandbox:
        headers = {"Authorization": f"Bearer {sandbox.token}"}
        session = requests.post(sandbox.url + "/v1/sessions", json={}, headers=headers, timeout=60).json()["id"]
        return deaths(sandbox, session)


def measure(kind: str, workdir: str) -> str:
    with gateway(kind, os.path.join(workdir, "stock")) as stock:
        plain = plain_client(stock)
        quickack = plain_client(stock, quickack=True)
        ours_ = through_sandbox(stock, os.path.join(workdir, "sandbox"))
    with gateway(kind, os.path.join(workdir, "tuned"), config=DEPLOY_CONFIG) as tuned:
        plain_tuned = plain_client(tuned)
        deaths_tuned = tuned_deaths(tuned, os.path.join(workdir, "tuned-sandbox"))
    baseline = summary(plain)["median_ms"]

    def versus(samples: list[float]) -> str:
        return f"{baseline / summary(samples)['median_ms']:.1f}x faster than a plain client"

    report = table(f"{kind}: the gateway backend, same run", [
        ("plain client on the stock gateway (baseline)", summary(plain), "Nagle + delayed ACKs"),
        ("plain client, TCP_QUICKACK", summary(quickack), versus(quickack)),
        ("plain client, gateway with deploy/kernel_gateway_config.py", summary(plain_tuned), versus(plain_tuned)),
        ("sandbox server -> gateway, websocket", summary(ours_["websocket"]), versus(ours_["websocket"])),
        ("sandbox server -> gateway, HTTP", summary(ours_["http"]), versus(ours_["http"])),
        ("create + first execute, warm pool", summary(ours_["create"]), "pool refilled between samples"),
        ("create + first execute, no pool", summary(ours_["cold_create"]), "a kernel started through the gateway"),
        ("os._exit until `died`, stock gateway", summary(ours_["death"]), "the gateway's restarter: every 3 s"),
        ("os._exit until `died`, with the config", summary(deaths_tuned), "every 1 s"),
    ])
    report += (f"\n- CPU per execute `1+1` over HTTP through {kind}: the sandbox server "
               f"{ours_['server_cpu_ms_per_execute']:.2f} ms, the gateway {ours_['gateway_cpu_ms_per_execute']:.2f} ms "
               "(its kernel's own CPU not counted)\n"
               f"- sandbox server memory per open gateway session: {ours_['server_kb_per_session']:.0f} KB "
               f"(RSS growth over {SESSIONS} sessions)\n")
    return report


def main() -> str:
    parts = []
    for kind in ("Kernel Gateway", "Enterprise Gateway"):
        with tempfile.TemporaryDirectory(prefix="codeact-bench-") as workdir:
            parts.append(measure(kind, workdir))
    return "\n".join(parts)


if __name__ == "__main__":
    print(main())
