"""The CPU path for real: llama.cpp's server with the embedded 0.5B model, and one CodeAct turn through the
SDK and a real sandbox. Needs the [cpu] extra, which `make install` installs."""

from __future__ import annotations

import os
import pathlib
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


def chunk_packages(root, prefix: str, chunks: list[bytes]) -> None:
    """Installable-looking chunk packages, one chunk each, as the embedded models ship."""
    for number, chunk in enumerate(chunks, 1):
        data = root / f"{prefix}{number}" / "data"
        data.mkdir(parents=True)
        (root / f"{prefix}{number}" / "__init__.py").write_text("")
        (data / "chunk_000.bin").write_bytes(chunk)


def test_the_embedded_model_is_joined_in_memory_verified_once_and_not_copied_to_disk(tmp_path, monkeypatch):
    import hashlib
    chunks = [b"GGUF" + bytes(range(256)) * 40, b"second chunk" * 1000]
    whole = b"".join(chunks)
    chunk_packages(tmp_path / "site", "fake_model_part", chunks)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = embedded.EmbeddedModel("fake", "", "fake-model-part", 2, len(whole), hashlib.sha256(whole).hexdigest())
    old_copy = tmp_path / "cache" / "codeact" / "models" / model.filename  # what earlier versions kept
    old_copy.parent.mkdir(parents=True)
    old_copy.write_bytes(whole)

    open_before = sorted(os.listdir("/proc/self/fd"))
    fd = embedded.load(model, progress=None)
    try:
        assert os.pread(fd, len(whole) + 1, 0) == whole
        with open(f"/proc/self/fd/{fd}", "rb") as reopened:  # the path the server is given
            assert reopened.read() == whole
    finally:
        os.close(fd)
    assert sorted(os.listdir(old_copy.parent)) == ["fake.verified.json"]  # no copy of the model on disk

    second = tmp_path / "site" / "fake_model_part2" / "data" / "chunk_000.bin"
    second.write_bytes(b"SECOND chunk" * 1000)  # same size, other bytes: the fingerprint no longer matches
    with pytest.raises(embedded.ModelFileError, match="sha256"):
        embedded.load(model, progress=None)
    second.write_bytes(b"short")
    with pytest.raises(embedded.ModelFileError, match="bytes, expected"):
        embedded.load(model, progress=None)
    assert sorted(os.listdir("/proc/self/fd")) == open_before  # a failed load closes its in-memory file


def test_the_server_runs_the_model_from_memory_with_bounded_logits(model_server):
    url, _ = model_server
    cache = embedded.cache_dir()
    assert embedded.MODELS[MODEL].filename not in (os.listdir(cache) if os.path.isdir(cache) else [])
    port = url.rsplit(":", 1)[1].split("/")[0]
    server = processes_mentioning("model_server.llama_server\0--model")
    commands = {pid: pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0") for pid in server}
    server = [pid for pid, argv in commands.items() if argv[argv.index("--port") + 1] == port]
    assert len(server) == 1, "no llama.cpp server process"
    argv = commands[server[0]]
    model_path = argv[argv.index("--model") + 1]
    assert model_path.startswith("/proc/self/fd/")
    assert os.readlink(f"/proc/{server[0]}/fd/{model_path.rsplit('/', 1)[1]}").startswith("/memfd:")
    assert argv[argv.index("--logits_all") + 1] == "false"


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
    # Streamed, and still the prompt's size: the server reports usage on its finishing chunk.
    assert first.usage.get("prompt_tokens", 0) > 200, first.usage


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
