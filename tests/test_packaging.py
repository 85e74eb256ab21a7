"""The project as users install it: a wheel (not the editable checkout), in a fresh venv, bare SDK only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv: list[str], **options) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **options)


def test_the_wheel_installs_and_its_commands_work_or_name_the_missing_extra(tmp_path):
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", ROOT, "-w", str(tmp_path / "dist")])
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("codeact-*.whl"))
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    installed = run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)])
    assert installed.returncode == 0, installed.stderr[-2000:]
    bin_dir = venv / "bin"

    for command in (["codeact", "--help"], ["codeact", "run", "--help"], ["codeact", "eval", "--help"]):
        done = run([str(bin_dir / command[0]), *command[1:]])
        assert done.returncode == 0 and "usage:" in done.stdout, (command, done.stderr[-1500:])
    # A real command of each: the suite's data came along; a transcript exports; the model plan prints.
    suite = run([str(bin_dir / "python"), "-c", "from codeact_sdk.eval.runner import load_suite; "
                                                 "print(len(load_suite()['tasks']))"], cwd=str(tmp_path))
    assert suite.returncode == 0 and int(suite.stdout) >= 60, suite.stderr[-1500:]
    transcript = tmp_path / "t.jsonl"
    transcript.write_text(json.dumps({"type": "meta", "version": 1}) + "\n" +
                          json.dumps({"type": "message", "role": "user", "content": "hi", "time": 0}) + "\n")
    exported = run([str(bin_dir / "codeact"), "export", str(transcript)])
    assert json.loads(exported.stdout)["conversations"] == [{"from": "human", "value": "hi"}], exported.stderr
    planned = run([str(bin_dir / "codeact-model"), "--dry-run", "--device", "cpu"])
    assert planned.returncode == 0 and "model_server.llama_server" in planned.stdout, planned.stderr[-1500:]
    # Missing extras: one line that names the extra, no traceback.
    missing = ((["codeact-sandbox", "--help"], "[server]"), (["codeact-model", "--device", "cpu"], "[cpu]"))
    for command, extra in missing:
        done = run([str(bin_dir / command[0]), *command[1:]])
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1 and f"needs the {extra} extra" in lines[0], done.stderr
