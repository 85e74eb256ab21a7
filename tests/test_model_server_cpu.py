"""The CPU path for real: llama.cpp's server with the embedded 0.5B model, and one CodeAct turn through the
SDK and a real sandbox. Needs the [cpu] extra, which `make install` installs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from codeact_sdk import Session
from codeact_sdk.local_sandbox import LocalSandbox
from model_server import embedded
from model_server.stack import free_port
from tests.conftest import processes_mentioning

MODEL = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    port = free_port()
    log_dir = str(tmp_path_factory.mktemp("model-logs"))
    process = subprocess.Popen([sys.executable, "-m", "model_server", "--device", "cpu", "--model", MODEL,
                                "--port", str(port), "--context", "4096", "--log-dir", log_dir],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 600  # the first run joins and verifies the model
    while True:
        try:
            if requests.get(url + "/models", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("model server did not start:\n" + process.communicate()[0])
        time.sleep(0.5)
    yield url, process
    process.send_signal(signal.SIGTERM)
    process.wait(30)


def test_the_embedded_model_joins_and_verifies(tmp_path):
    model = embedded.MODELS[MODEL]
    path = embedded.ensure(MODEL)
    assert os.path.getsize(path) == model.size
    with open(path + ".verified") as marker:
        assert marker.read() == model.sha256


def test_chat_completion_with_a_stop_sequence(model_server):
    url, _ = model_server
    assert requests.get(url + "/models", timeout=10).json()["data"][0]["id"] == MODEL
    response = requests.post(url + "/chat/completions", timeout=300, json={
        "model": MODEL, "temperature": 0, "max_tokens": 120, "stop": ["</execute>"],
        "messages": [{"role": "system", "content": "Answer with Python code inside <execute></execute> tags."},
                     {"role": "user", "content": "Print the sum of 2 and 3."}]})
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["message"]["content"]
    assert "<execute>" in text and "</execute>" not in text


def test_one_codeact_turn_through_the_sdk_and_the_sandbox(model_server, tmp_path):
    url, _ = model_server
    with LocalSandbox(pool_size=1, root_dir=str(tmp_path)) as sandbox, \
            Session(llm_url=url, sandbox_url=sandbox.url, sandbox_token=sandbox.token, max_executions=2) as session:
        reply = session.chat("Run Python code in the environment to compute 123 * 456 and tell me the result.")
    first = reply.turns[0]
    assert first.code is not None, first.model_output
    assert first.execution is not None and first.execution.status in ("ok", "error")
    assert first.usage.get("completion_tokens", 0) > 0 and first.first_token_seconds is not None


def test_sigterm_stops_the_llama_server_without_orphans(tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "model_server", "--device", "cpu", "--model", MODEL,
                                "--port", str(port), "--context", "2048", "--log-dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not processes_mentioning(f"--port\0{port}\0--n_ctx") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(f"--port\0{port}\0--n_ctx"), "llama.cpp server did not start"
    process.send_signal(signal.SIGTERM)
    process.wait(30)
    time.sleep(0.5)
    assert processes_mentioning(f"--port\0{port}\0--n_ctx") == []


def test_a_concurrent_request_does_not_cut_off_a_streaming_completion(model_server):
    url, _ = model_server
    import threading

    body = {"model": MODEL, "temperature": 0, "max_tokens": 40, "stream": True,
            "messages": [{"role": "user", "content": "Count from 1 to 30, separated by spaces."}]}
    response = requests.post(url + "/chat/completions", json=body, stream=True, timeout=300)
    lines = response.iter_lines()
    first = [next(lines) for _ in range(3)]  # the stream is under way
    poller = threading.Thread(target=lambda: requests.get(url + "/models", timeout=300))
    poller.start()
    rest = [line for line in lines if line]
    poller.join(60)
    chunks = [line for line in first + rest if line.startswith(b"data: {")]
    assert len(chunks) > 20, "the stream was cut off by a concurrent request"


def test_make_serve_refuses_ports_in_use_and_names_who_holds_them():
    import socket
    import subprocess
    import sys
    import time

    from model_server.stack import free_port

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "model_server.stack", "serve", "--model-port", str(port),
                               "--sandbox-port", str(free_port())], capture_output=True, text=True, timeout=60)
    finally:
        held.close()
    assert done.returncode == 1 and time.monotonic() - started < 10
    assert f"port {port} is in use by PID {os.getpid()} (" in done.stderr, done.stderr
    assert "--model-port" in done.stderr and "model ready" not in done.stdout + done.stderr
