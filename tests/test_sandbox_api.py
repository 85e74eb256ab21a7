"""The sandbox HTTP contract: the original /execute route, auth, bad input, files, metrics, limits, shutdown."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

import pytest
import requests

from tests.conftest import processes_mentioning, start_sandbox, wait_for

# -- the original CodeAct /execute contract -------------------------------------------------------------


def compat(sandbox, convid: str, code: str) -> dict:
    # The original clients send a JSON body with no Content-Type.
    response = requests.post(sandbox.url + "/execute", data=json.dumps({"convid": convid, "code": code}),
                             headers=sandbox.headers, timeout=120)
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"result", "new_kernel_created"}
    return response.json()


def test_compat_new_conversation_gets_a_new_kernel_then_keeps_it(sandbox):
    first = compat(sandbox, "conv-a", "x = 2\nprint(x)")
    assert first == {"result": "2\n", "new_kernel_created": True}
    assert compat(sandbox, "conv-a", "x * 21") == {"result": "42", "new_kernel_created": False}
    assert compat(sandbox, "conv-b", "print('other')")["new_kernel_created"] is True


def test_compat_text_conventions(sandbox):
    from tests.test_sandbox_execute import PNG_CODE

    assert compat(sandbox, "conv-c", "y = 1")["result"] == "[Code executed successfully with no output]"
    error = compat(sandbox, "conv-c", "1/0")["result"]
    assert "ZeroDivisionError" in error and "\x1b[" not in error
    image = compat(sandbox, "conv-c", PNG_CODE)["result"]
    assert "<IPython.core.display.Image object>\n![image](data:image/png;base64,iVBOR" in image
    ordered = compat(sandbox, "conv-c", "print('first')\ndisplay('second')\nprint('third')")["result"]
    assert ordered.index("first") < ordered.index("second") < ordered.index("third")


def test_compat_timeout_text(tmp_path):
    server = start_sandbox(str(tmp_path), "--compat-timeout", "1", pool_size=1)
    try:
        result = compat(server, "slow", "import time\ntime.sleep(5)")
        assert result["result"] == "[Execution timed out (1 seconds).]"
        assert compat(server, "slow", "print('still here')")["result"] == "still here\n"
    finally:
        server.stop()


def test_compat_rejects_missing_fields(sandbox):
    response = sandbox.request("POST", "/execute", json={"code": "1"})
    assert response.status_code == 400 and response.json()["error"] == "bad_request"
    assert "convid" in response.json()["message"]


# -- bad input: JSON errors with the right status, never HTML ----------------------------------------------


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/v1/sessions", b"{not json", 400),
    ("POST", "/v1/sessions", b"[1, 2]", 400),
    ("POST", "/v1/sessions", b'{"timeout": "soon"}', 400),
    ("POST", "/v1/sessions", b'{"timeout": -1}', 400),
    ("POST", "/v1/sessions", b'{"env": {"A": 1}}', 400),
    ("POST", "/v1/sessions", b'{"network": "yes"}', 400),
    ("POST", "/v1/sessions/nope/execute", b'{"code": "1"}', 404),
    ("GET", "/v1/sessions/nope", None, 404),
    ("DELETE", "/v1/sessions/nope", None, 404),
    ("GET", "/no/such/route", None, 404),
    ("POST", "/execute", b"\xff\xfe", 400),
])
def test_bad_requests_get_json_errors(sandbox, method, path, body, status):
    response = sandbox.request(method, path, data=body)
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith("application/json")
    assert set(response.json()) == {"error", "message"} and response.json()["message"]


def test_execute_body_errors_name_the_field(sandbox):
    session = sandbox.create()
    missing = sandbox.request("POST", f"/v1/sessions/{session}/execute", json={})
    wrong = sandbox.request("POST", f"/v1/sessions/{session}/execute", json={"code": 5})
    assert missing.status_code == wrong.status_code == 400
    assert "'code'" in missing.json()["message"] and "'code'" in wrong.json()["message"]
    sandbox.close(session)


def test_oversized_body_is_413_and_server_stays_up(sandbox):
    response = sandbox.request("POST", "/v1/sessions", data=b"{" + b" " * (2 * 1024 * 1024) + b"}")
    assert response.status_code == 413 and response.json()["error"] == "too_large"
    assert requests.get(sandbox.url + "/health", timeout=5).status_code == 200


# -- auth ------------------------------------------------------------------------------------------------


EXECUTE_TOKEN = "only-for-execute-0123456789"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    server = start_sandbox(str(tmp_path_factory.mktemp("guarded")), "--execute-token", EXECUTE_TOKEN, pool_size=1,
                           token="s3cret-token")
    yield server
    server.stop()


def test_token_is_required_everywhere_but_health(guarded):
    assert requests.get(guarded.url + "/health", timeout=5).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
        response = requests.post(guarded.url + "/v1/sessions", json={}, headers=headers, timeout=10)
        assert response.status_code == 401 and response.json()["error"] == "unauthorized"
        assert requests.get(guarded.url + "/metrics", headers=headers, timeout=5).status_code == 401
        assert requests.post(guarded.url + "/execute", json={"convid": "a", "code": "1"},
                             headers=headers, timeout=5).status_code == 401


def test_right_token_works_and_never_reaches_the_kernel(guarded):
    session = guarded.create()
    result = guarded.execute(session, "import os\nprint(sorted(os.environ.items()))")
    assert "s3cret-token" not in result["stdout"]
    assert guarded.execute(session, "print(open('/proc/self/environ', 'rb').read().count(b's3cret'))")["stdout"] \
        == "0\n"
    guarded.close(session)


def test_websocket_rejects_a_wrong_token(guarded):
    import websocket

    session = guarded.create()
    url = guarded.url.replace("http", "ws") + f"/v1/sessions/{session}/ws"
    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        websocket.create_connection(url, timeout=10, header=["Authorization: Bearer wrong"])
    assert caught.value.status_code == 401
    websocket.create_connection(url + "?token=s3cret-token", timeout=10).close()
    guarded.close(session)


def test_the_execute_token_in_the_path_opens_the_original_route_and_nothing_else(guarded):
    """chat-ui reached over a network sends no headers: POST {JUPYTER_API_URL}/execute, with the token in
    JUPYTER_API_URL. That token runs code on the original route only, and never shows in the server's logs."""
    import websocket

    original = json.dumps({"convid": "path-token", "code": "print(6 * 7)"})
    # What chat-ui sends: no Authorization, a Host that is not loopback (the server is reached by name).
    response = requests.post(f"{guarded.url}/t/{EXECUTE_TOKEN}/execute", data=original, timeout=60,
                             headers={"Host": "sandbox.example:8081", "Content-Type": "application/json"})
    assert response.status_code == 200 and response.json()["result"] == "42\n"
    for wrong in ("s3cret-token", EXECUTE_TOKEN[:-1], EXECUTE_TOKEN + "x"):
        assert requests.post(f"{guarded.url}/t/{wrong}/execute", data=original, timeout=10).status_code == 401
    scoped = {"Authorization": f"Bearer {EXECUTE_TOKEN}"}
    assert requests.post(guarded.url + "/v1/sessions", json={}, headers=scoped, timeout=10).status_code == 401
    assert requests.post(guarded.url + "/execute", data=original, headers=scoped, timeout=10).status_code == 401
    assert requests.post(f"{guarded.url}/t/{EXECUTE_TOKEN}/v1/sessions", json={}, timeout=10).status_code == 404
    assert requests.post(f"{guarded.url}//t/{EXECUTE_TOKEN}/execute", data=original, timeout=10).status_code == 404
    session = guarded.create()
    ws_url = guarded.url.replace("http", "ws") + f"/v1/sessions/{session}/ws?token=s3cret-token"
    websocket.create_connection(ws_url, timeout=10).close()
    assert requests.get(f"{guarded.url}/v1/sessions/nope?token=s3cret-token", timeout=10).status_code == 401
    guarded.close(session)
    wait_for(lambda: any("/t/***/execute" in line for line in guarded.log), 10, "the access log line")
    assert not [line for line in guarded.log if EXECUTE_TOKEN in line or "s3cret-token" in line]


def test_without_an_execute_token_the_path_route_does_not_exist(sandbox):
    response = requests.post(sandbox.url + "/t/only-for-execute-0123456789/execute", timeout=10,
                             data=json.dumps({"convid": "none", "code": "1"}))
    assert response.status_code == 404 and "--execute-token" in response.json()["message"]


@pytest.mark.parametrize("args, message", [
    (["--execute-token", "short"], "at least 16 characters"),
    (["--execute-token", "has/a/slash-0123456789"], "at least 16 characters"),
    (["--token", "same-as-the-other-0123", "--execute-token", "same-as-the-other-0123"], "must differ"),
])
def test_execute_tokens_that_cannot_work_are_refused(args, message):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "sandbox_server", "--port", "0", *args], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode != 0 and message in result.stderr


def test_non_loopback_bind_without_token_refuses_to_start(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "sandbox_server", "--host", "0.0.0.0", "--port", "0"],
                            capture_output=True, text=True, timeout=30,
                            env={k: v for k, v in os.environ.items() if k != "CODEACT_SANDBOX_TOKEN"})
    assert result.returncode != 0 and "without a token" in result.stderr


def test_open_loopback_server_says_so(sandbox):
    assert any("without auth" in line for line in sandbox.log)


# -- files -----------------------------------------------------------------------------------------------


def test_files_upload_list_download_delete(sandbox):
    session = sandbox.create()
    base = f"/v1/sessions/{session}/files"
    assert sandbox.request("PUT", base + "/data/input.csv", data=b"a,b\n1,2\n").status_code == 201
    assert sandbox.execute(session, "print(open('data/input.csv').read().split()[1])")["stdout"] == "1,2\n"
    sandbox.execute(session, "open('out.txt', 'w').write('made in the kernel')")
    listing = sandbox.request("GET", base).json()["files"]
    assert {entry["path"] for entry in listing} == {"data/input.csv", "out.txt"}
    assert sandbox.request("GET", base + "/out.txt").content == b"made in the kernel"
    assert sandbox.request("DELETE", base + "/out.txt").status_code == 204
    assert sandbox.request("GET", base + "/out.txt").status_code == 404
    for method, data in (("DELETE", None), ("PUT", b"x"), ("GET", None)):  # `data` is a directory
        response = sandbox.request(method, base + "/data", data=data)
        assert response.status_code == 400 and "directory" in response.json()["message"], (method, response.text)
    sandbox.close(session)


@pytest.mark.parametrize("path", ["../escape.txt", "a/../../escape.txt", "%2Fetc%2Fpasswd", "a//b"])
def test_file_paths_that_leave_the_directory_are_refused(sandbox, path):
    session = sandbox.create()
    response = sandbox.request("PUT", f"/v1/sessions/{session}/files/{path}", data=b"x")
    assert response.status_code in (400, 404), response.text
    sandbox.close(session)


def test_symlinks_planted_by_the_kernel_cannot_escape(sandbox):
    session = sandbox.create()
    sandbox.execute(session, "import os\nos.symlink('/etc/passwd', 'passwd')\nos.symlink('/etc', 'etc')")
    base = f"/v1/sessions/{session}/files"
    assert sandbox.request("GET", base + "/passwd").status_code == 400
    assert sandbox.request("PUT", base + "/etc/evil", data=b"x").status_code == 400
    assert not os.path.exists("/etc/evil")
    sandbox.close(session)


def test_file_size_cap(tmp_path):
    server = start_sandbox(str(tmp_path), "--max-file", "1000", pool_size=1)
    try:
        session = server.create()
        response = server.request("PUT", f"/v1/sessions/{session}/files/big.bin", data=b"x" * 5000)
        assert response.status_code == 413 and "--max-file" in response.json()["message"]
        server.execute(session, "open('made.bin', 'wb').write(b'y' * 5000)")
        response = server.request("GET", f"/v1/sessions/{session}/files/made.bin")
        assert response.status_code == 413 and "--max-file" in response.json()["message"]
    finally:
        server.stop()


def test_a_large_download_streams_without_holding_the_file_in_memory(tmp_path):
    server = start_sandbox(str(tmp_path), pool_size=1)
    try:
        session = server.create()
        server.execute(session, "import os\nwith open('big.bin', 'wb') as f:\n    f.write(os.urandom(1 << 20) * 60)")
        expected = server.execute(session, "import hashlib\nprint(hashlib.sha256(open('big.bin', 'rb').read())"
                                           ".hexdigest())")["stdout"].strip()
        before = server.memory_kb("VmHWM")
        response = server.request("GET", f"/v1/sessions/{session}/files/big.bin", stream=True)
        digest, size = hashlib.sha256(), 0
        for chunk in response.iter_content(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        assert (size, digest.hexdigest()) == (60 << 20, expected)
        growth_mb = (server.memory_kb("VmHWM") - before) / 1024
        assert growth_mb < 20, f"the server's peak memory grew {growth_mb:.0f} MB for a 60 MB download"
    finally:
        server.stop()


# -- metrics, capacity, reaping, shutdown --------------------------------------------------------------------


def test_metrics_in_prometheus_text_format(sandbox):
    session = sandbox.create()
    sandbox.execute(session, "1")
    text = sandbox.request("GET", "/metrics").text
    for name in ("codeact_sessions ", "codeact_pool_ready ", 'codeact_executions_total{status="ok"}',
                 "codeact_timeouts_total", "codeact_restarts_total", "codeact_deaths_total",
                 'codeact_execute_duration_seconds_bucket{le="+Inf"}', "codeact_execute_duration_seconds_count"):
        assert name in text, name
    sandbox.close(session)


def test_session_cap_answers_429_with_retry_after_and_idle_sessions_are_reaped(tmp_path):
    server = start_sandbox(str(tmp_path), "--max-sessions", "2", "--idle-timeout", "2", pool_size=1)
    try:
        first, second = server.create(), server.create()
        response = server.request("POST", "/v1/sessions", json={})
        assert response.status_code == 429 and int(response.headers["Retry-After"]) > 0
        assert "--max-sessions" in response.json()["message"]
        deadline = time.monotonic() + 15
        alive = [first, second]
        while alive and time.monotonic() < deadline:
            alive = [s for s in alive if server.request("GET", f"/v1/sessions/{s}").status_code == 200]
            time.sleep(0.2)
        assert alive == [], "idle sessions were not reaped"
        assert server.create()
    finally:
        server.stop()


def test_sigterm_stops_within_five_seconds_without_orphans(tmp_path):
    server = start_sandbox(str(tmp_path), pool_size=2)
    sessions = [server.create() for _ in range(3)]
    server.execute(sessions[0], "import subprocess\nchild = subprocess.Popen(['sleep', '300'])")
    assert len(server.kernel_pids()) >= 5
    assert server.stop() < 5.0
    time.sleep(0.2)
    assert processes_mentioning(str(tmp_path)) == []
    assert not any(os.path.exists(os.path.join(str(tmp_path), name)) for name in os.listdir(tmp_path)
                   if name.startswith("kernel-"))


def test_kernels_die_with_a_killed_server(tmp_path):
    server = start_sandbox(str(tmp_path), pool_size=2)
    server.create()
    assert server.kernel_pids()
    server.process.kill()
    server.process.wait(10)
    deadline = time.monotonic() + 5
    while processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(str(tmp_path)) == [], "kernels outlived a SIGKILLed server"
    server.stop()  # its own files only: the process is gone


def test_where_this_machine_allows_namespaces_confined_kernels_start_in_them(capabilities):
    """Where a confined test kernel does not start, the server runs kernels without namespaces (and says so), and
    every test that needs them skips: a change that broke the confinement would leave the suite green. So where
    `unshare` makes these namespaces here, ours must work too."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("namespaces need root and util-linux's unshare")
    made = subprocess.run(["unshare", "--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--mount-proc", "true"],
                          capture_output=True, timeout=30)
    if made.returncode != 0:
        pytest.skip(f"this machine does not allow namespaces: {made.stderr.decode(errors='replace').strip()}")
    assert capabilities.namespaces, capabilities.report()


def test_the_next_server_removes_a_killed_servers_cgroups(tmp_path, capabilities):
    if not capabilities.cgroup:
        pytest.skip("no cgroups here: " + capabilities.report())
    from sandbox_server.isolation import cgroup_roots

    killed = start_sandbox(str(tmp_path / "killed"), pool_size=2)
    killed.create()
    left = [os.path.join(root, f"codeact-{killed.process.pid}") for root in cgroup_roots(capabilities.cgroup)]
    left = [path for path in left if os.path.isdir(path)]
    assert left, "the server made no cgroups"
    killed.process.kill()
    killed.process.wait(10)
    killed.stop()  # its own files only: the process is gone, its cgroups stay
    time.sleep(0.5)  # its kernels die with it (pdeathsig); their cgroups stay, empty
    assert all(os.path.isdir(path) for path in left)
    start_sandbox(str(tmp_path / "next"), pool_size=1).stop()
    assert [path for path in left if os.path.isdir(path)] == []


def test_sessions_take_directories_made_ahead_each_its_own_and_none_outlives_the_server(tmp_path):
    """--spare-homes: sessions' directories (each with its own uid lease and install socket) are made ahead. Each
    session takes one of its own, a taken one is made again, and at shutdown the spares go with the server's root,
    their uid leases released."""
    from codeact_sdk.local_sandbox import LocalSandbox
    from sandbox_server.uids import REGISTRY

    def spare_count() -> int:
        return requests.get(server.url + "/health", timeout=10).json()["spare_homes"]

    def session_directories(root: str) -> set[str]:
        return {entry.name for entry in os.scandir(root) if re.fullmatch(r"s[0-9a-f]{6}", entry.name)}

    with LocalSandbox("--spare-homes", "3", pool_size=0, root_dir=str(tmp_path)) as server:
        headers = {"Authorization": f"Bearer {server.token}"}
        wait_for(lambda: spare_count() == 3, timeout=30, what="three spare directories")
        [root] = [entry.path for entry in os.scandir(tmp_path) if entry.name.startswith("codeact-")]
        spares = session_directories(root)
        assert len(spares) == 3
        seen = []
        for _ in range(5):
            session = requests.post(server.url + "/v1/sessions", json={}, headers=headers, timeout=60).json()["id"]
            reply = requests.post(f"{server.url}/v1/sessions/{session}/execute", headers=headers, timeout=60,
                                  json={"code": "import os\nprint(os.getcwd(), os.getuid())"}).json()
            seen.append(tuple(reply["stdout"].split()))
        directories = [os.path.basename(os.path.dirname(workdir)) for workdir, _uid in seen]
        assert len(set(directories)) == 5 and len({uid for _workdir, uid in seen}) == 5, seen
        assert spares <= set(directories), "the sessions did not take the directories made ahead"
        wait_for(lambda: spare_count() == 3, timeout=30, what="the spares made again")
        made_again = session_directories(root) - set(directories)
        assert len(made_again) == 3 and not made_again & spares
        server_pid = server.process.pid
    assert not os.path.exists(root)
    if os.geteuid() == 0 and os.path.isdir(REGISTRY):  # (uids are leased when the server is root)
        held = []
        for name in os.listdir(REGISTRY):
            with open(os.path.join(REGISTRY, name)) as handle:
                text = handle.read()
            if name != "cursor" and text and json.loads(text).get("server") == server_pid:
                held.append(name)
        assert held == [], f"uid leases of spare directories outlived the server: {held}"
