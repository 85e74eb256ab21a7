"""The Session turn loop against the scripted model server and a real sandbox server."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from codeact_sdk import SandboxConnectionError, Session, events, tool
from codeact_sdk.testing import Fault
from codeact_sdk.transcript import export, read


def session(model, local_sandbox, **options) -> Session:
    return Session(llm_url=model.url, sandbox_url=local_sandbox.url, sandbox_token=local_sandbox.token, **options)


def test_loop_runs_code_feeds_output_back_and_ends_at_a_solution(model, local_sandbox):
    fibonacci = "a, b = 0, 1\nfor _ in range(20):\n    a, b = b, a + b\nprint(a)"
    model.enqueue(f"Let me compute.\n<execute>\n{fibonacci}\n</execute>",
                  "The 20th Fibonacci number is <solution>6765</solution>.")
    with session(model, local_sandbox) as s:
        reply = s.chat("What is the 20th Fibonacci number?")
    assert reply.solution == "6765" and reply.stop_reason == "answer"
    assert [t.code is not None for t in reply.turns] == [True, False]
    assert reply.turns[0].execution.stdout == "6765\n"
    observation = model.requests[1]["messages"][-1]
    assert observation == {"role": "user", "content": "Execution Output:\n6765\n"}
    assert model.requests[0]["stop"] == ["</execute>", "<|im_end|>", "```output"]
    assert reply.usage["completion_tokens"] > 0 and reply.turns[0].model_seconds > 0


def test_state_persists_across_turns_and_unclosed_blocks_run(model, local_sandbox):
    model.enqueue("<execute>\nx = 21\n", "<execute>print(x * 2)", "Done: <solution>42</solution>")
    with session(model, local_sandbox) as s:
        reply = s.chat("go")
    assert reply.turns[1].execution.stdout == "42\n"
    assert model.requests[1]["messages"][2]["content"] == "<execute>\nx = 21\n</execute>"


def test_the_loop_is_the_same_whether_the_server_returns_its_stop_strings_or_not(local_sandbox):
    """`codeact-model --return-stop-strings` (on in make serve, for the original CodeAct clients) ends a reply
    with the stop string that cut it; servers by default drop it. Same code run, same history, either way."""
    from codeact_sdk.testing import ScriptedModelServer

    script = ["First x.\n<execute>\nx = 21\nprint(x)\n</execute>\nExecution Output: 21 (invented)",
              "```python\nprint(x * 2)\n```\n```output\n43 (invented)\n```", "Done: <solution>42</solution>"]
    runs = []
    for returned in (False, True):
        with ScriptedModelServer(return_stop_strings=returned) as model:
            model.enqueue(*script)
            with session(model, local_sandbox) as s:
                reply = s.chat("go")
            runs.append(([t.execution.stdout for t in reply.turns if t.execution], reply.solution,
                         model.requests[-1]["messages"][1:]))
            if returned:
                assert [t.model_output for t in reply.turns][:2] == [script[0].split("\nExecution")[0],
                                                                      script[1].split("\n43")[0]]
    assert runs[0] == runs[1] == (["21\n", "42\n"], "42", runs[0][2])
    assert runs[0][2][1]["content"] == "First x.\n<execute>\nx = 21\nprint(x)\n</execute>"


def test_only_the_first_of_several_blocks_runs(model, local_sandbox):
    model.enqueue("<execute>print('one')</execute> and <execute>print('two')</execute>", "finished")
    with session(model, local_sandbox) as s:
        reply = s.chat("go")
    assert reply.turns[0].execution.stdout == "one\n"
    assert "two" not in model.requests[1]["messages"][2]["content"]


def test_execution_cap_is_a_stop_reason_not_an_exception(model, local_sandbox):
    model.enqueue(*[f"<execute>print('again {i}')</execute>" for i in range(3)])
    with session(model, local_sandbox, max_executions=2) as s:
        reply = s.chat("loop forever")
        assert reply.stop_reason == "execution_limit"
        assert len(reply.executions) == 2 and len(reply.turns) == 3
        model.enqueue("ok, stopping")
        assert s.chat("stop").stop_reason == "answer"
        roles = [m["role"] for m in s.messages]
    assert all(a != b for a, b in itertools.pairwise(roles)), roles


def test_kernel_death_is_told_to_the_model_and_the_conversation_goes_on(model, local_sandbox):
    model.enqueue("<execute>x = 1</execute>", "<execute>import os\nos._exit(1)</execute>",
                  "<execute>print('alive')</execute>", "The kernel recovered.")
    with session(model, local_sandbox) as s:
        reply = s.chat("go")
    died = reply.turns[1].execution
    assert died.status == "died" and died.new_kernel
    told = model.requests[2]["messages"][-1]["content"]
    assert "earlier variables and imports are gone" in told
    assert reply.turns[2].execution.stdout == "alive\n" and reply.stop_reason == "answer"


def test_stream_yields_events_in_order(model, local_sandbox):
    model.enqueue("<execute>import time\nprint('a')\ntime.sleep(0.4)\nprint('b')\n7</execute>", "done")
    with session(model, local_sandbox) as s:
        stream = list(s.stream("go"))
    kinds = [type(e).__name__ for e in stream]
    first_reply = kinds.index("ModelReply")
    assert set(kinds[:first_reply]) == {"ModelDelta"}
    assert kinds[first_reply:first_reply + 5] == ["ModelReply", "CodeStarted", "Output", "Output", "Result"]
    assert kinds[first_reply + 5] == "ExecutionFinished" and kinds[-1] == "ReplyFinished"
    assert [e.text for e in stream if isinstance(e, events.Output)] == ["a\n", "b\n"]
    seen = []
    model.enqueue("plain answer")
    with session(model, local_sandbox) as s:
        s.chat("again", on_event=seen.append)
    assert isinstance(seen[-1], events.ReplyFinished) and seen[-1].reply.text == "plain answer"


@tool(description="Multiply two integers the slow, careful way.")
def multiply(a: int, b: int) -> int:
    return a * b


def test_tools_are_defined_in_the_kernel_and_described_to_the_model(model, local_sandbox):
    model.enqueue("<execute>print(multiply(6, 7))</execute>", "<solution>42</solution>")
    with session(model, local_sandbox, tools=[multiply]) as s:
        reply = s.chat("6 times 7?")
    assert reply.turns[0].execution.stdout == "42\n"
    system = model.requests[0]["messages"][0]["content"]
    assert "multiply(a: int, b: int) -> int" in system and "slow, careful way" in system


def test_images_reach_the_model_as_a_placeholder_and_the_caller_as_bytes(model, local_sandbox):
    from tests.test_sandbox_execute import PNG_CODE

    model.enqueue(f"<execute>{PNG_CODE}</execute>", "here is the image")
    with session(model, local_sandbox) as s:
        reply = s.chat("draw")
    assert reply.executions[0].images[0].startswith(b"\x89PNG")
    observation = model.requests[1]["messages"][-1]["content"]
    assert "[image: image/png," in observation and "iVBOR" not in observation


def test_transcript_resume_and_export(model, local_sandbox, tmp_path):
    path = str(tmp_path / "conversation.jsonl")
    model.enqueue("<execute>secret = 7</execute>", "stored")
    with session(model, local_sandbox, transcript_path=path) as s:
        s.chat("remember 7")
    _, messages = read(path)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    model.enqueue("<execute>print(secret)</execute>", "it was lost")
    with Session.resume(path, llm_url=model.url, sandbox_url=local_sandbox.url, sandbox_token=local_sandbox.token) as s:
        reply = s.chat("what was it?")
    resumed_request = model.requests[2]["messages"]
    assert resumed_request[:5] == messages
    assert "earlier variables and imports are gone" in resumed_request[5]["content"]
    assert reply.turns[0].execution.error["name"] == "NameError"
    _, after = read(path)
    assert len(after) == 9
    shared = export(path, str(tmp_path / "export.json"))
    assert [turn["from"] for turn in shared["conversations"]][:3] == ["system", "human", "gpt"]
    written = json.loads((tmp_path / "export.json").read_text())
    assert written["conversations"][2]["value"] == "<execute>secret = 7\n</execute>"


@pytest.mark.parametrize("record, says", [
    ({"type": "take_back", "messages": "2"}, ":3: a take_back record needs a message count, got '2'"),
    ({"type": "take_back", "messages": -1}, ":3: a take_back record needs a message count, got -1"),
    ({"type": "take_back"}, ":3: a take_back record needs a message count, got None"),
    ({"type": "message", "role": "tool", "content": "x"}, ":3: a message record needs a role"),
    ({"type": "message", "role": "user", "content": ["x"]}, ":3: a message record needs a role"),
])
def test_a_malformed_transcript_is_a_clear_error_naming_its_line(tmp_path, record, says):
    from codeact_sdk import ConfigError

    path = tmp_path / "broken.jsonl"
    lines = [{"type": "meta", "version": 1}, {"type": "message", "role": "user", "content": "hi"}, record]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "[1, 2]\n{torn")
    with pytest.raises(ConfigError) as caught:
        Session.resume(str(path), llm_url="http://127.0.0.1:9/v1")
    assert str(caught.value).startswith(f"{path}{says}")
    with pytest.raises(ConfigError, match="cannot read the transcript"):
        Session.resume(str(tmp_path / "missing.jsonl"), llm_url="http://127.0.0.1:9/v1")


def test_transcript_survives_sigkill_mid_turn(model, local_sandbox, tmp_path):
    path = str(tmp_path / "killed.jsonl")
    model.enqueue("<execute>print('step one')</execute>", Fault(text="thinking very slowly " * 20, delay=0.5))
    script = textwrap.dedent(f"""
        from codeact_sdk import Session
        s = Session(llm_url={model.url!r}, sandbox_url={local_sandbox.url!r}, sandbox_token={local_sandbox.token!r},
                    transcript_path={path!r})
        s.chat("work")
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # meta, system, user, assistant, observation: the second model call is under way
        if os.path.exists(path) and len(read(path)[1]) >= 4:
            break
        time.sleep(0.05)
    time.sleep(0.5)  # the second model reply is streaming now
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    _, messages = read(path)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[3]["content"] == "Execution Output:\nstep one\n"


def test_sandbox_down_is_a_connection_error_naming_the_option(model):
    s = Session(llm_url=model.url, sandbox_url="http://127.0.0.1:9")
    with pytest.raises(SandboxConnectionError, match="CODEACT_SANDBOX_URL"):
        s.chat("hello")
    s.close()


def test_without_a_sandbox_url_a_private_server_is_started_and_stopped(model, monkeypatch):
    monkeypatch.delenv("CODEACT_SANDBOX_URL", raising=False)
    model.enqueue("<execute>print(1 + 1)</execute>", "two")
    s = Session(llm_url=model.url)
    assert s.chat("1+1?").turns[0].execution.stdout == "2\n"
    process, workspace = s._local.process, s._local.workspace
    assert os.path.exists(os.path.join(workspace, "server.log"))
    s.close()
    assert process.poll() is not None
    assert not os.path.exists(workspace), "the private server's log and port file outlived it"


def test_network_and_env_reach_the_kernel_only_when_asked(model, local_sandbox, capabilities):
    if not capabilities.namespaces:
        pytest.skip("kernels share the host's network here: " + capabilities.report())
    port = model.url.split(":")[-1].split("/")[0]
    probe = (f"import os, socket\nprint(os.environ.get('DATASET'))\ntry:\n    socket.create_connection(("
             f"'127.0.0.1', {port}), timeout=2)\n    print('connected')\nexcept OSError:\n    print('blocked')")
    for options, expected in (({}, "None\nblocked\n"),
                              ({"network": True, "env": {"DATASET": "sales.csv"}}, "sales.csv\nconnected\n")):
        model.enqueue(f"<execute>{probe}</execute>", "done")
        with session(model, local_sandbox, **options) as s:
            assert s.chat("go").turns[0].execution.stdout == expected, options


def test_a_reply_repeated_word_for_word_is_pointed_out_once_then_stops_the_loop(model, local_sandbox):
    same = "Let me check.\n<execute>x = 1</execute>"
    model.enqueue(same, same, "<execute>print(x + 1)</execute>", "<solution>2</solution>")
    with session(model, local_sandbox) as s:
        reply = s.chat("what is x + 1?")
        assert reply.solution == "2" and len(reply.executions) == 2  # the repeat was not run again
        assert "its output is above" in model.requests[2]["messages"][-1]["content"]
        assert "[Code executed successfully with no output. Use print()" in model.requests[1]["messages"][-1]["content"]
        model.enqueue(same, same, same)
        stuck = s.chat("again?")
    assert stuck.stop_reason == "repeated" and len(stuck.executions) == 1


def test_a_turn_that_does_not_finish_is_taken_back_in_memory_and_in_the_transcript(model, local_sandbox, tmp_path):
    path = str(tmp_path / "conversation.jsonl")
    model.enqueue("<execute>import time; done = 1; time.sleep(30)</execute>", Fault(status=400),
                  "<solution>fine</solution>")
    with session(model, local_sandbox, transcript_path=path) as s:
        # The caller stops iterating mid-execution (what Ctrl-C in the REPL or a closed web page does).
        turn = s.stream("first")
        for event in turn:
            if isinstance(event, events.CodeStarted):
                break
        turn.close()
        assert [m["role"] for m in s.messages] == ["system"]
        assert [m["role"] for m in read(path)[1]] == ["system"]
        # The model fails mid-turn: the error reaches the caller, the turn is withdrawn.
        with pytest.raises(Exception, match="400"):
            s.chat("second")
        assert [m["role"] for m in s.messages] == ["system"]
        reply = s.chat("third")
    assert reply.solution == "fine"
    assert [m["content"] for m in model.requests[-1]["messages"][1:]] == ["third"]  # no dangling user turns
    _, messages = read(path)
    assert [(m["role"], m["content"]) for m in messages[1:]] == [("user", "third"),
                                                                 ("assistant", "<solution>fine</solution>")]
