"""The evaluation: answer checking, the three action parsers, the suite's data, and a full run of a few
tasks in every mode against the scripted model server and a real sandbox."""

from __future__ import annotations

import io
import json
import os

import pytest

from codeact_sdk.eval import actions, report
from codeact_sdk.eval.build_suite import build
from codeact_sdk.eval.checking import check
from codeact_sdk.eval.domains import DOMAINS
from codeact_sdk.eval.runner import Evaluation, Run, load_suite, select
from codeact_sdk.settings import resolve
from codeact_sdk.testing import ScriptedModelServer
from codeact_sdk.tools import as_tool, setup_code


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
    suite = load_suite()
    assert suite == json.loads(json.dumps(build())), "data/tasks.json is stale: run build_suite"
    assert len(suite["tasks"]) >= 60 and len({t["domain"] for t in suite["tasks"]}) == 5
    assert len({t["id"] for t in suite["tasks"]}) == len(suite["tasks"])
    for module in DOMAINS.values():
        namespace: dict = {}
        exec(setup_code([as_tool(tool, ship=True) for tool in module.TOOLS]), namespace)
        assert all(tool.__name__ in namespace for tool in module.TOOLS)


def test_task_selection_by_domain_glob_and_limit():
    tasks = load_suite()["tasks"]
    assert {t["domain"] for t in select(tasks, ["dna"], None)} == {"dna"}
    assert [t["id"] for t in select(tasks, ["travel-0[12]"], None)] == ["travel-01", "travel-02"]
    assert len(select(tasks, None, 2)) == 10


def test_a_full_run_in_three_modes_resumes_and_reports(local_sandbox, tmp_path):
    tasks = select(load_suite()["tasks"], ["decoding-01", "units-01"], None)
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
        evaluation = Evaluation(settings, str(tmp_path), list(actions.MODES), turn_limit=3, suite_version="1.0",
                                progress=progress)
        results = evaluation.run(tasks)
        requests_made = len(model.requests)
        again = Evaluation(settings, str(tmp_path), list(actions.MODES), turn_limit=3, suite_version="1.0")
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
    table = report.build(Run("scripted", model.url, "1.0", list(actions.MODES), 3), results)
    assert table["by_mode"]["code"]["success_rate"] == 0.5 and table["by_mode"]["json"]["success_rate"] == 1.0
    text = report.markdown(table)
    assert "| json | 2 | 100% |" in text and "| decoding |" in text


def test_a_model_server_that_is_down_is_an_error_not_a_hang(tmp_path):
    settings = resolve(llm_url="http://127.0.0.1:9/v1", model="m", sandbox_url="http://127.0.0.1:9")
    evaluation = Evaluation(settings, str(tmp_path), ["json"], turn_limit=2)
    settings_fast = type(settings)(**{**settings.__dict__, "max_retries": 0})
    evaluation.settings = settings_fast
    [result] = evaluation.run(select(load_suite()["tasks"], ["web-01"], None))
    assert result.stop == "error" and "CODEACT_LLM_URL" in result.error and not result.success
