"""The CodeAct conventions as pure functions: the system prompt, reading a reply, writing an observation."""

from __future__ import annotations

import ast
import re
import textwrap

STOP_SEQUENCES = ["</execute>", "<|im_end|>"]
OBSERVATION_PREFIX = "Execution Output:\n"
# Said so that the model prints next time, rather than guess (the sandbox's /execute keeps the original's text).
NO_OUTPUT = "[Code executed successfully with no output. Use print() to show the values you need.]"
REPEATED = ("[You sent the same reply as before; its output is above, and running it again would not change it. "
            "Try a different approach, or give your final answer in <solution></solution>.]")
KERNEL_REPLACED_NOTE = ("[Note: the Python kernel was restarted; all earlier variables and imports are gone. "
                        "Define them again before use.]")

SYSTEM_PROMPT = """\
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, \
detailed, and polite answers to the user's questions.
The assistant can interact with an interactive Python (Jupyter Notebook) environment and receive the \
corresponding output when needed. The code should be enclosed using "<execute>" tag, for example: \
<execute> print("Hello World!") </execute>.
The assistant should attempt fewer things at a time instead of putting too much code in one <execute> block. \
The environment has numpy, pandas, scipy, sympy, matplotlib, Pillow, scikit-learn and requests installed; \
a figure shown with plt.show() reaches the user as an image. The code has no network access, but packages from \
the package index can be installed with <execute> !pip install [package needed] </execute>. \
The assistant should always import packages and define variables before starting to use them.
The assistant should stop <execute> and provide an answer when they have already obtained the answer from \
the execution result. Whenever possible, execute the code for the user using <execute> instead of providing it.
When the answer is final, the assistant puts it in <solution> </solution> tags, for example: \
<solution> 42 </solution>.
The assistant's response should be concise, but do express their thoughts."""

NETWORK_NOTE = "\nIn this conversation the code can also reach the network."
TOOLS_HEADER = "\n\nThese Python functions are already defined in the environment; call them in <execute> blocks:\n"

EXECUTE_BLOCK = re.compile(r"<execute>(.*?)</execute>", re.DOTALL)
# Where a <solution> is code, not an answer: closed blocks, fenced blocks, then an unclosed block up to a
# <solution> written after it.
CODE_SPANS = [re.compile(r"<execute>.*?</execute>|```.*?(?:```|$)", re.DOTALL),
              re.compile(r"<execute>(?:(?!<solution>).)*", re.DOTALL)]
CLOSED_SOLUTION = re.compile(r"<solution>((?:(?!<solution>).)*?)</solution>", re.DOTALL)  # the innermost
OPEN_SOLUTION = re.compile(r"<solution>([^<\n]*)\s*$")  # unclosed: only a last, one-line answer


def system_prompt(tool_descriptions: list[str], base: str = SYSTEM_PROMPT) -> str:
    if not tool_descriptions:
        return base
    return base + TOOLS_HEADER + "\n\n".join(tool_descriptions)


def parse_action(reply: str) -> tuple[str | None, str]:
    """The code of the first <execute> block, and the reply as it should stay in the history.

    Servers drop the stop sequence, so a reply ending inside an unclosed <execute> is a complete action;
    the history keeps that reply with its block closed, and drops anything after the first block.
    """
    closed = EXECUTE_BLOCK.search(reply)
    if closed:
        code = runnable(closed.group(1))
        return (code or None), reply[: closed.end()]
    start = reply.find("<execute>")
    if start == -1:
        return None, reply
    rest = reply[start + len("<execute>") :]
    if "<solution>" in rest:
        return None, reply  # an unclosed block never hides a final answer written after it
    code = runnable(rest)
    if not code:
        return None, reply
    return code, reply.rstrip() + "\n</execute>"


def runnable(block: str) -> str:
    """The code of a block as it should run: a block indented as a whole is dedented. The stripped and the
    dedented forms are tried in turn; the first that parses wins (IPython syntax, `!cmd` or `%magic`,
    parses in neither, and then the dedented form runs)."""
    stripped = block.strip()
    dedented = textwrap.dedent(block.strip("\n")).strip()
    for candidate in (stripped, dedented):
        try:
            ast.parse(candidate)
            return candidate
        except SyntaxError:
            continue
    return dedented


def parse_solution(reply: str) -> str | None:
    """The final answer: the last <solution> block outside code (an <execute> block or a fenced one), or an
    unclosed one that ends the reply on a single line. Never markup or code."""
    prose = reply
    for pattern in CODE_SPANS:
        prose = pattern.sub("\x00", prose)  # a mark, so that what follows code does not join what precedes it
    closed = CLOSED_SOLUTION.findall(prose)
    if closed:
        return closed[-1].strip()
    match = OPEN_SOLUTION.search(prose)
    return match.group(1).strip() if match else None


def truncate_middle(text: str, head: int, tail: int) -> str:
    if len(text) <= head + tail:
        return text
    omitted = len(text) - head - tail
    return f"{text[:head]}\n[... {omitted} characters omitted ...]\n{text[len(text) - tail:]}"


def observation(text: str, kernel_replaced: bool, head: int, tail: int) -> str:
    """The user message that carries an execution's output back to the model."""
    body = truncate_middle(text, head, tail) if text.strip() else NO_OUTPUT
    if kernel_replaced:
        body = f"{body.rstrip()}\n{KERNEL_REPLACED_NOTE}"
    return OBSERVATION_PREFIX + body
