"""The three action formats compared: code (CodeAct), JSON tool calls and text tool calls. Prompts and
parsers are pure functions; the same tools, turn limit and answer checking serve all three."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import protocol
from ..tools import Tool, describe

CODE, JSON, TEXT = "code", "json", "text"
MODES = (CODE, JSON, TEXT)

ANSWER_NOTE = "Give only the final answer, exactly in the format the task asks for."

JSON_PROMPT = """\
You are a helpful assistant that solves tasks with tools. To call a tool, reply with only a JSON object:
{"tool": "<tool name>", "arguments": {"<parameter>": <value>, ...}}
You get the tool's result back. Call one tool per reply. When you know the answer, reply with only:
{"answer": "<the answer>"}
{note}

Tools:
{tools}"""

TEXT_PROMPT = """\
You are a helpful assistant that solves tasks with tools. To call a tool, write one line:
Action: tool_name(argument, argument, ...)
with Python literal arguments (strings in quotes). You get the tool's result back. Call one tool per reply.
When you know the answer, write one line:
Answer: <the answer>
{note}

Tools:
{tools}"""

# Code mode: CodeAct's own prompt plus the answer convention; the Session appends the tools.
CODE_PROMPT = protocol.SYSTEM_PROMPT + "\nPut the final answer in <solution></solution> tags. " + ANSWER_NOTE


@dataclass(frozen=True)
class Action:
    """What a reply asks for: a tool call, an answer, or nothing usable (`problem` says why)."""

    tool: str | None = None
    arguments: dict[str, Any] | None = None
    positional: tuple = ()
    answer: str | None = None
    problem: str | None = None


def system_prompt(mode: str, tools: list[Tool], template: str | None = None) -> str:
    """The mode's system prompt; a suite's own `template` may use {tools} and {note} (JSON and text modes)."""
    descriptions = [describe(tool) for tool in tools]
    if mode == CODE:
        return protocol.system_prompt(descriptions, template or CODE_PROMPT)
    template = template or (JSON_PROMPT if mode == JSON else TEXT_PROMPT)
    return template.replace("{note}", ANSWER_NOTE).replace("{tools}", "\n\n".join(descriptions))


JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse_json(reply: str) -> Action:
    match = JSON_OBJECT.search(reply)
    if not match:
        return Action(problem="no JSON object in the reply")
    try:
        data = json.loads(match.group(0))
    except ValueError as error:
        return Action(problem=f"the JSON object does not parse ({error})")
    if not isinstance(data, dict):
        return Action(problem="the JSON must be an object")
    if "answer" in data:
        return Action(answer=str(data["answer"]))
    if isinstance(data.get("tool"), str):
        arguments = data.get("arguments", {})
        if not isinstance(arguments, dict):
            return Action(problem="'arguments' must be an object")
        return Action(tool=data["tool"], arguments=arguments)
    return Action(problem="the object has neither 'tool' nor 'answer'")


TEXT_ANSWER = re.compile(r"^\s*Answer:\s*(.+?)\s*$", re.MULTILINE)
TEXT_ACTION = re.compile(r"^\s*Action:\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.MULTILINE)


def parse_text(reply: str) -> Action:
    action = TEXT_ACTION.search(reply)
    answer = TEXT_ANSWER.search(reply)
    if action and (not answer or action.start() < answer.start()):
        try:
            call = ast.parse(f"f({action.group(2)})", mode="eval").body
            positional = tuple(ast.literal_eval(argument) for argument in call.args)
            keywords = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
        except (SyntaxError, ValueError) as error:
            return Action(problem=f"the arguments are not Python literals ({error})")
        return Action(tool=action.group(1), arguments=keywords, positional=positional)
    if answer:
        return Action(answer=answer.group(1))
    return Action(problem="no 'Action:' or 'Answer:' line in the reply")


PARSERS: dict[str, Callable[[str], Action]] = {JSON: parse_json, TEXT: parse_text}


def call_tool(action: Action, tools: dict[str, Callable]) -> str:
    """Run a parsed tool call; the result (or the error) as the observation text the model sees."""
    if action.tool not in tools:
        return f"Error: there is no tool {action.tool!r}; the tools are {', '.join(sorted(tools))}"
    try:
        result = tools[action.tool](*action.positional, **(action.arguments or {}))
    except Exception as error:  # the model's mistake: it sees it and can correct the call
        return f"Error: {type(error).__name__}: {error}"
    return json.dumps(result) if isinstance(result, dict | list) else str(result)
