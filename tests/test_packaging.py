"""The project as users install it: a wheel (not the editable checkout) in a fresh venv, bare (the SDK alone)
and with every extra."""

from __future__ import annotations

import json
import os
import signal
import site
import subprocess
import sys

import pytest
import requests

from model_server.stack import free_port
from model_server.supervisor import answers
from tests.conftest import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv: list[str], **options) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **options)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", ROOT, "-w", str(dist)])
    assert built.returncode == 0, built.stderr[-2000:]
    return next(dist.glob("codeact-*.whl"))


def test_the_wheel_installs_and_its_commands_work_or_name_the_missing_extra(wheel, tmp_path):
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    installed = run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)])
    assert installed.returncode == 0, installed.stderr[-2000:]
    bin_dir = venv / "bin"

    for command in (["codeact", "--help"], ["codeact", "run", "--help"], ["codeact", "eval", "--help"]):
        done = run([str(bin_dir / command[0]), *command[1:]])
        assert done.returncode == 0 and "usage:" in done.stdout, (command, done.stderr[-1500:])
    # A real command of each: the suite's data came along; a transcript exports; the model plan prints.
    suite = run([str(bin_dir / "python"), "-c", "from codeact_sdk.eval import suite; s = suite.load(); "
                                                 "print(len(s.tasks), len(s.tools))"], cwd=str(tmp_path))
    assert suite.returncode == 0 and suite.stdout.split() == ["63", "5"], suite.stderr[-1500:]
    transcript = tmp_path / "t.jsonl"
    transcript.write_text(json.dumps({"type": "meta", "version": 1}) + "\n" +
                          json.dumps({"type": "message", "role": "user", "content": "hi", "time": 0}) + "\n")
    exported = run([str(bin_dir / "codeact"), "export", str(transcript)])
    assert json.loads(exported.stdout)["conversations"] == [{"from": "human", "value": "hi"}], exported.stderr
    planned = run([str(bin_dir / "codeact-model"), "--dry-run", "--device", "cpu"])
    assert planned.returncode == 0 and "model_server.llama_server" in planned.stdout, planned.stderr[-1500:]
    # Missing extras: one line that names the extra, no traceback.
    missing = ((["codeact-sandbox", "--help"], "[server]"), (["codeact-model", "--device", "cpu"], "[cpu]"),
               (["codeact", "web", "--port", "0", "--db", str(tmp_path / "web.sqlite3")], "[web]"))
    for command, extra in missing:
        done = run([str(bin_dir / command[0]), *command[1:]])
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1 and f"needs the {extra} extra" in lines[0], done.stderr


def test_the_wheel_with_every_extra_runs_each_command_for_real(wheel, tmp_path):
    """The wheel's code over the dependencies the extras bring. A fresh venv gets the wheel alone (no
    dependencies) and sees the project venv's packages after its own (a path entry, so the checkout's
    editable install is not among them): what runs is the wheel's code, and each extra's requirements, as
    the wheel declares them, are checked against what is installed."""
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    python = str(venv / "bin" / "python")
    own_site = run([python, "-c", "import site; print(site.getsitepackages()[0])"]).stdout.strip()
    with open(os.path.join(own_site, "project-dependencies.pth"), "w") as handle:
        handle.write("\n".join(site.getsitepackages()) + "\n")
    installed = run([python, "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)])
    assert installed.returncode == 0, installed.stderr[-2000:]
    where = run([python, "-c", "import codeact_sdk, sandbox_server, model_server; "
                               "print(codeact_sdk.__file__, sandbox_server.__file__, model_server.__file__)"],
                cwd=str(tmp_path))
    assert where.stdout.count(own_site) == 3, where.stdout + where.stderr  # the wheel's code, not the checkout's
    unmet = run([python, "-c", UNMET_REQUIREMENTS], cwd=str(tmp_path))
    assert unmet.returncode == 0 and unmet.stdout.strip() == "", unmet.stdout + unmet.stderr

    bin_dir = venv / "bin"
    for script in ("codeact", "codeact-sandbox", "codeact-model"):
        done = run([str(bin_dir / script), "--help"])
        assert done.returncode == 0 and "usage:" in done.stdout, (script, done.stderr[-1500:])
    env = {**os.environ, "HOME": str(tmp_path)}  # transcripts and caches of these runs stay in tmp_path

    # codeact-sandbox [server]: serves, and runs code
    port = free_port()
    sandbox = subprocess.Popen([str(bin_dir / "codeact-sandbox"), "--port", str(port), "--pool-size", "1",
                                "--root-dir", str(tmp_path / "sandbox"), "--token", "t0ken"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(url + "/health") or sandbox.poll() is not None, 60, "codeact-sandbox")
        assert sandbox.poll() is None, sandbox.communicate()[1][-1500:]
        executed = requests.post(url + "/execute", json={"convid": "wheel", "code": "print(6 * 7)"}, timeout=60,
                                 headers={"Authorization": "Bearer t0ken"}).json()
        assert "42" in json.dumps(executed), executed
    finally:
        sandbox.send_signal(signal.SIGTERM)
        log = sandbox.communicate(timeout=30)[1]
    # The installed package's kernel template (zygote.py, a script of the wheel) forked that kernel.
    assert "kernels: forked from a template" in log or not sys.platform.startswith("linux"), log[-2000:]

    # codeact-model [cpu]: the embedded model answers
    port = free_port()
    model = subprocess.Popen([str(bin_dir / "codeact-model"), "--device", "cpu", "--model", "qwen2.5-coder-0.5b",
                              "--port", str(port), "--context", "1024", "--log-dir", str(tmp_path / "logs")],
                             env={**env, "XDG_CACHE_HOME": os.path.expanduser("~/.cache")},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(tmp_path))
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_for(lambda: answers(url + "/models") or model.poll() is not None, 300, "codeact-model")
        assert model.poll() is None, f"codeact-model exited ({model.returncode})"
        reply = requests.post(url + "/chat/completions", timeout=120, json={
            "model": "qwen2.5-coder-0.5b", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hi."}]}).json()
        assert reply["choices"][0]["message"]["content"], reply
    finally:
        model.send_signal(signal.SIGTERM)
        model.wait(30)

    # codeact web [web]: serves its API over the conversations' file
    web = subprocess.Popen([str(bin_dir / "codeact"), "web", "--port", "0", "--db", str(tmp_path / "web.sqlite3")],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    try:
        line = web.stdout.readline()
        assert "http://127.0.0.1:" in line, line + web.stderr.read()
        url = line.split()[2].rstrip("/")
        assert requests.get(url + "/api/conversations", timeout=10).json() == {"conversations": []}
        # The page's static files came with the wheel.
        assert "<title>CodeAct</title>" in requests.get(url + "/", timeout=10).text
        assert requests.get(url + "/static/app.js", timeout=10).status_code == 200
    finally:
        web.send_signal(signal.SIGTERM)
        web.wait(30)
        web.stdout.close()
        web.stderr.close()

    # codeact: a task through a private sandbox it starts itself (the [server] extra); the [mcp] extra is
    # checked by import (its client needs an MCP server process of its own)
    script = ("from codeact_sdk.testing import ScriptedModelServer\n"
              "import subprocess, sys\n"
              "import codeact_sdk.mcp_tools\n"
              "with ScriptedModelServer() as m:\n"
              "    m.enqueue('<execute>print(6 * 7)</execute>', 'It is <solution>42</solution>.')\n"
              "    done = subprocess.run(['codeact', 'run', 'what is 6 times 7?', '--llm-url', m.url],\n"
              "                          capture_output=True, text=True, timeout=120)\n"
              "    print(done.returncode, done.stdout.strip(), done.stderr[-800:])\n")
    ran = run([python, "-c", script], env={**env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, cwd=str(tmp_path))
    assert ran.stdout.startswith("0 42"), ran.stdout + ran.stderr


# Each extra's requirements, as the installed wheel declares them, against the installed distributions.
UNMET_REQUIREMENTS = """
from importlib import metadata
from pip._vendor.packaging.requirements import Requirement
unmet = []
for line in metadata.requires("codeact"):
    requirement = Requirement(line)
    if requirement.name == "codeact" or 'extra == "gpu"' in line:
        continue  # [gpu] is vLLM for CUDA: `make check-vllm` installs vLLM's CPU build in its own venv
    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        unmet.append(f"{line}: not installed")
        continue
    if not requirement.specifier.contains(version, prereleases=True):
        unmet.append(f"{line}: {version} is installed")
print("\\n".join(unmet))
"""
