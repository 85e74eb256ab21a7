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


def test_a_python_code_block_without_execute_tags_is_the_action_and_what_it_invents_is_dropped():
    # What Qwen2.5-Coder-1.5B wrote for a counting task: its code, then an output and an answer it made up.
    reply = ("Let's implement this in Python:\n\n```python\ncount = len([i for i in range(1, 10001) if i % 7 == 0])\n"
             "print('<solution>', count, '</solution>')\n```\n```output\n<solution> 849 </solution>\n```\n"
             "The number is \\(\\boxed{849}\\).")
    code, kept = protocol.parse_action(reply)
    assert code == "count = len([i for i in range(1, 10001) if i % 7 == 0])\nprint('<solution>', count, '</solution>')"
    assert kept.endswith("print('<solution>', count, '</solution>')\n```") and "849" not in kept
    assert protocol.parse_action(reply, fenced=False) == (None, reply)  # the option off: an answer, as before
    assert "```output" in protocol.STOP_SEQUENCES  # the invented output is not even generated
    # Cut by that stop string, the block may be left open: closed in the history.
    assert protocol.parse_action("```python\nprint(1)\n") == ("print(1)", "```python\nprint(1)\n```")
    # An answer given beside code that never ran is a guess (this one was, for the sum of the first 50
    # primes): the code runs, the guess is dropped. Other languages' blocks are not run.
    guessed = "```python\nprint(sum(primes[:50]))\n```\nWhen you run this code... <solution>2679487341724135</solution>"
    assert protocol.parse_action(guessed) == ("print(sum(primes[:50]))", "```python\nprint(sum(primes[:50]))\n```")
    assert protocol.parse_action("```bash\nls\n```")[0] is None


def test_an_answer_in_boxed_counts_and_a_tag_named_in_inline_code_does_not():
    assert protocol.parse_solution("So the sum is \\(\\boxed{5117}\\).") == "5117"
    assert protocol.parse_solution("half: $\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    assert protocol.parse_solution("\\boxed{1} then <solution>2</solution>") == "2"  # tags first
    assert protocol.parse_solution("Then I give the number in `<solution>` tags.") is None
    assert protocol.parse_solution("I will put it in <solution> tags as requested.") is None
    assert protocol.parse_solution("```python\nprint('\\\\boxed{3}')\n```") is None  # not inside code


def test_python_blocks_written_before_an_execute_block_run_first():
    # What the 1.5B model wrote: the work in a ```python block, then an <execute> block that uses it.
    reply = ("Here's how:\n```python\ntotal = sum(range(10))\n```\nWhen you run this code...\n"
             "<execute> print(total) </execute>\nThe answer is <solution>45</solution>")
    code, kept = protocol.parse_action(reply)
    assert code == "total = sum(range(10))\n\nprint(total)" and kept.endswith("<execute> print(total) </execute>")
    assert protocol.parse_action(reply, fenced=False)[0] == "print(total)"
