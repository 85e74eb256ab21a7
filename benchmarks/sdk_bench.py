"""SDK benchmark: the SDK + sandbox overhead per CodeAct turn with a scripted model (zero model time), and
the SDK's import time beside `import requests` alone."""

from __future__ import annotations

import subprocess
import sys
import tempfile

from codeact_sdk import Session
from codeact_sdk.local_sandbox import LocalSandbox
from codeact_sdk.testing import ScriptedModelServer

from .measure import sample, summary, table

TURNS = 200


def turn_overhead() -> tuple[list[float], list[float]]:
    """Seconds per turn (one model call + one execute + the observation) and per final answer."""
    with ScriptedModelServer(chunk_size=4096) as model, \
            LocalSandbox(pool_size=1, root_dir=tempfile.mkdtemp(prefix="codeact-bench-")) as sandbox:
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


def import_time(statement: str, runs: int = 15) -> list[float]:
    return sample(lambda: subprocess.run([sys.executable, "-c", statement], check=True), runs, warmup=2)


def main() -> str:
    turns, answers = turn_overhead()
    sdk = import_time("import codeact_sdk")
    requests_only = import_time("import requests")
    baseline = import_time("pass")
    ratio = (summary(sdk)["median_ms"] - summary(baseline)["median_ms"]) / max(
        summary(requests_only)["median_ms"] - summary(baseline)["median_ms"], 1e-9)
    report = table("SDK + sandbox overhead per turn (scripted model, zero model time)", [
        ("turn: model call + execute `1+1` + observation", summary(turns), "target under 10 ms"),
        ("final answer: model call, no code", summary(answers), ""),
    ])
    report += "\n" + table("Import time (fresh interpreter, including its ~start-up)", [
        ("python -c pass", summary(baseline), "interpreter start-up"),
        ("import requests", summary(requests_only), "1.00x (above start-up)"),
        ("import codeact_sdk", summary(sdk), f"{ratio:.2f}x import requests (above start-up)"),
    ])
    return report


if __name__ == "__main__":
    print(main())
