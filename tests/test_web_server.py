"""`codeact web`'s server, started as a user starts it, over HTTP: conversations, exports, who may call."""

from __future__ import annotations

import json
import os
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

    def __init__(self, db: str, *args: str, sandbox=None, llm_url: str = "http://127.0.0.1:9/v1") -> None:
        # With a sandbox given, the server uses it; without, it starts a private one.
        env = {**os.environ, "CODEACT_SANDBOX_URL": sandbox.url, "CODEACT_SANDBOX_TOKEN": sandbox.token} \
            if sandbox is not None else dict(os.environ)
        self.process = subprocess.Popen([sys.executable, "-m", "codeact_sdk", "web", "--port", "0", "--db", db,
                                         "--llm-url", llm_url, *args], env=env,
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

    def stop(self) -> str:
        """Stop it; what it logged."""
        if self.process.stdout.closed:
            return ""  # stopped already
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(10)
        log = self.process.stderr.read()
        assert code == 0, log
        self.process.stdout.close()
        self.process.stderr.close()
        return log


@pytest.fixture
def web(tmp_path, local_sandbox):
    server = Web(str(tmp_path / "web.sqlite3"), "--model", "qwen", "--max-executions", "4", sandbox=local_sandbox)
    yield server
    server.stop()


def test_conversations_are_created_renamed_listed_deleted_and_survive_a_restart(web, tmp_path):
    created = web.call("POST", "/api/conversations", json={"title": "Sales"})
    assert created.status_code == 201, created.text
    conversation = created.json()
    # Only what was set for it: the server's own (--model, --max-executions) apply when it runs, so a server
    # restarted with another model URL does not leave its conversations pointing at the old one.
    assert conversation["settings"] == {}
    other = web.call("POST", "/api/conversations", json={}).json()
    renamed = web.call("PATCH", f"/api/conversations/{conversation['id']}",
                       json={"title": "Sales by month", "settings": {"timeout": 30}})
    assert renamed.json()["title"] == "Sales by month" and renamed.json()["settings"]["timeout"] == 30
    listed = web.call("GET", "/api/conversations").json()["conversations"]
    assert [c["id"] for c in listed] == [conversation["id"], other["id"]]
    assert web.call("DELETE", f"/api/conversations/{other['id']}").status_code == 204
    assert web.call("GET", f"/api/conversations/{other['id']}").status_code == 404
    web.stop()

    restarted = Web(str(tmp_path / "web.sqlite3"))  # and its own private sandbox, as a user's first run has
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


def test_with_a_token_only_a_login_opens_it(tmp_path, local_sandbox):
    web = Web(str(tmp_path / "web.sqlite3"), "--token", "s3cret-web-token", sandbox=local_sandbox)
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
        log = web.stop()
    # A token in a URL (a wrong guess is logged as a 401) never reaches the log.
    assert "GET /login?token=*** " in log and "wrong" not in log and "s3cret" not in log, log


def test_beyond_loopback_without_a_token_it_refuses_to_start(tmp_path):
    done = subprocess.run([sys.executable, "-m", "codeact_sdk", "web", "--host", "0.0.0.0", "--port", "0",
                           "--db", str(tmp_path / "w.sqlite3")], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "without a token" in done.stderr


def test_the_json_errors_never_echo_markup_as_html(web):
    response = web.call("GET", "/api/conversations/" + "0" * 32)
    assert response.status_code == 404 and response.headers["Content-Type"] == "application/json"
    assert json.loads(response.text)["message"] == f"no conversation {'0' * 32!r}"


# -- turns over the websocket ---------------------------------------------------------------------------


class Tab:
    """A page's websocket on one conversation."""

    def __init__(self, web: Web, conversation_id: str, **options) -> None:
        import websocket

        url = web.url.replace("http", "ws") + f"/api/conversations/{conversation_id}/ws"
        self.socket = websocket.create_connection(url, timeout=60, **options)
        assert self.receive()["type"] == "hello"

    def receive(self) -> dict:
        return json.loads(self.socket.recv())

    def send(self, **message) -> None:
        self.socket.send(json.dumps(message))

    def until_end(self) -> list[dict]:
        """Messages up to the item that ends the turn."""
        seen = []
        while not seen or seen[-1].get("kind") not in ("end", "error"):
            seen.append(self.receive())
        return seen

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def turns(tmp_path, local_sandbox, model):
    server = Web(str(tmp_path / "web.sqlite3"), sandbox=local_sandbox, llm_url=model.url)
    yield server, model
    server.stop()


def test_a_turn_streams_to_every_tab_watching_and_is_kept(turns, tmp_path):
    web, model = turns
    model.enqueue("Let me compute.\n<execute>\nprint(sum(range(11)))\n</execute>", "The sum is <solution>55</solution>")
    conversation = web.call("POST", "/api/conversations", json={"title": "sums"}).json()
    first, second = Tab(web, conversation["id"]), Tab(web, conversation["id"])
    first.send(type="send", text="Sum 0..10")
    seen, other = first.until_end(), second.until_end()
    first.close()
    second.close()
    assert seen == other  # two tabs, one turn
    kinds = [m["type"] if m["type"] != "item" else m["kind"] for m in seen]
    assert kinds[0] == "user" and "delta" in kinds and kinds[-1] == "end"
    assert [k for k in kinds if k != "delta"] == ["user", "assistant", "cell_start", "output", "cell", "assistant",
                                                  "end"]
    assert "".join(m["text"] for m in seen if m["type"] == "delta").startswith("Let me compute.")
    cell = next(m for m in seen if m.get("kind") == "cell")
    assert cell["data"]["outputs"] == [{"type": "stream", "name": "stdout", "text": "55\n"}]
    assert (cell["data"]["status"], cell["kernel"]) == ("ok", "idle")
    assert seen[-1]["data"]["solution"] == "55" and seen[-1]["data"]["stop_reason"] == "answer"
    # A reload shows the same items; the model's history is kept for the next turn and the exports.
    shown = web.call("GET", f"/api/conversations/{conversation['id']}").json()["items"]
    assert [i["kind"] for i in shown] == ["user", "assistant", "cell", "assistant", "end"]
    exported = web.call("GET", f"/api/conversations/{conversation['id']}/export?format=jsonl").text
    assert [json.loads(line)["role"] for line in exported.splitlines()[1:]] == [
        "system", "user", "assistant", "user", "assistant"]


def test_stop_interrupts_the_running_code_and_the_next_message_goes_on(turns):
    web, model = turns
    model.enqueue("<execute>\nimport time\nprint('started', flush=True)\ntime.sleep(60)\n</execute>",
                  "Stopped early. <solution>later</solution>", "Fine: <solution>ok</solution>")
    conversation = web.call("POST", "/api/conversations", json={}).json()
    tab = Tab(web, conversation["id"])
    tab.send(type="send", text="wait a minute")
    while tab.receive().get("type") != "output":
        pass  # the code runs
    tab.send(type="send", text="and meanwhile?")
    assert tab.receive() == {"type": "error", "message": "a reply is in progress: stop it or wait for it"}
    tab.send(type="stop")
    rest = tab.until_end()
    assert rest[-1]["data"]["stop_reason"] == "stopped"
    interrupted = next(m for m in rest if m.get("kind") == "cell")["data"]
    assert (interrupted["status"], interrupted["error"]["name"]) == ("error", "KeyboardInterrupt")
    tab.send(type="send", text="and now?")
    after = tab.until_end()
    assert after[-1]["data"]["stop_reason"] == "answer"
    tab.send(type="nonsense")
    assert tab.receive()["type"] == "error"
    tab.close()


def test_the_history_comes_back_after_a_restart_with_a_fresh_kernel(tmp_path, local_sandbox, model):
    web = Web(str(tmp_path / "web.sqlite3"), sandbox=local_sandbox, llm_url=model.url)
    model.enqueue("<execute>secret = 7</execute>", "Stored. <solution>done</solution>")
    conversation = web.call("POST", "/api/conversations", json={}).json()
    tab = Tab(web, conversation["id"])
    tab.send(type="send", text="remember 7")
    tab.until_end()
    tab.close()
    web.stop()
    web = Web(str(tmp_path / "web.sqlite3"), sandbox=local_sandbox, llm_url=model.url)
    try:
        model.enqueue("It was <solution>7</solution>")
        tab = Tab(web, conversation["id"])
        tab.send(type="send", text="what was it?")
        assert tab.until_end()[-1]["data"]["solution"] == "7"
        tab.close()
    finally:
        web.stop()
    sent = model.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert sent[1]["content"] == "remember 7" and "earlier variables and imports are gone" in sent[-1]["content"]


def test_a_model_that_is_down_is_said_on_the_page_and_the_server_stays_up(tmp_path, local_sandbox):
    web = Web(str(tmp_path / "web.sqlite3"), sandbox=local_sandbox)  # nothing listens at its model URL
    try:
        conversation = web.call("POST", "/api/conversations", json={}).json()
        tab = Tab(web, conversation["id"])
        tab.send(type="send", text="hello?")
        error = tab.until_end()[-1]
        assert error["kind"] == "error" and "127.0.0.1:9" in error["data"]["message"]
        tab.close()
        assert web.call("GET", "/api/conversations").status_code == 200
    finally:
        web.stop()


def test_a_websocket_from_another_origin_or_to_no_conversation_is_refused(web):
    import websocket

    conversation = web.call("POST", "/api/conversations", json={}).json()
    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        Tab(web, conversation["id"], origin="https://evil.example")
    assert caught.value.status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        Tab(web, "0" * 32)
    assert caught.value.status_code == 404


def test_a_file_put_into_a_conversation_is_read_by_its_code_and_what_it_writes_comes_back(turns):
    web, model = turns
    conversation = web.call("POST", "/api/conversations", json={}).json()
    base = f"/api/conversations/{conversation['id']}/files"
    put = web.call("PUT", base + "/sales%20q3.csv", data=b"month,units\njan,3\nfeb,5\n")
    assert put.status_code == 201 and put.json() == {"path": "sales q3.csv", "size": 24}
    model.enqueue("<execute>\nimport pandas as pd\ndf = pd.read_csv('sales q3.csv')\n"
                  "df.assign(double=df.units * 2).to_csv('out #1.csv', index=False)\nprint(df.units.sum())\n"
                  "</execute>", "<solution>8</solution>")
    tab = Tab(web, conversation["id"])
    tab.send(type="send", text="total units, and a doubled copy")
    seen = tab.until_end()
    tab.close()
    assert next(m for m in seen if m.get("kind") == "cell")["data"]["outputs"][0]["text"] == "8\n"
    listed = {f["path"] for f in web.call("GET", base).json()["files"]}
    assert {"sales q3.csv", "out #1.csv"} <= listed
    download = web.call("GET", base + "/out%20%231.csv")
    assert download.status_code == 200 and download.content == b"month,units,double\njan,3,6\nfeb,5,10\n"
    assert download.headers["Content-Disposition"] == "attachment; filename*=UTF-8''out%20%231.csv"
    # Refusals are the sandbox's own: a path out of the directory, a file that is not there.
    escape = web.call("GET", base + "/..%2F..%2Fetc%2Fpasswd")
    assert escape.status_code in (400, 404) and "root:" not in escape.text, escape.text
    assert web.call("GET", base + "/missing.csv").status_code == 404
    assert web.call("PUT", base + "/no-xsrf.csv", data=b"x", headers={"X-XSRFToken": ""}).status_code == 403


def test_a_conversations_own_settings_apply_to_its_turns(turns):
    web, model = turns
    conversation = web.call("POST", "/api/conversations", json={"settings": {"model": "not-listed"}}).json()
    tab = Tab(web, conversation["id"])
    tab.send(type="send", text="hi")
    error = tab.until_end()[-1]
    assert error["kind"] == "error" and "not-listed" in error["data"]["message"], error
    # Changed, the settings apply from the next message, with a fresh session.
    web.call("PATCH", f"/api/conversations/{conversation['id']}", json={"settings": {"model": "scripted"}})
    model.enqueue("<solution>listed</solution>")
    tab.send(type="send", text="and now?")
    assert tab.until_end()[-1]["data"]["solution"] == "listed"
    assert model.requests[-1]["model"] == "scripted"
    tab.close()


def test_an_untitled_conversation_is_named_after_its_first_message(turns):
    web, model = turns
    model.enqueue("<solution>4</solution>", "<solution>5</solution>")
    conversation = web.call("POST", "/api/conversations", json={}).json()
    tab = Tab(web, conversation["id"])
    tab.send(type="send", text="  What is 2 + 2?\nShow your work.")
    assert tab.receive() == {"type": "title", "title": "What is 2 + 2?"}
    tab.until_end()
    tab.send(type="send", text="And 2 + 3?")
    assert [m for m in tab.until_end() if m["type"] == "title"] == []
    tab.close()
    assert web.call("GET", f"/api/conversations/{conversation['id']}").json()["conversation"]["title"] == \
        "What is 2 + 2?"


def test_the_operators_mcp_servers_are_in_every_conversations_kernel(tmp_path, local_sandbox, model):
    server = os.path.join(os.path.dirname(__file__), "mcp_server.py")
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"orders": {"command": sys.executable, "args": [server, "stdio"],
                                                            "env": {"SECRET": "kept-on-the-server"}}}}))
    web = Web(str(tmp_path / "web.sqlite3"), "--mcp-config", str(config), sandbox=local_sandbox, llm_url=model.url)
    try:
        shown = web.call("GET", "/api/config").json()
        assert shown["mcp_servers"] == [{"name": "orders", "transport": "stdio"}]
        assert "kept-on-the-server" not in json.dumps(shown)
        model.enqueue("<execute>print(orders.add(a=2, b=3))</execute>", "<solution>5</solution>")
        conversation = web.call("POST", "/api/conversations", json={}).json()
        tab = Tab(web, conversation["id"])
        tab.send(type="send", text="add 2 and 3 with the orders tool")
        cell = next(m for m in tab.until_end() if m.get("kind") == "cell")
        tab.close()
        assert cell["data"]["outputs"] == [{"type": "stream", "name": "stdout", "text": "5\n"}], cell
        assert "orders.add(" in model.requests[0]["messages"][0]["content"]
    finally:
        web.stop()


@pytest.mark.parametrize("content, says", [
    ("{", "not valid JSON"), ('{"servers": {}}', 'needs an object "mcpServers"'),
    ('{"mcpServers": {"x": {"command": "a", "args": "b"}}}', "args is a list of strings"),
    ('{"mcpServers": {"bad name": {"command": "a"}}}', "must be a Python identifier"),
    ('{"mcpServers": {"x": {}}}', "give a command (stdio) or a url"),
])
def test_a_bad_mcp_configuration_is_one_line_at_start(tmp_path, content, says):
    config = tmp_path / "mcp.json"
    config.write_text(content)
    done = subprocess.run([sys.executable, "-m", "codeact_sdk", "web", "--port", "0", "--db", str(tmp_path / "w"),
                           "--mcp-config", str(config)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
