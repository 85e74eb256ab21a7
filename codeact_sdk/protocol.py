"""The CodeAct conventions as pure functions: the system prompt, reading a reply, writing an observation."""

from __future__ import annotations

import ast
import re
import textwrap

# "```output": Qwen2.5 models, trained on code blocks followed by their output, go on to invent the output of
# a ```python block they wrote; generation stops there instead, and the code is run (parse_action).
STOP_SEQUENCES = ["</execute>", "<|im_end|>", "```output"]
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
When the answer is final, the assistant puts it in <solution> </solution> tags.
The assistant's response should be concise, but do express their thoughts. For example:
User: What is 17 to the power of 13?
Assistant: I will compute it rather than guess.
<execute> print(17 ** 13) </execute>
User: Execution Output:
9904578032905937
Assistant: <solution> 9904578032905937 </solution>"""

NETWORK_NOTE = "\nIn this conversation the code can also reach the network."
TOOLS_HEADER = "\n\nThese Python functions are already defined in the environment; call them in <execute> blocks:\n"

EXECUTE_BLOCK = re.compile(r"<execute>(.*?)</execute>", re.DOTALL)
# Where a <solution> is code, not an answer: closed blocks, fenced blocks, then an unclosed block up to a
# <solution> written after it.
CODE_SPANS = [re.compile(r"<execute>.*?</execute>|```.*?(?:```|$)", re.DOTALL),
              re.compile(r"`[^`\n]*`"),  # inline code: "put it in `<solution>` tags" names the tag
              re.compile(r"<execute>(?:(?!<solution>).)*", re.DOTALL)]
FENCED_PYTHON = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
BOXED = "\\boxed{"
CLOSED_SOLUTION = re.compile(r"<solution>((?:(?!<solution>).)*?)</solution>", re.DOTALL)  # the innermost
# Unclosed: only a last, one-line answer, and not the tag named in prose ("in <solution> tags as asked.").
OPEN_SOLUTION = re.compile(r"<solution>(?!\s*tags?\b)([^<\n]*)\s*$")


def system_prompt(tool_descriptions: list[str], base: str = SYSTEM_PROMPT) -> str:
    if not tool_descriptions:
        return base
    return base + TOOLS_HEADER + "\n\n".join(tool_descriptions)


def parse_action(reply: str, fenced: bool = True) -> tuple[str | None, str]:
    """The code of the first <execute> block, and the reply as it should stay in the history.

    Servers drop the stop sequence, so a reply ending inside an unclosed <execute> is a complete action;
    the history keeps that reply with its block closed, and drops anything after the first block.

    fenced: ```python blocks count as code too. Models tuned on markdown (Qwen2.5 among them) write their
    code so, then an output and an answer they invent ("When you run this code... <solution>2679487341724135
    </solution>"): in a reply without <execute>, the first such block is the action and what follows it is
    dropped, as after an <execute> block. Where they write ```python blocks and then an <execute> block that
    uses what those define, the blocks run first, in order, then the <execute> block.
    """
    closed = EXECUTE_BLOCK.search(reply)
    start = closed.start() if closed else reply.find("<execute>")
    if start == -1:
        block = FENCED_PYTHON.search(reply) if fenced else None
        if block is None:
            return None, reply
        code = runnable(block.group(1))
        kept = reply[: block.end()]
        return (code or None), kept if kept.endswith("```") else kept.rstrip() + "\n```"
    if closed:
        code, kept = runnable(closed.group(1)), reply[: closed.end()]
    else:
        rest = reply[start + len("<execute>") :]
        if "<solution>" in rest:
            return None, reply  # an unclosed block never hides a final answer written after it
        code, kept = runnable(rest), reply.rstrip() + "\n</execute>"
    if not code:
        return None, reply if not closed else kept
    before = [runnable(block) for block in FENCED_PYTHON.findall(reply[:start])] if fenced else []
    return "\n\n".join([*filter(None, before), code]), kept


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
    """The final answer: the last <solution> block outside code (an <execute> block, a fenced or an inline
    one), or an unclosed one that ends the reply on a single line; failing those, the last \\boxed{...}
    (the answer format of math-tuned models). Never markup or code."""
    prose = reply
    for pattern in CODE_SPANS:
        prose = pattern.sub("\x00", prose)  # a mark, so that what follows code does not join what precedes it
    closed = CLOSED_SOLUTION.findall(prose)
    if closed:
        return closed[-1].strip()
    match = OPEN_SOLUTION.search(prose)
    if match:
        return match.group(1).strip()
    return last_boxed(prose)


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces inside it balanced."""
    start = text.rfind(BOXED)
    if start == -1:
        return None
    depth, at = 1, start + len(BOXED)
    for index in range(at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[at:index].strip() or None
    return None


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
