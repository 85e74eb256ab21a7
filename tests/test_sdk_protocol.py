"""CodeAct conventions as pure functions: reading replies, writing observations."""

from __future__ import annotations

from codeact_sdk import protocol


def test_first_closed_block_is_the_action_and_the_history_stops_after_it():
    reply = "Let me compute.\n<execute>\nx = 1\n</execute>\nthen <execute>y = 2</execute>"
    code, kept = protocol.parse_action(reply)
    assert code == "x = 1"
    assert kept == "Let me compute.\n<execute>\nx = 1\n</execute>"


def test_unclosed_trailing_block_counts_because_servers_drop_the_stop_string():
    code, kept = protocol.parse_action("Sure.\n<execute>\nprint(2 ** 10)\n")
    assert code == "print(2 ** 10)"
    assert kept.endswith("</execute>")


def test_no_block_or_empty_block_is_an_answer():
    assert protocol.parse_action("The answer is 4.") == (None, "The answer is 4.")
    assert protocol.parse_action("<execute>  </execute>")[0] is None
    assert protocol.parse_action("<execute>")[0] is None


def test_solution_is_extracted_even_unclosed():
    assert protocol.parse_solution("So <solution> 6765 </solution>.") == "6765"
    assert protocol.parse_solution("<solution>done") == "done"
    assert protocol.parse_solution("no tags") is None


def test_observation_keeps_head_and_tail_and_marks_the_cut():
    text = "a" * 3000 + "b" * 3000
    result = protocol.observation(text, kernel_replaced=False, head=2000, tail=2000)
    assert result.startswith("Execution Output:\naaaa")
    assert result.endswith("bbbb")
    assert "[... 2000 characters omitted ...]" in result
    assert len(result) < 4100


def test_observation_for_no_output_and_for_a_replaced_kernel():
    assert protocol.observation("", False, 10, 10) == "Execution Output:\n[Code executed successfully with no output]"
    assert "earlier variables and imports are gone" in protocol.observation("boom\n", True, 10, 10)


def test_system_prompt_lists_tools_after_the_codeact_instructions():
    prompt = protocol.system_prompt(["add(a, b)\n    Add two numbers."])
    assert prompt.startswith(protocol.SYSTEM_PROMPT)
    assert "add(a, b)" in prompt and "<execute>" in prompt
