"""The README's own examples, run as written: only the addresses of `make serve` are pointed at the test's
servers (the scripted model, a token-less sandbox like `make serve`'s)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_block(heading: str) -> str:
    with open(README) as handle:
        section = handle.read().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_embedding_example_runs_as_written_and_calls_its_tool(model, tmp_path):
    from tests.conftest import start_sandbox

    code = python_block("## Embed the SDK in ten lines")
    assert "tools=[population]" in code and 'llm_url="http://127.0.0.1:8080/v1"' in code
    sandbox = start_sandbox(str(tmp_path / "root"))  # no token, as `make serve`
    try:
        code = code.replace("http://127.0.0.1:8080/v1", model.url).replace("http://127.0.0.1:8081", sandbox.url)
        model.enqueue("<execute>print(population('Paris') - population('Lyon'))</execute>",
                      "Paris has <solution>1580400</solution> more inhabitants.")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        sandbox.stop()
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "1580400 answer 2\n"
    assert "Execution Output:\n1580400" in model.requests[-1]["messages"][-1]["content"]
