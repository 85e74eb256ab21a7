"""Running the suite: one (task, mode) at a time or in parallel, each trajectory saved as a transcript,
results appended to results.jsonl as they finish, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import datetime
import fnmatch
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import TextIO

from ..errors import CodeActError, ConfigError
from ..local_sandbox import LocalSandbox
from ..model import ModelClient
from ..session import ANSWERED, Session
from ..settings import Settings
from ..tools import as_tool
from ..transcript import TranscriptWriter
from . import actions
from .checking import check
from .suite import Suite

# The feedback of the MINT protocol, said after a wrong answer when the protocol asks for feedback.
FEEDBACK = "Your answer is incorrect. Please try again."


@dataclass
class Result:
    task: str
    domain: str
    mode: str
    success: bool
    answer: str | None
    expected: object
    turns: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stop: str = "answer"  # answer | turn_limit | error
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class Protocol:
    """How tasks are run and judged; published evaluations each fix these."""

    turn_limit: int = 10  # model replies per task, feedback turns included
    feedback: bool = False  # after a wrong answer: FEEDBACK, and another try within the turn limit
    check: str = "tolerant"  # "tolerant" (numbers within 0.01, case, punctuation) or "exact"
    temperature: float = 0.0
    max_tokens: int = 512


@dataclass
class Run:
    """What a run is against, written beside its results and checked on resume."""

    model: str
    endpoint: str
    suite: str
    suite_version: str
    modes: list[str]
    protocol: dict
    date: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))


def select(tasks: list[dict], patterns: list[str] | None, limit: int | None) -> list[dict]:
    """Tasks whose id or domain matches a pattern (glob), at most `limit` per domain."""
    chosen = [t for t in tasks if not patterns or any(fnmatch.fnmatch(t["id"], p) or t["domain"] == p
                                                         for p in patterns)]
    if limit is None:
        return chosen
    counts: dict[str, int] = {}
    kept = []
    for task in chosen:
        counts[task["domain"]] = counts.get(task["domain"], 0) + 1
        if counts[task["domain"]] <= limit:
            kept.append(task)
    return kept


def usage_of(usage: dict) -> tuple[int, int]:
    return int(usage.get("prompt_tokens", 0) or 0), int(usage.get("completion_tokens", 0) or 0)


def run_tool_mode(task: dict, mode: str, suite: Suite, protocol: Protocol, settings: Settings,
                  transcript_path: str) -> Result:
    """JSON or text actions: the model asks for one tool call per turn; we run it and answer."""
    tools = {tool.__name__: tool for tool in suite.tools_for(task)}
    model = ModelClient(settings.llm_url, settings.model, settings.api_key, settings.request_timeout,
                        settings.max_retries)
    writer = TranscriptWriter(transcript_path, {"model": settings.model, "task": task["id"], "mode": mode})
    messages = []

    def add(role: str, content: str) -> None:
        messages.append({"role": role, "content": content})
        writer.message(role, content)

    add("system", actions.system_prompt(mode, [as_tool(t) for t in tools.values()], suite.prompts.get(mode)))
    add("user", task["question"])
    result = Result(task["id"], task["domain"], mode, False, None, task["answer"], 0, stop="turn_limit")
    try:
        for _ in range(protocol.turn_limit):
            completion = model.complete(messages, temperature=protocol.temperature, max_tokens=protocol.max_tokens)
            result.turns += 1
            prompt, generated = usage_of(completion.usage)
            result.prompt_tokens += prompt
            result.completion_tokens += generated
            add("assistant", completion.text)
            action = actions.PARSERS[mode](completion.text)
            if action.answer is not None:
                result.answer, result.stop = action.answer, "answer"
                if not protocol.feedback or judge(task, result.answer, protocol):
                    break
                result.stop = "turn_limit"  # wrong: told so, and tries again while turns are left
                if result.turns < protocol.turn_limit:
                    add("user", FEEDBACK)
            elif action.problem:
                add("user", f"Error: {action.problem}. Follow the format in the instructions.")
            else:
                add("user", "Observation: " + actions.call_tool(action, tools))
    except CodeActError as error:
        result.stop, result.error = "error", str(error)
    finally:
        writer.close()
        model.close()
    result.success = judge(task, result.answer, protocol)
    return result


def run_code_mode(task: dict, suite: Suite, protocol: Protocol, settings: Settings, transcript_path: str) -> Result:
    """Code actions: a CodeAct Session whose kernel has the task's tools, shipped into it as the original
    evaluation defined them in its Python environment (pure functions; a call costs microseconds there)."""
    tools = [as_tool(tool, ship=True) for tool in suite.tools_for(task)]
    result = Result(task["id"], task["domain"], actions.CODE, False, None, task["answer"], 0)
    code_settings = replace(settings, max_executions=protocol.turn_limit - 1, stream_model=False,
                            temperature=protocol.temperature, max_tokens=protocol.max_tokens)
    try:
        with Session(settings=code_settings, tools=tools, transcript_path=transcript_path,
                     system_prompt=suite.prompts.get(actions.CODE, actions.CODE_PROMPT)) as session:
            message = task["question"]
            while True:
                reply = session.chat(message)
                result.turns += len(reply.turns)
                prompt, generated = usage_of(reply.usage)
                result.prompt_tokens += prompt
                result.completion_tokens += generated
                if reply.stop_reason != ANSWERED:
                    result.stop, result.answer = "turn_limit", None
                    break
                result.stop = "answer"
                result.answer = reply.solution if reply.solution is not None else reply.text.strip()
                left = protocol.turn_limit - result.turns
                if not protocol.feedback or judge(task, result.answer, protocol):
                    break
                if left <= 0:  # wrong, and no turn left to try again: as in the JSON and text modes
                    result.stop = "turn_limit"
                    break
                # Wrong: told so, and tries again with the replies it has left.
                session.settings = replace(session.settings, max_executions=left - 1)
                message = FEEDBACK
    except CodeActError as error:
        result.stop, result.error = "error", str(error)
    result.success = judge(task, result.answer, protocol)
    return result


def judge(task: dict, answer: str | None, protocol: Protocol) -> bool:
    return check(task["answer_type"], task["answer"], answer, exact=protocol.check == "exact")


class Evaluation:
    """Usage:
        Evaluation(settings, output_dir, ["code", "json", "text"], suite.load(), Protocol()).run(tasks, parallel=2)
    """

    def __init__(self, settings: Settings, output_dir: str, modes: list[str], suite: Suite,
                 protocol: Protocol = Protocol(), progress: TextIO | None = None) -> None:
        self.settings = settings
        self.output_dir = output_dir
        self.modes = modes
        self.suite = suite
        self.protocol = protocol
        self.progress = progress
        self.run_info: Run | None = None  # set by run()
        self.lock = threading.Lock()
        self.results_path = os.path.join(output_dir, "results.jsonl")
        self.run_path = os.path.join(output_dir, "run.json")

    def done(self) -> dict[tuple[str, str], Result]:
        if not os.path.exists(self.results_path):
            return {}
        finished = {}
        with open(self.results_path) as handle:
            for line in handle:
                try:
                    result = Result(**json.loads(line))
                except (ValueError, TypeError):
                    continue  # a line torn by an interruption
                finished[(result.task, result.mode)] = result
        return finished

    def check_resume(self, run: Run) -> None:
        if os.path.exists(self.run_path):
            with open(self.run_path) as handle:
                earlier = json.load(handle)
            for key in ("model", "endpoint", "suite", "suite_version", "protocol"):
                if earlier.get(key) != getattr(run, key):
                    raise ConfigError(f"{self.output_dir} holds a run with {key}={earlier.get(key)!r}, not "
                                       f"{getattr(run, key)!r}: choose another --output, or delete it to start over")
        with open(self.run_path, "w") as handle:
            json.dump(asdict(run), handle, indent=1)

    def run(self, tasks: list[dict], parallel: int = 1) -> list[Result]:
        os.makedirs(os.path.join(self.output_dir, "transcripts"), exist_ok=True)
        model = self.settings.model or ModelClient(self.settings.llm_url, None, self.settings.api_key).only_model()
        self.settings = replace(self.settings, model=model)
        self.run_info = Run(model, self.settings.llm_url, self.suite.name, self.suite.version, self.modes,
                            asdict(self.protocol))
        self.check_resume(self.run_info)
        finished = self.done()
        pending = [(task, mode) for task in tasks for mode in self.modes if (task["id"], mode) not in finished]
        total = len(tasks) * len(self.modes)
        self.say(f"{len(finished)} of {total} already done; running {len(pending)} with {model} at "
                 f"{self.settings.llm_url}")
        local = None
        if actions.CODE in self.modes and self.settings.sandbox_url is None and pending:
            local = LocalSandbox(pool_size=max(parallel, 1)).start()
            self.settings = replace(self.settings, sandbox_url=local.url, sandbox_token=local.token)
        count = [len(finished)]
        try:
            def one(item: tuple[dict, str]) -> Result:
                task, mode = item
                started = time.monotonic()
                path = os.path.join(self.output_dir, "transcripts", f"{task['id']}-{mode}.jsonl")
                if os.path.exists(path):
                    os.unlink(path)  # a trajectory cut off by an interruption starts over
                if mode == actions.CODE:
                    result = run_code_mode(task, self.suite, self.protocol, self.settings, path)
                else:
                    result = run_tool_mode(task, mode, self.suite, self.protocol, self.settings, path)
                result.seconds = round(time.monotonic() - started, 3)
                with self.lock:
                    with open(self.results_path, "a") as handle:
                        handle.write(json.dumps(asdict(result)) + "\n")
                    count[0] += 1
                    self.say(f"[{count[0]}/{total}] {mode:4} {task['id']:12} "
                             f"{'ok  ' if result.success else 'FAIL'} {result.turns} turns, {result.seconds:.1f} s"
                             + (f" ({result.stop})" if result.stop != "answer" else ""))
                return result

            executor = ThreadPoolExecutor(max(parallel, 1))
            try:
                list(executor.map(one, pending))
            except KeyboardInterrupt:
                # Finished tasks are saved; the ones under way are cut off and rerun on resume.
                executor.shutdown(wait=False, cancel_futures=True)
                raise
            executor.shutdown()
        finally:
            if local is not None:
                local.stop()
        results = self.done()
        return [results[(task["id"], mode)] for task in tasks for mode in self.modes if (task["id"], mode) in results]

    def say(self, text: str) -> None:
        if self.progress is not None:
            self.progress.write(text + "\n")
            self.progress.flush()
