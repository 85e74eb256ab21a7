"""Task suites: a directory in a documented format (docs/eval.md), loaded for `codeact eval --suite PATH`.

    suite.json   {"name", "version", "description"?, "tasks"?: "tasks.json", "tools"?: "tools.py",
                  "prompts"?: {"code"|"json"|"text": "file.txt"}, "check"?: "tolerant" | "exact"}
    tasks.json   [{"id", "prompt" (or "question"), "answer", "answer_type"?: "string" | "number" | "list",
                   "domain"?, "tools"?: [names]}, ...] (or {"tasks": [...]}; or tasks.jsonl, one per line)
    tools.py     TOOLS = [functions] for every task, or {domain: [functions]}; each function self-contained
                 (the code mode sends its source to the kernel), with a docstring the model reads

The project's own suite (suites/codeact) is in the same format.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConfigError

BUILTIN = os.path.join(os.path.dirname(__file__), "suites", "codeact")
ANSWER_TYPES = ("string", "number", "list")
CHECKS = ("tolerant", "exact")


@dataclass
class Suite:
    name: str
    version: str
    path: str
    tasks: list[dict]  # each with id, domain, question, answer, answer_type (and tools, if it names them)
    tools: dict[str, list[Callable]] = field(default_factory=dict)  # by domain; "*": for every task
    prompts: dict[str, str] = field(default_factory=dict)  # by mode: the system prompt's template
    check: str = "tolerant"
    description: str = ""

    def tools_for(self, task: dict) -> list[Callable]:
        available = [*self.tools.get("*", []), *self.tools.get(task["domain"], [])]
        if "tools" in task:
            by_name = {tool.__name__: tool for tools in self.tools.values() for tool in tools}
            return [by_name[name] for name in task["tools"]]
        return available


def load(path: str | None = None) -> Suite:
    """The suite in a directory (the project's own by default); a clear error for anything malformed."""
    path = os.path.abspath(path or BUILTIN)
    meta = read_json(os.path.join(path, "suite.json"), path)
    if not isinstance(meta, dict) or not meta.get("name"):
        raise ConfigError(f"{path}/suite.json: an object with at least a \"name\" is needed")
    tasks = read_tasks(path, meta.get("tasks"))
    tools = read_tools(path, meta.get("tools"), meta["name"]) if meta.get("tools") else {}
    prompts = {}
    for mode, name in (meta.get("prompts") or {}).items():
        with open(os.path.join(path, name), encoding="utf-8") as handle:
            prompts[mode] = handle.read()
    check = meta.get("check", "tolerant")
    if check not in CHECKS:
        raise ConfigError(f"{path}/suite.json: check must be one of {', '.join(CHECKS)}, not {check!r}")
    suite = Suite(meta["name"], str(meta.get("version", "")), path, tasks, tools, prompts, check,
                  meta.get("description", ""))
    known = {tool.__name__ for tools in suite.tools.values() for tool in tools}
    for task in tasks:
        missing = [name for name in task.get("tools", []) if name not in known]
        if missing:
            raise ConfigError(f"{path}: task {task['id']} names tools that tools.py does not define: "
                              f"{', '.join(missing)}")
    return suite


def read_json(file: str, suite_path: str):
    try:
        with open(file, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{suite_path} is not a task suite: it has no {os.path.basename(file)} "
                          "(see docs/eval.md for the format)") from None
    except ValueError as error:
        raise ConfigError(f"{file}: not valid JSON ({error})") from None


def read_tasks(path: str, name: str | None) -> list[dict]:
    if name is None:
        name = "tasks.jsonl" if os.path.exists(os.path.join(path, "tasks.jsonl")) else "tasks.json"
    file = os.path.join(path, name)
    if name.endswith(".jsonl"):
        try:
            with open(file, encoding="utf-8") as handle:
                raw = [json.loads(line) for line in handle if line.strip()]
        except (OSError, ValueError) as error:
            raise ConfigError(f"{file}: {error}") from None
    else:
        raw = read_json(file, path)
        raw = raw.get("tasks") if isinstance(raw, dict) else raw
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{file}: a non-empty list of tasks is needed")
    tasks, seen = [], set()
    for number, item in enumerate(raw, 1):
        if not isinstance(item, dict):
            raise ConfigError(f"{file}: task {number} is not an object")
        question = item.get("prompt", item.get("question"))
        missing = [key for key, value in (("id", item.get("id")), ("prompt", question), ("answer", item.get("answer")))
                   if value is None]
        if missing:
            raise ConfigError(f"{file}: task {item.get('id', number)} has no {', '.join(missing)}")
        answer_type = item.get("answer_type", "string")
        if answer_type not in ANSWER_TYPES:
            raise ConfigError(f"{file}: task {item['id']}: answer_type must be one of {', '.join(ANSWER_TYPES)}")
        if item["id"] in seen:
            raise ConfigError(f"{file}: task id {item['id']!r} appears twice")
        seen.add(item["id"])
        tasks.append({**item, "id": str(item["id"]), "question": question, "answer_type": answer_type,
                      "domain": str(item.get("domain", "default"))})
    return tasks


def read_tools(path: str, name: str, suite_name: str) -> dict[str, list[Callable]]:
    file = os.path.join(path, name)
    spec = importlib.util.spec_from_file_location(f"codeact_suite_tools_{abs(hash(file))}", file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{file}: cannot load the suite's tools")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file (named by {path}/suite.json)") from None
    tools = getattr(module, "TOOLS", None)
    if isinstance(tools, list | tuple):
        tools = {"*": list(tools)}
    if not isinstance(tools, dict) or not all(callable(t) for group in tools.values() for t in group):
        raise ConfigError(f"{file}: TOOLS must be a list of functions, or a dict of domain -> list of functions")
    return {str(domain): list(group) for domain, group in tools.items()}
