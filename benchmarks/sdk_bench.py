"""SDK benchmark: the SDK + sandbox overhead per CodeAct turn with a scripted model (zero model time), a host
tool's round trip from sandbox code beside an in-kernel call, and the SDK's import time beside `import
requests` alone."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile

from codeact_sdk import Session, tool
from codeact_sdk.local_sandbox import LocalSandbox
from codeact_sdk.testing import ScriptedModelServer

from .measure import sample, summary, table

TURNS = 200


def turn_overhead() -> tuple[list[float], list[float]]:
    """Seconds per turn (one model call + one execute + the observation) and per final answer."""
    with ScriptedModelServer(chunk_size=4096) as model, tempfile.TemporaryDirectory(prefix="codeact-bench-") as root, \
            LocalSandbox(pool_size=1, root_dir=root) as sandbox:
        sandbox.wait_for_pool(1)
        with Session(llm_url=model.url, sandbox_url=sandbox.url, sandbox_token=sandbox.token,
                     max_executions=10**6) as session:
            def one_turn() -> None:
                model.enqueue("<execute>1+1</execute>")
                events = session.stream("go")
                for event in events:  # stop after the execution: the loop would ask the model again
                    if type(event).__name__ == "ExecutionFinished":
                        events.close()
                        break
                session.messages = session.messages[:1]

            turns = sample(one_turn, TURNS)

            def answer() -> None:
                model.enqueue("<solution>2</solution>")
                session.chat("go")
                session.messages = session.messages[:1]

            answers = sample(answer, TURNS)
    return turns, answers


TOOL_CALLS = 1000
# Timed inside the kernel, call by call: what sandbox code waits for.
TIMED_CALLS = """
import json, time
def local_echo(value):
    return value
def timed(function):
    samples = []
    for i in range(50):
        function(i)
    for i in range({calls}):
        started = time.perf_counter()
        function(i)
        samples.append(time.perf_counter() - started)
    return samples
print(json.dumps({{"host": timed(echo), "shipped": timed(shipped_echo), "plain": timed(local_echo)}}))
"""


def echo(value: int) -> int:
    """Return the value (a host tool)."""
    return value


@tool(ship=True)
def shipped_echo(value: int) -> int:
    """Return the value (shipped into the kernel)."""
    return value


def tool_round_trips() -> dict[str, list[float]]:
    """Per-call seconds, measured in the kernel: a host tool, a shipped tool, a plain kernel function."""
    with ScriptedModelServer() as model, tempfile.TemporaryDirectory(prefix="codeact-bench-") as root, \
            LocalSandbox(pool_size=1, root_dir=root) as sandbox:
        model.enqueue(f"<execute>{TIMED_CALLS.format(calls=TOOL_CALLS)}</execute>", "<solution>done</solution>")
        with Session(llm_url=model.url, sandbox_url=sandbox.url, sandbox_token=sandbox.token,
                     tools=[echo, shipped_echo], timeout=120) as session:
            reply = session.chat("measure")
    return json.loads(reply.executions[0].stdout)


def import_time(statement: str, runs: int = 15) -> list[float]:
    return sample(lambda: subprocess.run([sys.executable, "-c", statement], check=True), runs, warmup=2)


def main() -> str:
    turns, answers = turn_overhead()
    calls = tool_round_trips()
    sdk = import_time("import codeact_sdk")
    requests_only = import_time("import requests")
    baseline = import_time("pass")
    ratio = (summary(sdk)["median_ms"] - summary(baseline)["median_ms"]) / max(
        summary(requests_only)["median_ms"] - summary(baseline)["median_ms"], 1e-9)
    report = table("SDK + sandbox overhead per turn (scripted model, zero model time)", [
        ("turn: model call + execute `1+1` + observation", summary(turns), "target under 10 ms"),
        ("final answer: model call, no code", summary(answers), ""),
    ])
    def microseconds(samples: list[float]) -> str:
        return f"median {statistics.median(samples) * 1e6:.2f} µs"

    report += "\n" + table(f"Tool calls from sandbox code ({TOOL_CALLS} calls each, timed in the kernel)", [
        ("host tool (runs in the embedding process)", summary(calls["host"]), "goal: under 2 ms median"),
        ("shipped tool (ship=True, runs in the kernel)", summary(calls["shipped"]), microseconds(calls["shipped"])),
        ("plain function defined in the kernel", summary(calls["plain"]), microseconds(calls["plain"])),
    ])
    report += "\n" + table("Import time (fresh interpreter, including its ~start-up)", [
        ("python -c pass", summary(baseline), "interpreter start-up"),
        ("import requests", summary(requests_only), "1.00x (above start-up)"),
        ("import codeact_sdk", summary(sdk), f"{ratio:.2f}x import requests (above start-up)"),
    ])
    return report


if __name__ == "__main__":
    print(main())
