"""The CodeAct conventions as pure functions: the system prompt, reading a reply, writing an observation."""

from __future__ import annotations

import re

STOP_SEQUENCES = ["</execute>", "<|im_end|>"]
OBSERVATION_PREFIX = "Execution Output:\n"
NO_OUTPUT = "[Code executed successfully with no output]"
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
SOLUTION_BLOCK = re.compile(r"<solution>(.*?)(?:</solution>|$)", re.DOTALL)


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
        code = closed.group(1).strip()
        return (code or None), reply[: closed.end()]
    start = reply.find("<execute>")
    if start == -1:
        return None, reply
    code = reply[start + len("<execute>") :].strip()
    if not code:
        return None, reply
    return code, reply.rstrip() + "\n</execute>"


def parse_solution(reply: str) -> str | None:
    match = SOLUTION_BLOCK.search(reply)
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
