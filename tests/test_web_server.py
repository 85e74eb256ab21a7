"""`codeact web`'s server, started as a user starts it, over HTTP: conversations, exports, who may call."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest
import requests

from codeact_sdk.transcript import read
from codeact_sdk.web.store import Store


class Web:
    """A `codeact web` process on a free port, and a browser-like client: cookies kept, XSRF header sent."""

    def __init__(self, db: str, *args: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "codeact_sdk", "web", "--port", "0", "--db", db,
                                         "--llm-url", "http://127.0.0.1:9/v1", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line + self.process.stderr.read()
        self.url = f"http://127.0.0.1:{match.group(1)}"
        self.browser = requests.Session()

    def call(self, method: str, path: str, **kwargs) -> requests.Response:
        if method != "GET" and "_xsrf" not in self.browser.cookies:
            self.browser.get(self.url + "/api/conversations", timeout=10)  # as the page's first load does
        headers = {"X-XSRFToken": self.browser.cookies.get("_xsrf", ""), **kwargs.pop("headers", {})}
        return self.browser.request(method, self.url + path, headers=headers, timeout=10, **kwargs)

    def stop(self) -> None:
        if self.process.stdout.closed:
            return  # stopped already
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(10) == 0, self.process.stderr.read()
        self.process.stdout.close()
        self.process.stderr.close()


@pytest.fixture
def web(tmp_path):
    server = Web(str(tmp_path / "web.sqlite3"), "--model", "qwen", "--max-executions", "4")
    yield server
    server.stop()


def test_conversations_are_created_renamed_listed_deleted_and_survive_a_restart(web, tmp_path):
    created = web.call("POST", "/api/conversations", json={"title": "Sales"})
    assert created.status_code == 201, created.text
    conversation = created.json()
    assert conversation["settings"] == {"model": "qwen", "max_executions": 4, "llm_url": "http://127.0.0.1:9/v1"}
    other = web.call("POST", "/api/conversations", json={}).json()
    renamed = web.call("PATCH", f"/api/conversations/{conversation['id']}",
                       json={"title": "Sales by month", "settings": {"timeout": 30}})
    assert renamed.json()["title"] == "Sales by month" and renamed.json()["settings"]["timeout"] == 30
    listed = web.call("GET", "/api/conversations").json()["conversations"]
    assert [c["id"] for c in listed] == [conversation["id"], other["id"]]
    assert web.call("DELETE", f"/api/conversations/{other['id']}").status_code == 204
    assert web.call("GET", f"/api/conversations/{other['id']}").status_code == 404
    web.stop()

    restarted = Web(str(tmp_path / "web.sqlite3"))
    try:
        shown = restarted.call("GET", f"/api/conversations/{conversation['id']}").json()
        assert shown["conversation"]["title"] == "Sales by month" and shown["items"] == []
        assert [c["id"] for c in restarted.call("GET", "/api/conversations").json()["conversations"]] == [
            conversation["id"]]
    finally:
        restarted.stop()


@pytest.mark.parametrize("body, says", [
    (b"{not json", "not valid JSON"), (b"[1]", "must be a JSON object"), (b'{"title": 5}', "'title' must be"),
    (b'{"settings": {"sandbox_url": "http://x"}}', "unknown setting 'sandbox_url'"),
    (b'{"settings": {"max_executions": "5"}}', "wrong type"), (b'{"settings": {"timeout": true}}', "wrong type"),
])
def test_bad_input_is_a_400_that_says_what(web, body, says):
    response = web.call("POST", "/api/conversations", data=body)
    assert response.status_code == 400 and says in response.json()["message"], response.text
    assert web.call("GET", "/api/conversations").status_code == 200


def test_exports_as_transcript_and_sharegpt(web, tmp_path):
    conversation = web.call("POST", "/api/conversations", json={"title": 'Q3 "report"\n'}).json()
    # A turn's history, as the page's turns will save it (the store is the server's own file).
    history = [{"role": "system", "content": "s"}, {"role": "user", "content": "Sum ✓"},
               {"role": "assistant", "content": "<solution>3</solution>"}]
    store = Store(str(tmp_path / "web.sqlite3"))
    store.save_messages(conversation["id"], history)
    store.close()
    jsonl = web.call("GET", f"/api/conversations/{conversation['id']}/export?format=jsonl")
    assert jsonl.headers["Content-Disposition"] == 'attachment; filename="Q3--report-.jsonl"'
    (tmp_path / "export.jsonl").write_bytes(jsonl.content)
    assert read(str(tmp_path / "export.jsonl"))[1] == history
    shared = web.call("GET", f"/api/conversations/{conversation['id']}/export?format=sharegpt").json()
    assert [turn["from"] for turn in shared["conversations"]] == ["system", "human", "gpt"]
    assert web.call("GET", f"/api/conversations/{conversation['id']}/export?format=csv").status_code == 400


def test_pages_elsewhere_cannot_call_a_server_without_a_token(web):
    # No XSRF header (a form or fetch from another site cannot read the cookie to send it).
    forged = requests.post(web.url + "/api/conversations", data=b"{}", timeout=10,
                           cookies=web.browser.cookies, headers={"Content-Type": "text/plain"})
    assert forged.status_code == 403 and "_xsrf" in forged.json()["message"]
    # Another origin, and a domain that resolves to 127.0.0.1 (DNS rebinding).
    assert web.call("GET", "/api/conversations", headers={"Origin": "https://evil.example"}).status_code == 403
    assert web.call("GET", "/api/conversations", headers={"Host": "evil.example:8090"}).status_code == 403
    assert web.call("GET", "/api/conversations").status_code == 200


def test_with_a_token_only_a_login_opens_it(tmp_path):
    web = Web(str(tmp_path / "web.sqlite3"), "--token", "s3cret-web-token")
    try:
        assert requests.get(web.url + "/api/conversations", timeout=10).status_code == 401
        assert requests.get(web.url + "/login?token=wrong", timeout=10).status_code == 401
        login = web.browser.get(web.url + "/login?token=s3cret-web-token", timeout=10, allow_redirects=False)
        assert login.status_code == 302 and login.headers["Location"] == "/"
        cookie = login.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "s3cret-web-token" not in cookie
        assert web.call("POST", "/api/conversations", json={"title": "logged in"}).status_code == 201
        # A script sends the token itself; no XSRF needed for a header no page can send cross-site.
        bearer = requests.post(web.url + "/api/conversations", json={}, timeout=10,
                               headers={"Authorization": "Bearer s3cret-web-token"})
        assert bearer.status_code == 201
        assert requests.get(web.url + "/api/conversations", headers={"Authorization": "Bearer wrong"},
                            timeout=10).status_code == 401
    finally:
        web.stop()


def test_beyond_loopback_without_a_token_it_refuses_to_start(tmp_path):
    done = subprocess.run([sys.executable, "-m", "codeact_sdk", "web", "--host", "0.0.0.0", "--port", "0",
                           "--db", str(tmp_path / "w.sqlite3")], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "without a token" in done.stderr


def test_the_json_errors_never_echo_markup_as_html(web):
    response = web.call("GET", "/api/conversations/" + "0" * 32)
    assert response.status_code == 404 and response.headers["Content-Type"] == "application/json"
    assert json.loads(response.text)["message"] == f"no conversation {'0' * 32!r}"
