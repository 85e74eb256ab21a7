"""The attacks of the hardening issue, performed for real: a real server process, real kernels, hostile code
that adapts. Each test bounds its load (count and time) and cleans up; one that needs root skips without."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import websocket

from sandbox_server.testing import HealthProbe
from tests.conftest import start_sandbox

ROOT_ONLY = os.geteuid() == 0


@pytest.fixture(scope="module", params=["fork", "boot"])
def server(request, tmp_path_factory):
    """A token-less server (as `make serve` runs it) with room for the attacks' loads; every attack runs against
    kernels forked from the template (the default) and against booted ones."""
    server = start_sandbox(str(tmp_path_factory.mktemp("attacks")), "--memory-limit", str(1 << 30),
                           "--max-output", "200000", "--interrupt-grace", "0.5", "--kernel-start", request.param,
                           pool_size=2)
    way = "forked from a template" if request.param == "fork" else "booted"
    assert any(f"kernels: {way}" in line for line in server.log), "the kernels do not start the way under test"
    yield server
    server.stop()
    assert server.kernel_pids() == [], "kernels outlived the server"


@pytest.fixture(autouse=True)
def server_stays_up(server):
    yield
    assert server.process.poll() is None, "the server died"
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def workdir(server, session: str) -> str:
    return server.request("GET", f"/v1/sessions/{session}").json()["workdir"]


# -- 1. the files API against a kernel that swaps directories for links --------------------------------

SWAPPER = """
import ctypes, os, threading
os.makedirs('d', exist_ok=True)
open('d/f', 'w').write('inside')
open('d/victim', 'w').write('mine')
os.symlink({outside!r}, 'other')
libc = ctypes.CDLL(None, use_errno=True)
stop_swapping = threading.Event()
def swap():  # `d` is always there: the directory, then atomically the link, and back (RENAME_EXCHANGE)
    while not stop_swapping.is_set():
        libc.renameat2(-100, b'd', -100, b'other', 2)
threading.Thread(target=swap, daemon=True).start()
"""


@pytest.mark.skipif(not ROOT_ONLY, reason="the attack targets root-only files; needs a root server")
def test_files_api_never_leaves_the_session_directory_while_the_kernel_swaps_links(server, tmp_path):
    outside = tmp_path / "root-only"
    outside.mkdir(mode=0o700)
    (outside / "f").write_text("root secret")
    (outside / "victim").write_text("keep me")
    session = server.create()
    assert server.execute(session, SWAPPER.format(outside=str(outside)))["status"] == "ok"
    base = f"/v1/sessions/{session}/files/d/"
    deadline = time.monotonic() + 60
    for attempt in range(600):  # the code before the fix leaked within about 150 rounds
        if time.monotonic() > deadline:
            break
        read = server.request("GET", base + "f", timeout=10)
        assert read.content != b"root secret", f"read a root-only file on attempt {attempt}"
        server.request("PUT", base + f"planted-{attempt}", data=b"x", timeout=10)
        server.request("DELETE", base + "victim", timeout=10)
        assert not [p for p in os.listdir(outside) if p.startswith("planted")], f"created outside ({attempt})"
        assert (outside / "victim").exists(), f"deleted outside on attempt {attempt}"
    server.execute(session, "stop_swapping.set()")
    assert (outside / "f").read_text() == "root secret"
    server.close(session)


def test_fifos_and_sockets_are_refused_without_blocking_anyone(server):
    session = server.create()
    made = server.execute(session, "import os, socket\nos.mkfifo('pipe')\n"
                                   "s = socket.socket(socket.AF_UNIX)\ns.bind('sock')")
    assert made["status"] == "ok", made
    with HealthProbe(server.url) as probe:
        for name in ("pipe", "sock"):
            response = server.request("GET", f"/v1/sessions/{session}/files/{name}", timeout=10)
            assert response.status_code == 400, response.text
            assert "not a regular file" in response.json()["message"]
    assert probe.worst < 1.0, f"/health waited {probe.worst:.2f} s"
    listed = server.request("GET", f"/v1/sessions/{session}/files").json()
    assert [entry["path"] for entry in listed["files"]] == []
    assert server.request("DELETE", f"/v1/sessions/{session}/files/pipe").status_code == 204
    server.close(session)


DEEP_AND_WIDE = """
import os
home = os.getcwd()
os.mkdir('wide')
for i in range(12000):
    open(f'wide/{i}', 'w').close()
for _ in range(3000):
    os.mkdir('d')
    os.chdir('d')
open('bottom.txt', 'w').write('deep')
os.chdir(home)
print('built')
"""


def test_huge_and_deep_trees_are_listed_and_deleted(server):
    session = server.create()
    container = os.path.dirname(workdir(server, session))
    assert server.execute(session, DEEP_AND_WIDE, timeout=60)["stdout"] == "built\n"
    listed = server.request("GET", f"/v1/sessions/{session}/files", timeout=60)
    assert listed.status_code == 200, listed.text
    assert len(listed.json()["files"]) == 10_000 and listed.json()["truncated"] is True
    with HealthProbe(server.url) as probe:
        assert server.request("DELETE", f"/v1/sessions/{session}", timeout=60).status_code == 204
    assert probe.worst < 1.0, f"/health waited {probe.worst:.2f} s during the delete"
    assert not os.path.exists(container), "the session's tree outlived it"


# -- 2. identities unique across servers; a killed server's files out of reach ----------------------------

UID = "import os\nprint(os.getuid())"


def test_kernel_uids_are_unique_across_servers_and_a_killed_servers_files_stay_out_of_reach(tmp_path, capabilities):
    if not capabilities.drop_uid:
        pytest.skip("kernels get uids of their own only under a root server: " + capabilities.report())
    first = start_sandbox(str(tmp_path / "a"), pool_size=2)
    second = start_sandbox(str(tmp_path / "b"), pool_size=2)
    try:
        uids = [int(server.execute(server.create(), UID)["stdout"]) for server in (first, second) for _ in range(3)]
        assert len(set(uids)) == 6, f"uids shared across servers: {uids}"
        owner = first.create()
        first.execute(owner, "open('secret.txt', 'w').write('first server')")
        secret = os.path.join(workdir(first, owner), "secret.txt")
        first.process.kill()  # SIGKILL: no clean-up runs
        first.process.wait(10)
        thieves = [second.create() for _ in range(4)]
        for thief in thieves:
            stolen = second.execute(thief, f"print(open({secret!r}).read())")
            assert stolen["status"] == "error", f"a session read a killed server's file: {stolen}"
            assert stolen["error"]["name"] in ("PermissionError", "FileNotFoundError")
    finally:
        second.stop()
        first.stop()
        deadline = time.monotonic() + 10
        while first.kernel_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        if capabilities.cgroup:  # what the next server to start would do for the killed one
            from sandbox_server.isolation import remove_stale_cgroups

            remove_stale_cgroups(capabilities.cgroup)


def test_a_uid_reused_after_its_holder_died_first_seals_what_was_left(tmp_path):
    """The lease of a killed server: the next claimant of the uid makes its directory root's, mode 000."""
    if not ROOT_ONLY:
        pytest.skip("sealing changes ownership: needs root")
    import subprocess
    import sys

    from sandbox_server.uids import UidLeases

    registry, home = str(tmp_path / "registry"), tmp_path / "left-behind"
    home.mkdir(mode=0o711)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom sandbox_server.uids import UidLeases\n"
        f"print(UidLeases(300000, {registry!r}, span=1).claim({str(home)!r}), flush=True)\ntime.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert int(holder.stdout.readline()) == 300000
        leases = UidLeases(300000, registry, span=1)
        with pytest.raises(RuntimeError, match="in use"):
            leases.claim("/elsewhere")  # the live holder keeps it
    finally:
        holder.kill()
        holder.wait(10)
    assert leases.claim("/elsewhere") == 300000  # the kernel dropped the dead holder's lock
    info = os.stat(home)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0)
    leases.release(300000)
    assert os.listdir(registry) == ["cursor"], "a released lease left its file (the registry would only grow)"
    leases.close()


# -- 3. nothing a kernel makes stalls the event loop ------------------------------------------------------

def test_escape_floods_are_processed_in_linear_time_without_stalling_others(server):
    bystander = server.create()
    session = server.create()
    with HealthProbe(server.url) as probe:
        result = server.execute(session, "print('\\x1b]' * 100_000)\nprint('\\x1b[31m' * 100_000)", timeout=60)
        assert server.execute(bystander, "print('fine')")["stdout"] == "fine\n"
    assert result["status"] == "ok"
    assert probe.worst < 1.0, f"/health waited {probe.worst:.2f} s"
    server.close(session)
    server.close(bystander)


# -- 4. /tmp and /dev/shm private, sized, gone with the session --------------------------------------------

@pytest.mark.skipif(not ROOT_ONLY, reason="private mounts need namespaces (root)")
def test_tmp_and_shm_are_private_counted_and_gone_with_the_session(server, capabilities):
    if not capabilities.namespaces:
        pytest.skip("no namespaces here: " + capabilities.report())
    marker = f"codeact-test-{os.getpid()}"
    session, other = server.create(), server.create()
    wrote = server.execute(session, f"open('/tmp/{marker}', 'w').write('t')\nopen('/dev/shm/{marker}', 'w').write('s')")
    assert wrote["status"] == "ok", wrote
    assert not os.path.exists(f"/tmp/{marker}") and not os.path.exists(f"/dev/shm/{marker}"), "reached the host"
    paths = (f"/tmp/{marker}", f"/dev/shm/{marker}")
    peek = server.execute(other, f"import os\nprint(*(os.path.exists(path) for path in {paths!r}))")
    assert peek["stdout"] == "False False\n"
    # More shared memory than the session may use: refused or the kernel is stopped, never pinned on the host.
    hog = server.execute(session, "import os\nwith open('/dev/shm/hog', 'wb') as f:\n"
                                  "    for _ in range(1200):\n        f.write(b'z' * (1 << 20))", timeout=60)
    assert hog["status"] in ("error", "died"), hog
    server.close(session)
    server.close(other)


# Each mount the kernel can reach by its path: one that a later mount hides (a closed directory's cover, beneath
# the private /tmp) is out of reach, and is told apart by the device its path now leads to.
MOUNTS = """
import os
for line in open('/proc/self/mountinfo'):
    fields = line.split()
    major, minor = map(int, fields[2].split(':'))
    try:
        reached = os.stat(fields[4]).st_dev == os.makedev(major, minor)
    except OSError:
        reached = False
    if reached:
        print(fields[4], fields[5].split(',')[0], fields[fields.index('-') + 1])
"""


def test_every_mount_a_kernel_sees_is_read_only_but_its_own(server, capabilities):
    """The host's file systems, all of them, are read-only in a kernel: only its session's directories (under
    the server's root), its private /tmp and /dev/shm, and the kernel's interfaces (proc, devpts, mqueue) are
    writable. Where no uid can be dropped a kernel runs as root, and then this is all that keeps the host's files
    from it."""
    if not capabilities.namespaces:
        pytest.skip("no namespaces here: " + capabilities.report())
    session = server.create()
    seen = server.execute(session, MOUNTS)
    assert seen["status"] == "ok", seen
    mounts = [line.split(" ") for line in seen["stdout"].splitlines()]
    root = os.path.realpath(server.root_dir)
    writable = [(point, kind) for point, access, kind in mounts
                if access == "rw" and kind not in ("proc", "devpts", "mqueue") and point not in ("/tmp", "/dev/shm")
                and not point.startswith(root + "/")]
    assert writable == [], f"writable in the kernel: {writable}"
    access = {point: access for point, access, _kind in mounts}
    assert access["/"] == "ro" and access[workdir(server, session)] == "rw", access
    assert len(mounts) > 5, mounts  # (the host's mounts are there, each made read-only)
    server.close(session)


SHAPE_MOUNTS = MOUNTS.replace("import os", """import ctypes, os, sys
from sandbox_server import confine
ctypes.CDLL(None, use_errno=True).unshare(0x20000)  # CLONE_NEWNS: this process's own mounts
confine.mount("none", "/", None, 1 << 18 | confine.MS_REC)  # MS_PRIVATE: nothing goes back to the host
if sys.argv[2] == "remounts":
    confine.set_read_only = lambda *args, **kwargs: False  # as where Linux has no mount_setattr
confine.shape_mounts([sys.argv[1]], {"/tmp": 1 << 20, "/dev/shm": 1 << 20}, {}, [])
for path in ("/", "/tmp", "/dev/shm", sys.argv[1]):
    try:
        open(os.path.join(path, "written"), "w").close()
        print("wrote", path)
    except OSError as error:
        print("refused", path, error.strerror.replace(" ", "-"))""", 1)


@pytest.mark.skipif(not ROOT_ONLY, reason="a mount namespace of its own needs root")
@pytest.mark.parametrize("way", ["at-once", "remounts"])
def test_the_host_is_made_read_only_in_one_call_or_a_remount_each(tmp_path, capabilities, way):
    """shape_mounts, in a process of its own as root, where nothing but read-only mounts stops a write: with
    mount_setattr (one call for the whole tree) and, as on Linux before 5.12, with a remount of each mount."""
    if not capabilities.namespaces:
        pytest.skip("no namespaces here: " + capabilities.report())
    import subprocess
    import sys

    mine = tmp_path / "mine"
    mine.mkdir()
    done = subprocess.run([sys.executable, "-c", SHAPE_MOUNTS, str(mine), way], capture_output=True, text=True,
                          timeout=30, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
    lines = [line.split(" ") for line in done.stdout.splitlines()]
    writes = {line[1]: " ".join(line[:1] + line[2:]) for line in lines if line[0] in ("wrote", "refused")}
    assert writes == {"/": "refused Read-only-file-system", "/tmp": "wrote", "/dev/shm": "wrote",
                      str(mine): "wrote"}, done.stdout
    assert (mine / "written").exists() and not os.path.exists("/written"), "not the host's files as they should be"
    mounts = [line for line in lines if line[0] not in ("wrote", "refused")]
    writable = [(point, kind) for point, access, kind in mounts if access == "rw" and kind not in
                ("proc", "devpts", "mqueue") and point not in ("/tmp", "/dev/shm", str(mine))]
    assert writable == [], f"writable: {writable}"


def test_an_interpreter_under_tmp_stays_visible_and_read_only_inside_the_private_tmp(tmp_path, capabilities):
    """A virtual environment under /tmp (a clone in /tmp, as CI makes) must survive the private /tmp."""
    if not capabilities.namespaces:
        pytest.skip("no namespaces here: " + capabilities.report())
    import subprocess
    import sys
    import tempfile

    from sandbox_server import kernel_env
    from sandbox_server.isolation import Isolation

    with tempfile.TemporaryDirectory(prefix="codeact-venv-", dir="/tmp") as venv:
        with open(os.path.join(venv, "marker"), "w") as handle:
            handle.write("visible")
        work, runtime = tmp_path / "work", tmp_path / "k1"
        work.mkdir()
        runtime.mkdir()
        isolation = Isolation(dataclasses.replace(capabilities, cgroup=None), kernel_env.inspect(), 1 << 31, 1 << 20,
                              64)
        launch = isolation.launch("probe", str(work), str(work), str(runtime / "connection.json"), None,
                                  network=False)
        spec = json.loads(launch.argv[-1])
        spec["readable"] = [*spec["readable"], venv]
        spec["argv"] = [sys.executable, "-c", f"print(open({venv + '/marker'!r}).read())\n"
                        f"try:\n    open({venv + '/new'!r}, 'w')\nexcept OSError as error:\n    print(error.strerror)"]
        done = subprocess.run([*launch.argv[:-1], json.dumps(spec)], capture_output=True, text=True, timeout=30)
        assert done.stdout.split("\n")[:2] == ["visible", "Read-only file system"], done.stdout + done.stderr


# -- 5. ordinary code that broke sessions for good ----------------------------------------------------------

ORPHANS = """
import os, subprocess, time
for _ in range(150):
    subprocess.run('sleep 0.01 &', shell=True, check=True)
time.sleep(0.5)
zombies = 0
for pid in os.listdir('/proc'):
    if pid.isdigit():
        try:
            zombies += open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] == 'Z'
        except OSError:
            pass
print(zombies, subprocess.run(['true']).returncode)
"""


def test_orphaned_children_are_reaped_and_the_session_can_still_fork(server, capabilities):
    if not capabilities.namespaces:
        pytest.skip("no pid namespace here: orphans go to the host's init")
    session = server.create()
    result = server.execute(session, ORPHANS, timeout=60)
    assert result["status"] == "ok", result
    assert result["stdout"] == "0 0\n", result["stdout"]
    server.close(session)


def test_cells_with_top_level_await_leave_printing_and_the_output_cap_working(server):
    """A cell with top-level `await` runs without IPython's per-cell wrapper of the output streams: the output
    cap's writer, left attached after such a cell, became the next cell's original write, and every later
    print in the session recursed until it failed."""
    session = server.create()
    first = server.execute(session, "import asyncio\nawait asyncio.sleep(0)\nprint('awaited')")
    assert first["status"] == "ok" and first["stdout"] == "awaited\n", first["text"]
    second = server.execute(session, "print('after')")
    assert second["status"] == "ok" and second["stdout"] == "after\n", second["text"]
    flood = server.execute(session, "import asyncio\nawait asyncio.sleep(0)\nprint('x' * 1_000_000)")
    assert flood["truncated"] is True and "output truncated" in flood["stdout"]
    assert server.execute(session, "print('still')")["stdout"] == "still\n"
    server.close(session)


def test_an_interrupt_stops_a_cell_that_awaits_and_the_session_keeps_its_state(server):
    """On SIGINT ipykernel cancels an awaiting cell from a callback it schedules on the event loop, which nothing
    woke: the cell went on until its await ended, and an execute timeout then restarted the kernel, losing the
    session's state. The kernels' set-up makes every signal wake the loop."""
    session = server.create()
    server.execute(session, "x = 41")
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(
        server.execute(session, "import asyncio\nawait asyncio.sleep(120)", timeout=300)), daemon=True)
    worker.start()
    time.sleep(1.0)
    assert server.request("POST", f"/v1/sessions/{session}/interrupt").status_code == 200
    worker.join(30)
    assert not worker.is_alive(), "the awaiting cell outlived the interrupt"
    assert outcome["status"] == "error" and outcome["error"]["name"] == "CancelledError", outcome
    assert server.execute(session, "x + 1")["results"][0]["data"]["text/plain"] == "42"
    server.close(session)


def test_a_value_over_the_message_limit_is_cut_with_a_marker_and_the_session_keeps_working(server):
    session = server.create()
    result = server.execute(session, "'x' * (70 << 20)", timeout=60)
    assert result["status"] == "ok" and result["truncated"] is True
    text = result["results"][0]["data"]["text/plain"]
    assert "output truncated" in text and len(text) < 9 << 20
    assert server.execute(session, "print('still here')")["stdout"] == "still here\n"
    server.close(session)


HOSTILE_FLOOD = """
import threading
kernel = get_ipython().kernel
kernel.session.__dict__.pop("serialize", None)  # the kernel-side message cap, removed
def flood():
    for _ in range(60):
        kernel.session.send(kernel.iopub_socket, 'stream', {'name': 'stdout', 'text': 'y' * (7 << 20)})
threading.Thread(target=flood).start()
"""


def test_server_memory_stays_bounded_when_the_kernel_removes_its_caps(server):
    session = server.create()
    server.execute(session, "print('warm')")
    before = server.memory_kb("VmRSS")
    with HealthProbe(server.url) as probe:
        assert server.execute(session, HOSTILE_FLOOD)["status"] == "ok"
        time.sleep(3)  # 420 MB offered while no execute reads
        after_flood = server.execute(session, "print('after')", timeout=60)
    growth_mb = (server.memory_kb("VmHWM") - before) / 1024
    assert after_flood["stdout"].endswith("after\n"), after_flood
    assert growth_mb < 250, f"the server grew {growth_mb:.0f} MB"
    assert probe.worst < 1.0, f"/health waited {probe.worst:.2f} s"
    server.close(session)


# -- 6. lifecycle races ---------------------------------------------------------------------------------------

def test_delete_or_restart_during_an_execute_ends_it_with_a_clear_status(server):
    for action, status in (("DELETE", "closed"), ("restart", "died")):
        session = server.create()
        with ThreadPoolExecutor(1) as executor:
            running = executor.submit(server.request, "POST", f"/v1/sessions/{session}/execute",
                                      json={"code": "import time\ntime.sleep(20)"})
            time.sleep(0.5)
            if action == "DELETE":
                assert server.request("DELETE", f"/v1/sessions/{session}").status_code == 204
            else:
                assert server.request("POST", f"/v1/sessions/{session}/restart").status_code == 200
            response = running.result(30)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == status and response.json()["message"]
        if action == "restart":
            assert server.execute(session, "print('fresh')")["stdout"] == "fresh\n"
            server.close(session)


def test_the_websocket_gets_done_when_its_session_is_deleted_mid_execute(server):
    session = server.create()
    ws = websocket.create_connection(server.url.replace("http", "ws") + f"/v1/sessions/{session}/ws", timeout=30)
    ws.send(json.dumps({"type": "execute", "code": "import time\ntime.sleep(20)"}))
    time.sleep(0.5)
    assert server.request("DELETE", f"/v1/sessions/{session}").status_code == 204
    event = json.loads(ws.recv())
    assert event["type"] == "done" and event["status"] == "closed", event
    ws.close()


# -- 7. a token-less server and web pages ---------------------------------------------------------------------

def test_a_token_less_server_refuses_foreign_hosts_cross_origin_pages_and_network_sessions(server):
    port = server.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.nip.io:{port}"):
        response = requests.get(server.url + "/v1/sessions", headers={"Host": host}, timeout=10)
        assert response.status_code == 403 and response.json()["error"] == "forbidden", host
    # The cross-site form post a page can make without a preflight.
    forged = requests.post(server.url + "/execute", data='{"convid": "x", "code": "open(\'pwned\', \'w\')"}',
                           headers={"Content-Type": "text/plain", "Origin": "https://evil.example"}, timeout=10)
    assert forged.status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(server.url.replace("http", "ws") + f"/v1/sessions/{server.create()}/ws",
                                    origin="https://evil.example", timeout=10)
    assert refused.value.status_code == 403
    # What must keep working: the original clients (no Origin) and same-origin requests on loopback names.
    assert requests.post(server.url + "/execute", data='{"convid": "ok", "code": "print(1)"}',
                         timeout=30).json()["result"] == "1\n"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert requests.get(server.url + "/health", headers={"Host": host, "Origin": f"http://{host}"},
                            timeout=10).status_code == 200
    network = server.request("POST", "/v1/sessions", json={"network": True})
    assert network.status_code == 403 and "token" in network.json()["message"]


# -- 8. malformed JSON ------------------------------------------------------------------------------------------

def test_lone_surrogates_and_deep_nesting_are_client_errors_and_the_websocket_stays_open(server):
    session = server.create()
    bodies = [b'{"code": "\\ud800"}', b"[" * 100_000 + b"]" * 100_000, b'{"code": ' + b"[" * 5000 + b"]" * 5000 + b"}"]
    for path in (f"/v1/sessions/{session}/execute", "/execute", "/v1/sessions"):
        for body in bodies:
            response = server.request("POST", path, data=body, timeout=10)
            assert response.status_code == 400 and response.json()["error"] == "bad_request", (path, response.text)
    ws = websocket.create_connection(server.url.replace("http", "ws") + f"/v1/sessions/{session}/ws", timeout=30)
    for raw in ('{"type": "execute", "code": "\\ud800"}', "[" * 100_000, '{"type": "input_reply", "value": "\\udfff"}'):
        ws.send(raw)
        assert json.loads(ws.recv())["type"] == "protocol_error"
    ws.send(json.dumps({"type": "execute", "code": "print('open')"}))
    events = [json.loads(ws.recv()) for _ in range(2)]
    assert events[0] == {"type": "stdout", "text": "open\n"} and events[1]["type"] == "done"
    ws.close()
    server.close(session)


# -- 9. defence in depth ----------------------------------------------------------------------------------------

DENIED_CALLS = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def outcome(result):
    return 'ok' if result == 0 else errno.errorcode[ctypes.get_errno()]
print('unshare', outcome(libc.unshare(0x10000000)))
print('mount', outcome(libc.mount(b'none', b'/mnt', b'tmpfs', 0, None)))
print('ptrace', outcome(libc.ptrace(16, 1, 0, 0)))
print('bpf', outcome(libc.syscall({bpf}, 0, 0, 0)))
print('io_uring', outcome(libc.syscall(425, 1, 0)))
print('keyctl', outcome(libc.syscall({keyctl}, 0, 0)))
print([line for line in open('/proc/self/status') if line.startswith('NoNewPrivs')][0].split()[1])
import multiprocessing
queue = multiprocessing.Queue()
process = multiprocessing.Process(target=queue.put, args=('children still start',))
process.start()
print(queue.get(timeout=20))
process.join()
"""


CGROUPS_OF_EVERY_TASK = """
import json, os, subprocess, threading
stop = threading.Event()
threads = [threading.Thread(target=stop.wait) for _ in range(2)]
for thread in threads:
    thread.start()
child = subprocess.run(['cat', '/proc/self/cgroup'], capture_output=True, text=True).stdout
tasks = {task: open(f'/proc/self/task/{task}/cgroup').read() for task in os.listdir('/proc/self/task')}
stop.set()
print(json.dumps({'tasks': tasks, 'child': child}))
"""


def cgroup_lines(text: str, version: str, roots: list[str]) -> set[str]:
    """The lines of a /proc/.../cgroup for our hierarchies (v1: by controller; v2: the unified one)."""
    if version == "v2":
        return {line for line in text.splitlines() if line.startswith("0::")}
    names = {os.path.basename(root) for root in roots}
    return {line for line in text.splitlines() if set(line.split(":")[1].split(",")) & names}


def test_every_thread_and_child_of_a_kernel_is_in_its_own_cgroups(server, capabilities):
    """A kernel is moved into its cgroups while it has one thread (its threads start later), by the cheapest
    move Linux has for that; what it starts after, threads or processes, is in them too."""
    if not capabilities.cgroup:
        pytest.skip("no cgroups here: " + capabilities.report())
    from sandbox_server.isolation import cgroup_roots

    roots = cgroup_roots(capabilities.cgroup, capabilities.cgroup_cpu)
    session = server.create()
    found = json.loads(server.execute(session, CGROUPS_OF_EVERY_TASK)["stdout"])
    assert len(found["tasks"]) >= 3
    every = [cgroup_lines(text, capabilities.cgroup, roots) for text in [*found["tasks"].values(), found["child"]]]
    assert all(lines == every[0] for lines in every), f"a kernel's threads and child in different cgroups: {found}"
    lines = every[0]
    assert lines and all(f"/codeact-{server.process.pid}/k" in line for line in lines), lines
    server.close(session)


JOIN_WITH_ONE_THREAD_THEN_TWO = """
import json, os, sys, threading
from sandbox_server import confine, isolation
version, cpu = sys.argv[1], sys.argv[2] == "cpu"
roots = isolation.cgroup_roots(version, cpu)
parents = isolation.make_cgroup_parents(version, f"codeact-{os.getpid()}", cpu)
children = [os.path.join(parent, "k1") for parent in parents]
for child in children:
    os.mkdir(child)
def where():
    return sorted(open(f"/proc/self/task/{task}/cgroup").read() for task in os.listdir("/proc/self/task"))
stop = threading.Event()
seen = []
try:
    confine.join_cgroups(children)  # one thread
    threading.Thread(target=stop.wait).start()
    seen.append(where())
    confine.join_cgroups(roots)  # two threads: back out
    seen.append(where())
    confine.join_cgroups(children)  # two threads: in again
    seen.append(where())
    confine.join_cgroups(roots)
finally:
    stop.set()
    isolation.Isolation.remove_cgroups([*children, *parents])
print(json.dumps(seen))
"""


@pytest.mark.skipif(not ROOT_ONLY, reason="moving a process between cgroups needs root")
def test_joining_cgroups_moves_every_thread_of_the_process(capabilities):
    """confine.join_cgroups moves one thread where the process has only that one (cgroup v1's `tasks`), and the
    whole process where it has more; either way every thread ends in the cgroups, and those started later too."""
    if not capabilities.cgroup:
        pytest.skip("no cgroups here: " + capabilities.report())
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", JOIN_WITH_ONE_THREAD_THEN_TWO, capabilities.cgroup,
                             "cpu" if capabilities.cgroup_cpu else "-"], capture_output=True, text=True, timeout=60,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    inside, outside, inside_again = json.loads(result.stdout)
    for seen, expected in ((inside, True), (outside, False), (inside_again, True)):
        assert len(seen) == 2 and seen[0] == seen[1], seen  # both threads, in the same cgroups
        assert ("/k1\n" in seen[0]) is expected, seen[0]


def test_kernels_run_with_no_new_privs_and_the_seccomp_filter(server, capabilities):
    if not capabilities.seccomp:
        pytest.skip("no seccomp here: " + capabilities.report())
    from sandbox_server.seccomp import DENIED

    column = 0 if os.uname().machine == "x86_64" else 1
    code = DENIED_CALLS.format(bpf=DENIED["bpf"][column], keyctl=DENIED["keyctl"][column])
    session = server.create()
    lines = server.execute(session, code)["stdout"].splitlines()
    assert lines == ["unshare EPERM", "mount EPERM", "ptrace EPERM", "bpf EPERM", "io_uring EPERM",
                     "keyctl EPERM", "1", "children still start"], lines
    server.close(session)


def test_a_kernel_cannot_signal_its_init_away_or_reach_the_host_through_it(server, capabilities):
    if not capabilities.namespaces:
        pytest.skip("no pid namespace here")
    """PID 1 of a kernel's namespace ends the kernel when it ends. A booted kernel's init ignores the signal (an
    init gets only the signals it handles); a forked kernel's lifeline is root's, so the kill is refused. The
    lifeline lives in the host's mount namespace: its /proc entries must stay closed to the kernel."""
    session = server.create()
    server.execute(session, "kept = 41")
    result = server.execute(session, INIT_ATTACK)
    assert result["status"] == "ok", result
    outcome, init_alive, through_init = json.loads(result["stdout"])
    assert outcome in ("ignored", "refused") and init_alive, result["stdout"]
    assert through_init in ("closed", "own root"), "the kernel reached a root beyond its own through PID 1"
    assert server.execute(session, "kept + 1")["results"][0]["data"]["text/plain"] == "42"
    server.close(session)


INIT_ATTACK = """
import json, os, signal, time
try:
    os.kill(1, signal.SIGKILL)
    outcome = "ignored"
except PermissionError:
    outcome = "refused"
time.sleep(0.2)
try:
    through_init = "own root" if sorted(os.listdir("/proc/1/root")) == sorted(os.listdir("/")) else "host root"
except OSError:
    through_init = "closed"
print(json.dumps([outcome, os.path.exists("/proc/1"), through_init]))
"""


def test_the_server_port_is_closed_to_kernels_without_the_network(server, capabilities):
    if not capabilities.namespaces:
        pytest.skip("no network namespace here")
    port = int(server.url.rsplit(":", 1)[1])
    session = server.create()
    code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    print('open')\n"
            "except OSError:\n    print('closed')")
    assert server.execute(session, code)["stdout"] == "closed\n"
    server.close(session)


OWN_LOOPBACK = """
import multiprocessing, socket, threading
def child():
    print('from a forked child', flush=True)
process = multiprocessing.get_context('fork').Process(target=child)
process.start()
process.join()
listener = socket.create_server(('127.0.0.1', 0))
threading.Thread(target=lambda: listener.accept()[0].sendall(b'hello'), daemon=True).start()
print(socket.create_connection(listener.getsockname(), timeout=5).recv(5).decode())
"""


def test_a_sessions_processes_reach_one_another_on_its_own_loopback(server):
    """Without the network a kernel has a network namespace of its own, its loopback up: what a forked child
    prints comes back (ipykernel forwards it over 127.0.0.1) and a server the session starts answers its client;
    the server's own port is still not there (test_the_server_port_is_closed_to_kernels_without_the_network)."""
    session = server.create()
    result = server.execute(session, OWN_LOOPBACK, timeout=30)
    assert result["stdout"] == "from a forked child\nhello\n", result
    server.close(session)


def test_a_killed_servers_leftovers_are_removed_by_the_next_server(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    killed = start_sandbox(str(base), pool_size=1)
    killed.execute(killed.create(), "open('left.txt', 'w').write('x')")
    killed.process.send_signal(signal.SIGKILL)
    killed.process.wait(10)
    deadline = time.monotonic() + 10
    while killed.kernel_pids() and time.monotonic() < deadline:  # dying with it (pdeathsig); then its cgroups
        time.sleep(0.05)                                          # are empty and the successor removes them too
    roots = [entry for entry in os.listdir(base) if entry.startswith("codeact-")]
    assert len(roots) == 1
    old = time.time() - 3600
    os.utime(base / roots[0], (old, old))  # the sweep leaves roots younger than a minute alone
    successor = start_sandbox(str(base), pool_size=1)
    try:
        deadline = time.monotonic() + 30
        while (base / roots[0]).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not (base / roots[0]).exists(), "a killed server's root outlived the next start"
    finally:
        successor.stop()
        killed.stop()
