"""The original CodeAct clients against our servers, unchanged: its CLI demo (scripts/chat/demo.py, run in a
venv with the openai 0.28 it pins) against `make serve`'s stack on the embedded 0.5B model, and its chat-ui
fork's code execution (a replica that runs the route's own detection and /execute call, cut out of
conversation-server.ts: the SvelteKit and MongoDB app cannot be built here). Both run code only when the
model's reply holds its closing `</execute>`, which `make serve`'s model server returns
(`--return-stop-strings`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from typing import NamedTuple

import pytest
import requests

from codeact_sdk.local_sandbox import LocalSandbox
from codeact_sdk.testing import ScriptedModelServer
from model_server.stack import free_port
from model_server.supervisor import answers
from tests.conftest import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENTS = os.path.join(ROOT, "tests", "original_clients")
MODEL = "qwen2.5-coder-0.5b"
EXECUTE_TOKEN = "chat-ui-path-token-0123456789"


class Stack(NamedTuple):
    model_url: str
    sandbox_url: str
    web_url: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`make serve`'s stack (python -m model_server.stack serve), on the 0.5B model and free ports."""
    model_port, sandbox_port, web_port = free_port(), free_port(), free_port()
    directory = tmp_path_factory.mktemp("stack")
    log_path = directory / "stack.log"
    with open(log_path, "w") as log:  # TMPDIR: the stack's log directories go with the test's files
        process = subprocess.Popen([sys.executable, "-m", "model_server.stack", "serve", "--model", MODEL,
                                    "--model-port", str(model_port), "--sandbox-port", str(sandbox_port),
                                    "--web-port", str(web_port)],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "TMPDIR": str(directory)})
    model_url, sandbox_url = f"http://127.0.0.1:{model_port}/v1", f"http://127.0.0.1:{sandbox_port}"
    web_url = f"http://127.0.0.1:{web_port}"
    try:
        wait_for(lambda: process.poll() is not None or "Ctrl-C stops them all" in log_path.read_text(), 600,
                 "make serve")
        assert process.poll() is None, log_path.read_text()[-3000:]
        assert answers(model_url + "/models") and answers(sandbox_url + "/health") and answers(web_url + "/")
        yield Stack(model_url, sandbox_url, web_url)
    finally:
        process.send_signal(signal.SIGTERM)  # SIGINT may be ignored where the tests run in the background
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.fixture(scope="session")
def demo_python():
    """A venv with the demo's own requirements (openai==0.28.0 ...), kept under .cache/ while they are
    unchanged: the first run installs them from the index, in about a minute."""
    requirements = os.path.join(CLIENTS, "code-act", "requirements.txt")
    with open(requirements, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()[:12]
    venv = os.path.join(ROOT, ".cache", "original-clients", f"demo-{digest}")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(os.path.join(venv, "installed")):
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
        done = subprocess.run([python, "-m", "pip", "install", "--quiet", "-r", requirements],
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        open(os.path.join(venv, "installed"), "w").close()
    return python


def copy_of(directory: str, tmp_path) -> str:
    """The client's files, unchanged, with their licence, in a directory of the test's own."""
    target = tmp_path / os.path.basename(directory)
    shutil.copytree(directory, target)
    return str(target)


def run_demo(python: str, directory: str, model_url: str, execute_url: str, question: str) -> list[dict]:
    """demo.py as its README runs it, with one question, then `exit`; the conversation it saved."""
    env = {**os.environ, "OPENAI_API_BASE": model_url, "OPENAI_API_KEY": "none", "NO_COLOR": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([python, "demo.py", "--model_name", MODEL, "--openai_base_url", model_url,
                           "--jupyter_kernel_url", execute_url], input=f"{question}\nexit\n", cwd=directory,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (saved,) = os.listdir(os.path.join(directory, "conv_data"))
    with open(os.path.join(directory, "conv_data", saved)) as handle:
        return json.load(handle)


# -- the model server returns the stop string that ended a reply (on in make serve) ---------------------


def chat(url: str, stop: list[str], stream: bool) -> tuple[str, str | None, dict]:
    body = {"model": MODEL, "temperature": 0, "max_tokens": 60, "stop": stop, "stream": stream,
            "messages": [{"role": "user", "content": "Repeat exactly, nothing else: alpha beta gamma delta epsilon"}]}
    response = requests.post(url + "/chat/completions", json=body, stream=stream, timeout=300)
    assert response.status_code == 200, response.text
    if not stream:
        reply = response.json()
        return reply["choices"][0]["message"]["content"], reply["choices"][0]["finish_reason"], reply["usage"]
    text, finish, usage = [], None, {}
    for line in response.iter_lines():
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            choice = chunk["choices"][0]
            text.append(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    return "".join(text), finish, usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_make_serves_model_server_ends_a_reply_with_its_stop_string(stack, stream):
    model_url = stack.model_url
    text, finish, usage = chat(model_url, ["gamma"], stream)
    assert text.endswith("gamma") and "delta" not in text and finish == "stop", text
    assert usage["prompt_tokens"] > 10 and usage["completion_tokens"] > 0
    # A stop string spread over several tokens, found across the chunks that carry it.
    text, finish, _ = chat(model_url, ["ta gam"], stream)
    assert text.endswith("beta gam") and finish == "stop", text
    # No stop string met: the reply is whole, as without the option.
    text, finish, _ = chat(model_url, ["zeta"], stream)
    assert "epsilon" in text and finish == "stop", text


def test_a_text_completion_ends_with_its_stop_string_too(stack):
    model_url = stack.model_url
    response = requests.post(model_url + "/completions", timeout=300, json={
        "model": MODEL, "prompt": "alpha beta gamma delta epsilon alpha beta", "temperature": 0,
        "max_tokens": 30, "stop": ["delta"]})
    choice = response.json()["choices"][0]
    assert choice["text"].endswith("delta") and choice["finish_reason"] == "stop", choice


# -- the original CLI demo --------------------------------------------------------------------------------


def test_the_original_demo_runs_code_against_make_serve(stack, demo_python, tmp_path):
    model_url, sandbox_url, _ = stack
    directory = copy_of(os.path.join(CLIENTS, "code-act"), tmp_path)
    messages = run_demo(demo_python, directory, model_url, sandbox_url + "/execute",
                        "Use Python to compute 123 * 456. Put the code in <execute> tags.")
    outputs = [m["content"] for m in messages if m["role"] == "user" and m["content"].startswith("Execution Output:")]
    assert outputs, json.dumps(messages, indent=1)
    assert "56088" in outputs[0], outputs[0]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert "</execute>" in replies[0]


# -- the chat-ui fork's code execution, with the sandbox's token in the URL -------------------------------


def run_chat_ui(model_url: str, jupyter_api_url: str, message: str, model: str = "scripted") -> dict:
    env = {**os.environ, "OPENAI_BASE_URL": model_url, "JUPYTER_API_URL": jupyter_api_url,
           "N_EXECUTION_LIMIT": "3", "MODEL": model}
    done = subprocess.run(["node", os.path.join(CLIENTS, "chat-ui", "replica.mjs"), message], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def guarded_sandbox(tmp_path_factory):
    """A sandbox with a token, as one reached over a network must have, and an execute token for chat-ui."""
    with LocalSandbox("--execute-token", EXECUTE_TOKEN, pool_size=1,
                      root_dir=str(tmp_path_factory.mktemp("guarded"))) as sandbox:
        sandbox.wait_for_pool(1)
        yield sandbox


@pytest.mark.parametrize("returned", [True, False], ids=["stop-string-returned", "stop-string-dropped"])
def test_chat_ui_runs_code_through_the_path_token_when_the_stop_string_is_returned(guarded_sandbox, returned):
    with ScriptedModelServer(return_stop_strings=returned) as model:
        model.enqueue("I will compute it.\n<execute>\nprint(123 * 456)\n</execute>", "The product is 56088.")
        result = run_chat_ui(model.url, f"{guarded_sandbox.url}/t/{EXECUTE_TOKEN}", "What is 123 * 456?")
    outputs = [m["content"] for m in result["messages"] if m["content"].startswith("Execution Output:")]
    if returned:
        assert outputs == ["Execution Output:\n56088\n\n"], result
        assert result["messages"][-1] == {"from": "assistant", "content": "The product is 56088."}
    else:  # what the fork did against servers that drop it: the block is never run
        assert outputs == [] and len(result["messages"]) == 2, result


def test_chat_ui_runs_code_against_make_serve(stack):
    """The fork's env.template parameters (temperature 0.5) on the embedded model: its first block runs. Seen
    executing in 15 runs of 15 while this test was written."""
    model_url, sandbox_url, _ = stack
    result = run_chat_ui(model_url, sandbox_url, "Use Python to compute 123 * 456. Put the code in <execute> tags.",
                         model=MODEL)
    outputs = [m["content"] for m in result["messages"] if m["content"].startswith("Execution Output:")]
    assert outputs and "56088" in outputs[0], result



def test_make_serves_chat_page_runs_a_turn_on_the_embedded_model(stack):
    """The page's server, started by make serve over its model and sandbox servers: one turn through its
    websocket, as the page sends it."""
    import websocket

    web_url = stack.web_url
    browser = requests.Session()
    browser.get(web_url + "/", timeout=10)  # the page's load sets the XSRF cookie
    conversation = browser.post(web_url + "/api/conversations", json={}, timeout=10,
                                headers={"X-XSRFToken": browser.cookies["_xsrf"]}).json()
    socket = websocket.create_connection(web_url.replace("http", "ws") + f"/api/conversations/{conversation['id']}/ws",
                                         timeout=300)
    try:
        socket.send(json.dumps({"type": "send", "text": "Use Python to compute 123 * 456. Put the code in <execute> "
                                                        "tags."}))
        seen = []
        while not seen or seen[-1].get("kind") not in ("end", "error"):
            seen.append(json.loads(socket.recv()))
    finally:
        socket.close()
    cells = [m["data"] for m in seen if m.get("kind") == "cell"]
    assert cells and "56088" in json.dumps(cells[0]["outputs"]), seen
