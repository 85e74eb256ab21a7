"""The `codeact` command line: the chat REPL driven through a pseudo-terminal, and one-shot runs."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time


def connection(model, local_sandbox) -> list[str]:
    return ["--llm-url", model.url, "--sandbox-url", local_sandbox.url, "--sandbox-token", local_sandbox.token]


class Terminal:
    """A program on a pseudo-terminal: type lines, wait for text, with a deadline on every wait."""

    def __init__(self, argv: list[str], **env_changes: str) -> None:
        self.primary, secondary = pty.openpty()
        env = {**os.environ, "TERM": "xterm", **env_changes}
        env.pop("NO_COLOR", None)
        self.process = subprocess.Popen(argv, stdin=secondary, stdout=secondary, stderr=secondary, env=env)
        os.close(secondary)
        self.screen = ""

    @property
    def plain(self) -> str:
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.screen)  # colours, bracketed-paste mode

    def expect(self, text: str, timeout: float = 30.0) -> str:
        """Wait until `text` is on the screen (colours aside); return the screen as written."""
        deadline = time.monotonic() + timeout
        while text not in self.plain:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"did not see {text!r} in:\n{self.screen}")
            ready, _, _ = select.select([self.primary], [], [], remaining)
            if ready:
                try:
                    self.screen += os.read(self.primary, 65536).decode(errors="replace")
                except OSError:
                    break
        return self.screen

    def type(self, line: str) -> None:
        os.write(self.primary, (line + "\n").encode())

    def keys(self, text: str) -> None:
        os.write(self.primary, text.encode())

    def close(self) -> int:
        code = self.process.wait(30)
        os.close(self.primary)
        return code


def test_chat_repl_streams_in_colour_and_handles_save_reset_exit(model, local_sandbox, tmp_path):
    transcript = str(tmp_path / "chat.jsonl")
    saved = str(tmp_path / "saved.json")
    model.enqueue("Computing.\n<execute>print(6 * 7)</execute>", "It is <solution>42</solution>.", "Fresh start.")
    terminal = Terminal([sys.executable, "-m", "codeact_sdk", "chat", *connection(model, local_sandbox),
                         "--transcript", transcript])
    terminal.expect("You> ")
    terminal.type("what is 6 times 7?")
    screen = terminal.expect("<solution>42</solution>")
    assert "\x1b[36m" in screen, "assistant text is coloured on a terminal"
    assert "--- running ---\r\n42\r\n--- ok in" in terminal.plain
    terminal.expect("</solution>.\r\nYou> ")

    terminal.type(f"/save {saved}")
    terminal.expect("saved 5 messages")
    terminal.type("/reset")
    terminal.expect("reset]")
    terminal.type("hello again")
    terminal.expect("Fresh start.")
    terminal.type("exit")
    assert terminal.close() == 0
    assert json.loads((tmp_path / "saved.json").read_text())["conversations"][2]["from"] == "gpt"
    assert model.requests[-1]["messages"][1]["content"] == "hello again"


def test_run_prints_the_answer_and_json_prints_the_whole_reply(model, local_sandbox):
    model.enqueue("<execute>print(2 ** 10)</execute>", "<solution>1024</solution>")
    plain = subprocess.run([sys.executable, "-m", "codeact_sdk", "run", "2**10?", *connection(model, local_sandbox)],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and plain.stdout.strip() == "1024"
    model.enqueue("<execute>print(3)</execute>", "<solution>3</solution>")
    full = subprocess.run([sys.executable, "-m", "codeact_sdk", "run", "three", "--json",
                           *connection(model, local_sandbox)], capture_output=True, text=True, timeout=60)
    data = json.loads(full.stdout)
    assert data["solution"] == "3" and data["turns"][0]["execution"]["stdout"] == "3\n"
    assert data["stop_reason"] == "answer" and data["usage"]["completion_tokens"] > 0


def test_run_exits_non_zero_on_failure(model, local_sandbox):
    model.enqueue(*[f"<execute>print('more {i}')</execute>" for i in range(3)])
    limited = subprocess.run([sys.executable, "-m", "codeact_sdk", "run", "loop", "--max-executions", "2",
                              *connection(model, local_sandbox)], capture_output=True, text=True, timeout=60)
    assert limited.returncode == 1
    down = subprocess.run([sys.executable, "-m", "codeact_sdk", "run", "x", "--llm-url", "http://127.0.0.1:9/v1",
                           "--model", "m", "--sandbox-url", local_sandbox.url, "--sandbox-token", local_sandbox.token],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 2 and "CODEACT_LLM_URL" in down.stderr


def test_every_command_explains_its_options():
    for command in ([], ["chat"], ["run"], ["export"]):
        result = subprocess.run([sys.executable, "-m", "codeact_sdk", *command, "--help"], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0 and "usage: codeact" in result.stdout


def test_run_sends_files_in_and_brings_the_agents_files_and_images_out(model, local_sandbox, tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("a,b\n1,2\n3,4\n")
    model.enqueue("<execute>import os\nimport pandas as pd\nimport matplotlib.pyplot as plt\n"
                  "df = pd.read_csv('data.csv')\ndf['total'] = df.a + df.b\nos.makedirs('report', exist_ok=True)\n"
                  "df.to_csv('report/totals.csv', index=False)\nplt.plot(df.total)\nplt.show()\n"
                  "print(df.total.sum())</execute>", "<solution>10</solution>")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "codeact_sdk", "run", "sum the rows", "--file", str(data),
                           "--output-dir", str(out), *connection(model, local_sandbox)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "10", done.stderr
    assert "Execution Output:\n10" in model.requests[-1]["messages"][-1]["content"]
    assert (out / "report" / "totals.csv").read_text() == "a,b,total\n1,2,3\n3,4,7\n"
    assert not (out / "data.csv").exists(), "an input the agent did not change is not copied back"
    assert (out / "image-1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"image saved to {out / 'image-1.png'}" in done.stderr
    assert "copied 1 file(s)" in done.stderr and "report/totals.csv" in done.stderr
    missing = subprocess.run([sys.executable, "-m", "codeact_sdk", "run", "x", "--file", str(tmp_path / "nope.csv"),
                              *connection(model, local_sandbox)], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_chat_shows_where_images_went_and_copies_the_agents_files_out_on_exit(model, local_sandbox, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("three\n")
    model.enqueue("<execute>import matplotlib.pyplot as plt\nplt.bar([1], [len(open('notes.txt').read())])\n"
                  "plt.show()\nopen('answer.txt', 'w').write('6')</execute>", "<solution>6</solution>")
    out = tmp_path / "out"
    terminal = Terminal([sys.executable, "-m", "codeact_sdk", "chat", *connection(model, local_sandbox),
                         "--transcript", str(tmp_path / "chat.jsonl"), "--file", str(notes), "--output-dir", str(out)])
    terminal.expect("You> ")
    terminal.type("how long is the note?")
    terminal.expect(f"[image saved to {out / 'image-1.png'}]")
    terminal.expect("</solution>\r\nYou> ")
    terminal.type("exit")
    terminal.expect("copied 1 file(s)")
    assert terminal.close() == 0
    assert (out / "answer.txt").read_text() == "6" and (out / "image-1.png").read_bytes()[:4] == b"\x89PNG"


def test_an_unknown_model_name_and_bad_numbers_are_refused_with_the_choices(model, local_sandbox):
    unknown = subprocess.run([sys.executable, "-m", "codeact_sdk", "run", "x", "--model", "gpt-4-does-not-exist",
                              *connection(model, local_sandbox)], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2, unknown.stdout
    assert "does not serve a model named 'gpt-4-does-not-exist'; it lists: scripted" in unknown.stderr
    assert model.requests == []  # refused before any completion was asked for
    for option, value in [("--max-executions", "-3"), ("--timeout", "0"), ("--timeout", "soon")]:
        bad = subprocess.run([sys.executable, "-m", "codeact_sdk", "run", "x", option, value],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and f"argument {option}:" in bad.stderr, bad.stderr


def test_ctrl_c_during_run_exits_130_with_one_line(model, local_sandbox):
    import signal

    from codeact_sdk.testing import Fault

    model.enqueue(Fault(text="thinking " * 20, delay=2.0))
    process = subprocess.Popen([sys.executable, "-m", "codeact_sdk", "run", "think", *connection(model, local_sandbox)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not model.requests and time.monotonic() < deadline:  # the model is being asked
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130 and err.strip() == "codeact: interrupted", err


def test_chat_repl_edits_lines_keeps_history_takes_pastes_whole_and_stays_consistent_on_ctrl_c(model, local_sandbox,
                                                                                              tmp_path):
    import signal

    from codeact_sdk.transcript import read

    transcript = str(tmp_path / "chat.jsonl")
    model.enqueue("one", "two", "three", "four", "<execute>kept = 1\nimport time\ntime.sleep(30)</execute>",
                  "five", "<execute>\nimport time\nwhile True:\n    try:\n        time.sleep(1)\n"
                  "    except KeyboardInterrupt:\n        print('ignored')\n</execute>", "six")
    terminal = Terminal([sys.executable, "-m", "codeact_sdk", "chat", *connection(model, local_sandbox),
                         "--transcript", transcript, "--no-color"], HOME=str(tmp_path))

    def sent() -> str:
        return model.requests[-1]["messages"][-1]["content"]

    terminal.expect("You> ")
    terminal.keys("first line\nsecond line\nthird line\n")  # a paste: one write, several lines
    terminal.expect("one\r\nYou> ")
    assert sent() == "first line\nsecond line\nthird line" and len(model.requests) == 1
    for line in ['"' * 3, "fenced a", "fenced b", '"' * 3]:
        terminal.type(line)
        time.sleep(0.2)
    terminal.expect("two\r\nYou> ")
    assert sent() == "fenced a\nfenced b"
    terminal.keys("helo\x1b[Dl\n")  # left arrow, then an inserted letter: readline editing
    terminal.expect("three\r\nYou> ")
    assert sent() == "hello"
    terminal.keys("\x1b[A\n")  # up arrow: the last line again, from the history
    terminal.expect("four\r\nYou> ")
    assert sent() == "hello"

    terminal.type("run it")
    terminal.expect("--- running ---")
    time.sleep(0.5)
    terminal.process.send_signal(signal.SIGINT)  # once: stop the reply, keep the turn
    terminal.expect("[stopped: stopped]")
    terminal.expect("You> ")
    terminal.type("go on")
    terminal.expect("five\r\nYou> ")
    assert sent().startswith("Execution Output:") and sent().endswith("go on"), terminal.plain

    terminal.type("loop stubbornly")  # code that ignores the interrupt: stopping cannot end it
    terminal.expect("--- running ---")
    time.sleep(0.5)
    terminal.process.send_signal(signal.SIGINT)
    terminal.expect("\r\nignored\r\n")  # the code's own output, after the interrupt it ignored
    terminal.expect("Ctrl-C again")
    terminal.process.send_signal(signal.SIGINT)  # twice: withdraw the message and its reply
    terminal.expect("[withdrawn: the conversation is as it was")
    terminal.expect("You> ")
    terminal.type("after")
    terminal.expect("six\r\nYou> ")
    terminal.keys("\x04")  # Ctrl-D quits
    assert terminal.close() == 0

    roles = [message["role"] for message in model.requests[-1]["messages"]]
    assert roles[1:] == ["user", "assistant"] * 6 + ["user"], roles  # user and assistant alternate throughout
    assert "stubbornly" not in json.dumps(model.requests[-1]["messages"])
    assert "kernel was restarted" in sent()  # the stubborn code outlived its interrupt: a fresh kernel
    _, kept = read(transcript)
    assert [m["role"] for m in kept][1:] == ["user", "assistant"] * 7
    history = (tmp_path / ".local" / "share" / "codeact" / "history").read_text()
    assert "hello" in history and "first line" in history


def test_chat_with_the_model_server_down_says_so_in_one_line(local_sandbox):
    from model_server.stack import free_port

    done = subprocess.run([sys.executable, "-m", "codeact_sdk", "chat", "--llm-url", f"http://127.0.0.1:{free_port()}/v1",
                           "--sandbox-url", local_sandbox.url, "--sandbox-token", local_sandbox.token],
                          input="hello\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "cannot reach the model server" in done.stderr


def test_run_shows_progress_on_a_terminal_and_nothing_when_piped(model, local_sandbox):
    script = ("Let me compute.\n<execute>import time\ntime.sleep(1.5)\nprint(6 * 7)</execute>",
              "It is <solution>42</solution>.")
    model.enqueue(*script)
    terminal = Terminal([sys.executable, "-m", "codeact_sdk", "run", "what is 6 times 7?",
                         *connection(model, local_sandbox)])
    terminal.expect("[step 1] running code 1.")  # the elapsed time, redrawn while the code runs
    terminal.expect("42\r\n")
    assert terminal.close() == 0
    assert "[step 2] model" in terminal.plain
    assert terminal.plain.rstrip().endswith("42")  # the status line is cleared before the answer

    model.enqueue(*script)
    piped = subprocess.run([sys.executable, "-m", "codeact_sdk", "run", "what is 6 times 7?",
                            *connection(model, local_sandbox)], capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and piped.stdout == "42\n" and piped.stderr == ""
