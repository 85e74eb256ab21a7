"""What the kernel environment costs and what an install takes (part of `make bench`).

    python -m benchmarks.kernel_env_bench

- Kernel start (session create + first `1+1`, no pool: a cold kernel each time) and idle private memory per
  kernel, for a bare environment (ipykernel only, in .bench/kernel-bare, made once) and for the default one
  with the data stack. The stack is imported lazily, by user code: installed, it should cost nothing here.
- What the first import of each part of the stack takes in a session, and the kernel's memory after.
- `%pip install` of a small pure-Python wheel in a fresh session: the server resolves and downloads on the
  host, the kernel installs offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from importlib import metadata

import requests

from codeact_sdk.local_sandbox import LocalSandbox

from .measure import summary, table
from .sandbox_bench import kernel_processes, private_kb

BARE_ENV = os.path.join(".bench", "kernel-bare")
STARTS = 10
IDLE_KERNELS = 6
INSTALLS = 10
SMALL_WHEEL = "tabulate"
IMPORTS = ["numpy", "pandas", "scipy.optimize", "sympy", "matplotlib.pyplot", "PIL.Image", "sklearn.linear_model",
           "requests"]


def bare_environment() -> str:
    """A venv with the same ipykernel and nothing of the stack; made once."""
    python = os.path.join(BARE_ENV, "bin", "python")
    if not os.path.exists(os.path.join(BARE_ENV, ".ready")):
        subprocess.run([sys.executable, "-m", "venv", "--clear", BARE_ENV], check=True, timeout=120)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        f"ipykernel=={metadata.version('ipykernel')}"], check=True, timeout=900)
        open(os.path.join(BARE_ENV, ".ready"), "w").close()
    return os.path.abspath(python)


class Client:
    def __init__(self, sandbox: LocalSandbox) -> None:
        self.url = sandbox.url
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {sandbox.token}"

    def create(self) -> str:
        return self.http.post(self.url + "/v1/sessions", json={}, timeout=120).json()["id"]

    def execute(self, session: str, code: str) -> dict:
        return self.http.post(f"{self.url}/v1/sessions/{session}/execute", json={"code": code, "timeout": 120},
                              timeout=180).json()

    def delete(self, session: str) -> None:
        self.http.delete(f"{self.url}/v1/sessions/{session}", timeout=60)


def starts_and_idle_memory(python: str, root: str) -> tuple[list[float], float]:
    """Cold kernel starts (create + first execute) and the idle kernels' private memory, MB each."""
    with LocalSandbox("--kernel-python", python, pool_size=0, root_dir=root) as sandbox:
        client = Client(sandbox)
        samples = []
        for _ in range(STARTS):
            started = time.perf_counter()
            session = client.create()
            client.execute(session, "1+1")
            samples.append(time.perf_counter() - started)
            client.delete(session)
        sessions = [client.create() for _ in range(IDLE_KERNELS)]
        for session in sessions:
            client.execute(session, "1+1")
        time.sleep(1)
        kernels = kernel_processes(root)
        idle_mb = sum(private_kb(pid) for pid in kernels) / 1024 / max(len(kernels), 1)
        for session in sessions:
            client.delete(session)
    return samples, idle_mb


def imports_and_installs(root: str) -> tuple[list[tuple[str, float]], float, list[float], str]:
    """First-import times of the stack, the kernel's memory after them, and install round trips."""
    with LocalSandbox(pool_size=2, root_dir=root) as sandbox:
        sandbox.wait_for_pool(2)
        client = Client(sandbox)
        session = client.create()
        timings = []
        for module in IMPORTS:
            result = client.execute(session, f"import time as _t\n_s = _t.perf_counter()\nimport {module}\n"
                                             "print(_t.perf_counter() - _s)")
            timings.append((module, float(result["stdout"])))
        kernels_before = set(kernel_processes(root))
        loaded_mb = max(private_kb(pid) for pid in kernels_before) / 1024  # the session's kernel is the largest
        client.delete(session)
        installs, last = [], ""
        for _ in range(INSTALLS):
            sandbox.wait_for_pool(1)
            session = client.create()
            started = time.perf_counter()
            last = client.execute(session, f"%pip install -q {SMALL_WHEEL}")["stdout"]
            installs.append(time.perf_counter() - started)
            client.delete(session)
    return timings, loaded_mb, installs, last


def main() -> str:
    bare = bare_environment()
    with tempfile.TemporaryDirectory(prefix="codeact-bench-") as root:
        bare_starts, bare_idle = starts_and_idle_memory(bare, os.path.join(root, "bare"))
        stack_starts, stack_idle = starts_and_idle_memory(sys.executable, os.path.join(root, "stack"))
        timings, loaded_mb, installs, last = imports_and_installs(os.path.join(root, "imports"))
    ratio = summary(stack_starts)["median_ms"] / summary(bare_starts)["median_ms"]
    report = table("Kernel environment: cold kernel start (create + first `1+1`, no pool)", [
        ("bare environment (ipykernel only)", summary(bare_starts), f"idle kernel {bare_idle:.1f} MB private"),
        ("default environment (with the data stack)", summary(stack_starts),
         f"{ratio:.2f}x bare; idle kernel {stack_idle:.1f} MB private"),
    ])
    report += "\n" + table("First import in a session (lazy: paid by the code that imports)", [
        (f"import {module}", {"n": 1, "median_ms": seconds * 1000, "p99_ms": seconds * 1000}, "")
        for module, seconds in timings])
    report += f"\nKernel private memory after those imports: {loaded_mb:.0f} MB.\n"
    report += "\n" + table(f"`%pip install {SMALL_WHEEL}` in a fresh session", [
        ("resolve + download on the host, install in the kernel", summary(installs),
         "ok" if "ERROR" not in last else f"failed: {last[-200:]}"),
    ])
    return report


if __name__ == "__main__":
    print(main())
