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
    assert protocol.observation("", False, 10, 10) == ("Execution Output:\n[Code executed successfully with no output. "
                                                      "Use print() to show the values you need.]")
    assert "earlier variables and imports are gone" in protocol.observation("boom\n", True, 10, 10)


def test_system_prompt_lists_tools_after_the_codeact_instructions():
    prompt = protocol.system_prompt(["add(a, b)\n    Add two numbers."])
    assert prompt.startswith(protocol.SYSTEM_PROMPT)
    assert "add(a, b)" in prompt and "<execute>" in prompt


def test_an_unclosed_block_never_hides_a_solution_after_it():
    reply = "I know it.\n<execute>\nprint(1)\n<solution>42</solution>"
    assert protocol.parse_action(reply) == (None, reply)
    assert protocol.parse_solution(reply) == "42"


def test_a_block_indented_as_a_whole_is_dedented_and_inline_blocks_still_work():
    code, _ = protocol.parse_action("<execute>\n    total = 0\n    for i in range(3):\n        total += i\n"
                                    "    print(total)\n</execute>")
    assert code == "total = 0\nfor i in range(3):\n    total += i\nprint(total)"
    assert protocol.parse_action('<execute> print("Hello World!") </execute>')[0] == 'print("Hello World!")'
    assert protocol.parse_action("<execute> for i in range(2):\n    print(i)</execute>")[0] == \
        "for i in range(2):\n    print(i)"
    assert protocol.parse_action("<execute>\n    !pip install tabulate\n</execute>")[0] == "!pip install tabulate"


def test_a_solution_inside_code_or_prose_markup_is_not_the_answer():
    reply = ("I'll put it in <solution> tags\n```python\nprint(f\"<solution>{average_age:.2f}</solution>\")\n```")
    assert protocol.parse_solution(reply) is None
    assert protocol.parse_solution("<execute>print('<solution>x</solution>')</execute>") is None
    assert protocol.parse_solution("First <solution>1</solution>, corrected: <solution>2</solution>") == "2"
