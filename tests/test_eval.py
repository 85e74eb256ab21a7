"""The evaluation: answer checking, the three action parsers, the suite's data, and a full run of a few
tasks in every mode against the scripted model server and a real sandbox."""

from __future__ import annotations

import io
import json
import os

import pytest

from codeact_sdk.errors import ConfigError
from codeact_sdk.eval import actions, report, suite
from codeact_sdk.eval.build_suite import build
from codeact_sdk.eval.checking import check
from codeact_sdk.eval.domains import DOMAINS
from codeact_sdk.eval.runner import FEEDBACK, Evaluation, Protocol, select
from codeact_sdk.settings import resolve
from codeact_sdk.testing import ScriptedModelServer
from codeact_sdk.tools import as_tool, setup_code
from codeact_sdk.transcript import read as read_transcript


@pytest.mark.parametrize(("answer_type", "expected", "given", "ok"), [
    ("number", 12.5, "12.5", True),
    ("number", 12.5, "The total is 12.50 euros", True),
    ("number", 12.5, "about 12.51", True),
    ("number", 12.5, "12.6", False),
    ("number", 4395810, "4,395,810", True),
    ("number", 7, "no idea", False),
    ("string", "lantern", " Lantern. ", True),
    ("string", "lantern", "lanterns", False),
    ("list", "CA102,425", "CA102, 425", True),
    ("list", "CA102,425", "ca102,425.0", True),
    ("list", "CA102,425", "CA102", False),
    ("list", "Berlin,10", "Madrid,10", False),
    ("string", "x", None, False),
])
def test_answer_checking_is_tolerant_of_form_not_of_content(answer_type, expected, given, ok):
    assert check(answer_type, expected, given) is ok


def test_json_parser():
    call = actions.parse_json('Sure: {"tool": "get_price", "arguments": {"item": "tea"}}')
    assert (call.tool, call.arguments) == ("get_price", {"item": "tea"})
    assert actions.parse_json('```json\n{"answer": 42}\n```').answer == "42"
    assert "no JSON object" in actions.parse_json("I will call get_price").problem
    assert "does not parse" in actions.parse_json('{"tool": get_price}').problem
    assert "neither" in actions.parse_json('{"name": "x"}').problem
    assert "must be an object" in actions.parse_json('{"tool": "x", "arguments": [1]}').problem


def test_text_parser():
    call = actions.parse_text("Thought: first the price.\nAction: convert_units(3, 'lb', to_unit='kg')")
    assert (call.tool, call.positional, call.arguments) == ("convert_units", (3, "lb"), {"to_unit": "kg"})
    assert actions.parse_text("Answer: 42 euros").answer == "42 euros"
    assert "not Python literals" in actions.parse_text("Action: get_price(item)").problem
    assert "no 'Action:'" in actions.parse_text("The answer is 4").problem


def test_tool_calls_report_errors_to_the_model():
    tools = {tool.__name__: tool for tool in DOMAINS["units"].TOOLS}
    assert actions.call_tool(actions.Action(tool="get_price", arguments={"item": "tea"}), tools) == "12.0"
    assert actions.call_tool(actions.Action(tool="nope", arguments={}), tools).startswith("Error: there is no tool")
    assert "KeyError" in actions.call_tool(actions.Action(tool="get_price", arguments={"item": "gold"}), tools)


def test_the_suite_is_large_varied_exact_and_shippable():
    own = suite.load()
    with open(os.path.join(suite.BUILTIN, "tasks.json")) as handle:
        assert json.load(handle) == json.loads(json.dumps(build())), "tasks.json is stale: run build_suite"
    assert (own.name, own.version, own.check) == ("codeact-tools", "1.0", "tolerant")
    assert len(own.tasks) >= 60 and len({t["domain"] for t in own.tasks}) == 5
    assert all(own.tools_for(t) == DOMAINS[t["domain"]].TOOLS for t in own.tasks)
    for module in DOMAINS.values():
        namespace: dict = {}
        exec(setup_code([as_tool(tool, ship=True) for tool in module.TOOLS]), namespace)
        assert all(tool.__name__ in namespace for tool in module.TOOLS)


def test_task_selection_by_domain_glob_and_limit():
    tasks = suite.load().tasks
    assert {t["domain"] for t in select(tasks, ["dna"], None)} == {"dna"}
    assert [t["id"] for t in select(tasks, ["travel-0[12]"], None)] == ["travel-01", "travel-02"]
    assert len(select(tasks, None, 2)) == 10


def test_a_full_run_in_three_modes_resumes_and_reports(local_sandbox, tmp_path):
    own = suite.load()
    tasks = select(own.tasks, ["decoding-01", "units-01"], None)
    decoding, units = tasks
    secret = decoding["question"].split()[3]
    price = units["answer"]
    script = [
        # decoding-01: code succeeds through the real sandbox and the shipped tools
        f"<execute>print(caesar_decode(reverse_string(hex_to_text('{secret}')), 3))</execute>",
        "<solution>lantern</solution>",
        # decoding-01: JSON succeeds
        json.dumps({"tool": "hex_to_text", "arguments": {"data": secret}}),
        json.dumps({"answer": "lantern"}),
        # decoding-01: text answers wrongly
        "Action: reverse_string('abc')",
        "Answer: nretnal",
        # units-01: code never stops: the turn limit (3) ends it
        "<execute>1</execute>", "<execute>2</execute>", "<execute>3</execute>",
        # units-01: JSON is malformed once, then right
        "I think the price is high",
        json.dumps({"answer": price}),
        # units-01: text never gives an action or an answer
        "hmm", "hmm", "hmm",
    ]
    with ScriptedModelServer() as model:
        model.enqueue(*script)
        settings = resolve(llm_url=model.url, sandbox_url=local_sandbox.url, sandbox_token=local_sandbox.token)
        progress = io.StringIO()
        evaluation = Evaluation(settings, str(tmp_path), list(actions.MODES), own, Protocol(turn_limit=3),
                                progress=progress)
        results = evaluation.run(tasks)
        requests_made = len(model.requests)
        again = Evaluation(settings, str(tmp_path), list(actions.MODES), own, Protocol(turn_limit=3))
        assert again.run(tasks) == results and len(model.requests) == requests_made, "a finished run resumes"
    outcome = {(r.task, r.mode): (r.success, r.stop, r.turns) for r in results}
    assert outcome == {
        ("decoding-01", "code"): (True, "answer", 2),
        ("decoding-01", "json"): (True, "answer", 2),
        ("decoding-01", "text"): (False, "answer", 2),
        ("units-01", "code"): (False, "turn_limit", 3),
        ("units-01", "json"): (True, "answer", 2),
        ("units-01", "text"): (False, "turn_limit", 3),
    }
    assert "[6/6]" in progress.getvalue()
    observation = model.requests[3]["messages"][-1]["content"]
    assert observation.startswith("Observation: ")
    assert sorted(os.listdir(tmp_path / "transcripts")) == sorted(f"{t}-{m}.jsonl" for t in ("decoding-01", "units-01")
                                                                  for m in actions.MODES)
    table = report.build(evaluation.run_info, results)
    assert table["by_mode"]["code"]["success_rate"] == 0.5 and table["by_mode"]["json"]["success_rate"] == 1.0
    text = report.markdown(table)
    assert "| json | 2 | 100% |" in text and "| decoding |" in text


def test_a_model_server_that_is_down_is_an_error_not_a_hang(tmp_path):
    settings = resolve(llm_url="http://127.0.0.1:9/v1", model="m", sandbox_url="http://127.0.0.1:9")
    evaluation = Evaluation(settings, str(tmp_path), ["json"], suite.load(), Protocol(turn_limit=2))
    settings_fast = type(settings)(**{**settings.__dict__, "max_retries": 0})
    evaluation.settings = settings_fast
    [result] = evaluation.run(select(suite.load().tasks, ["web-01"], None))
    assert result.stop == "error" and "CODEACT_LLM_URL" in result.error and not result.success


def write_suite(root, **changes) -> str:
    """A suite of its own, as a user writes one: tasks as JSON lines, one tool, a prompt for the JSON mode."""
    root.mkdir()
    meta = {"name": "inventory", "version": "0.3", "tools": "tools.py", "prompts": {"json": "json.txt"},
            **changes}
    (root / "suite.json").write_text(json.dumps(meta))
    (root / "tasks.jsonl").write_text(
        json.dumps({"id": "stock-1", "prompt": "How many bolts are in stock?", "answer": 40,
                    "answer_type": "number"}) + "\n"
        + json.dumps({"id": "stock-2", "prompt": "Which part is out of stock?", "answer": "washer",
                      "tools": ["stock"]}) + "\n")
    (root / "tools.py").write_text(
        'def stock(part: str) -> int:\n    """Units of a part in stock."""\n'
        '    return {"bolt": 40, "nut": 12, "washer": 0}[part]\n\nTOOLS = [stock]\n')
    (root / "json.txt").write_text('Answer with JSON only. {"tool": name, "arguments": {...}} or {"answer": ...}.'
                                   "\n{note}\nTools:\n{tools}")
    return str(root)


def test_a_suite_of_ones_own_runs_under_the_feedback_protocol_and_the_report_says_so(local_sandbox, tmp_path):
    inventory = suite.load(write_suite(tmp_path / "inventory"))
    assert [(t["id"], t["domain"], t["answer_type"]) for t in inventory.tasks] == [
        ("stock-1", "default", "number"), ("stock-2", "default", "string")]
    script = [
        # stock-1, code: wrong first, told so, right the second time (the tool was shipped to the kernel)
        "<solution>12</solution>", "<execute>print(stock('bolt'))</execute>", "<solution>40</solution>",
        # stock-1, json: the suite's own prompt; right at once
        json.dumps({"tool": "stock", "arguments": {"part": "bolt"}}), json.dumps({"answer": "40 bolts"}),
        # stock-2, code: wrong, then wrong again until the turn limit (3 replies)
        "<solution>nut</solution>", "<solution>bolt</solution>", "<solution>nut</solution>",
        # stock-2, json: "Washer" is right when checking is tolerant, not when it is exact
        json.dumps({"answer": "Washer"}),
    ]
    with ScriptedModelServer() as model:
        model.enqueue(*script)
        settings = resolve(llm_url=model.url, sandbox_url=local_sandbox.url, sandbox_token=local_sandbox.token)
        protocol = Protocol(turn_limit=3, feedback=True, temperature=0.2, max_tokens=100)
        evaluation = Evaluation(settings, str(tmp_path / "run"), ["code", "json"], inventory, protocol)
        results = evaluation.run(inventory.tasks)
        requests = list(model.requests)
    outcome = {(r.task, r.mode): (r.success, r.turns, r.answer, r.stop) for r in results}
    assert outcome == {("stock-1", "code"): (True, 3, "40", "answer"),
                       ("stock-1", "json"): (True, 2, "40 bolts", "answer"),
                       ("stock-2", "code"): (False, 3, "nut", "turn_limit"),
                       ("stock-2", "json"): (True, 1, "Washer", "answer")}
    assert requests[1]["messages"][-1] == {"role": "user", "content": FEEDBACK}
    assert requests[3]["messages"][0]["content"].startswith("Answer with JSON only.")
    assert "stock(part: str) -> int\n    Units of a part in stock." in requests[3]["messages"][0]["content"]
    assert {(r["temperature"], r["max_tokens"]) for r in requests} == {(0.2, 100)}
    text = report.markdown(report.build(evaluation.run_info, results))
    assert "Suite inventory 0.3; model scripted at" in text
    assert "Protocol: turn limit 3, feedback after a wrong answer, tolerant answer checking, temperature 0.2" in text

    # Wrong on the last turn the limit allows: the same stop in every mode, and no feedback nobody reads.
    with ScriptedModelServer() as model:
        model.enqueue(json.dumps({"answer": "nut"}), json.dumps({"answer": "bolt"}))
        limited = Evaluation(resolve(llm_url=model.url), str(tmp_path / "limit"), ["json"], inventory,
                             Protocol(turn_limit=2, feedback=True))
        [result] = limited.run(inventory.tasks[1:])
        assert len(model.requests) == 2 and model.requests[1]["messages"][-1]["content"] == FEEDBACK
    assert (result.success, result.turns, result.stop) == (False, 2, "turn_limit")
    transcript = tmp_path / "limit" / "transcripts" / "stock-2-json.jsonl"
    assert read_transcript(str(transcript))[1][-1] == {"role": "assistant", "content": json.dumps({"answer": "bolt"})}

    exact = Evaluation(settings, str(tmp_path / "exact"), ["json"], inventory, Protocol(check="exact"))
    with ScriptedModelServer() as model:
        model.enqueue(json.dumps({"answer": "Washer"}))
        exact.settings = resolve(llm_url=model.url)
        [result] = exact.run(inventory.tasks[1:])
    assert not result.success and result.answer == "Washer"
    with pytest.raises(ConfigError, match="protocol"):  # a run directory of another protocol is not resumed
        Evaluation(exact.settings, str(tmp_path / "exact"), ["json"], inventory, Protocol()).run(inventory.tasks[1:])


@pytest.mark.parametrize(("change", "message"), [
    ({"name": ""}, "at least a \"name\""),
    ({"tools": "missing.py"}, "no such file"),
    ({"check": "fuzzy"}, "check must be one of"),
    ({"tasks": "nothing.json"}, "has no nothing.json"),
])
def test_a_malformed_suite_is_refused_with_what_is_wrong(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        suite.load(write_suite(tmp_path / "bad", **change))


def test_a_task_naming_an_unknown_tool_or_lacking_an_answer_is_refused(tmp_path):
    path = write_suite(tmp_path / "bad")
    (tmp_path / "bad" / "tasks.jsonl").write_text(json.dumps({"id": "a", "prompt": "?", "answer": 1,
                                                              "tools": ["drill"]}) + "\n")
    with pytest.raises(ConfigError, match="does not define: drill"):
        suite.load(path)
    (tmp_path / "bad" / "tasks.jsonl").write_text(json.dumps({"id": "a", "prompt": "?"}) + "\n")
    with pytest.raises(ConfigError, match="task a has no answer"):
        suite.load(path)
    with pytest.raises(ConfigError, match="is not a task suite"):
        suite.load(str(tmp_path))


def test_codeact_eval_takes_a_suite_path_and_writes_the_report(tmp_path):
    import subprocess
    import sys

    path = write_suite(tmp_path / "inventory")
    with ScriptedModelServer() as model:
        model.enqueue(json.dumps({"answer": 40}), json.dumps({"answer": "washer"}))
        done = subprocess.run([sys.executable, "-m", "codeact_sdk", "eval", "--suite", path, "--modes", "json",
                               "--llm-url", model.url, "--output", str(tmp_path / "out"), "--check", "exact"],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| json | 2 | 100% |" in done.stdout and "exact answer checking" in done.stdout
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["run"]["suite"] == "inventory" and saved["run"]["protocol"]["check"] == "exact"
