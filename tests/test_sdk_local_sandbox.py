"""The private sandbox server the SDK starts: its lifetime is its owner's."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

from tests.conftest import processes_mentioning


def test_private_sandbox_and_its_kernels_die_with_a_killed_owner(tmp_path):
    script = ("from codeact_sdk.local_sandbox import LocalSandbox\n"
              f"s = LocalSandbox(root_dir={str(tmp_path)!r}).start()\n"
              "s.wait_for_pool(1)\nprint('ready', s.workspace, flush=True)\nimport time\ntime.sleep(300)\n")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    ready, workspace = owner.stdout.readline().split()
    assert ready == "ready"
    assert processes_mentioning(str(tmp_path)), "the server and its kernel run"
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    deadline = time.monotonic() + 10
    while processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(str(tmp_path)) == [], "the private sandbox outlived its owner"
    shutil.rmtree(workspace)  # its log and port file: a killed owner cannot remove them
