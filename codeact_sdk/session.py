"""The CodeAct Session: ask the model, run the code it writes in the sandbox, feed the output back,
until it answers.

Usage:
    with Session(model="qwen", llm_url="http://127.0.0.1:8080/v1", sandbox_url="http://127.0.0.1:8081") as s:
        reply = s.chat("What is the 20th Fibonacci number?")
        print(reply.text, reply.solution)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import bridge, events, protocol, transcript
from .errors import CodeActError
from .local_sandbox import LocalSandbox
from .model import Completion, ModelClient
from .sandbox import Execution, SandboxClient
from .settings import Settings, resolve
from .tools import Tool, as_tool, describe, setup_code

if TYPE_CHECKING:  # mcp_tools imports asyncio: loaded when a session has MCP servers
    from .mcp_tools import MCPConnections, MCPServer

ANSWERED = "answer"  # the model replied without code
EXECUTION_LIMIT = "execution_limit"  # the model wanted to run code past max_executions
STOPPED = "stopped"  # stop() was called (AsyncSession: the task was cancelled)
REPEATED = "repeated"  # the model sent the same reply again after being told it had
WITHDRAWN = "withdrawn"  # stop(withdraw=True): the turn was taken back, as if the message had not been sent


@dataclass
class Turn:
    """One step: what the model said, the code it ran (if any) and what came of it."""

    model_output: str
    code: str | None = None
    execution: Execution | None = None
    model_seconds: float = 0.0
    first_token_seconds: float | None = None
    execution_seconds: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)


@dataclass
class Reply:
    """The outcome of one user message."""

    text: str
    solution: str | None
    turns: list[Turn]
    stop_reason: str

    @property
    def usage(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for turn in self.turns:
            for key, value in turn.usage.items():
                if isinstance(value, int):
                    total[key] = total.get(key, 0) + value
        return total

    @property
    def executions(self) -> list[Execution]:
        return [turn.execution for turn in self.turns if turn.execution is not None]


class Session:
    """A CodeAct conversation with its own sandbox session. Settings: explicit argument, then the
    environment (CODEACT_LLM_URL, CODEACT_MODEL, CODEACT_API_KEY, CODEACT_SANDBOX_URL,
    CODEACT_SANDBOX_TOKEN), then defaults (see Settings)."""

    def __init__(self, model: str | None = None, llm_url: str | None = None, sandbox_url: str | None = None, *,
                 api_key: str | None = None, sandbox_token: str | None = None, tools: Iterable[Callable] = (),
                 system_prompt: str | None = None, transcript_path: str | None = None,
                 timeout: float | None = None, request_timeout: float | None = None,
                 max_executions: int | None = None, settings: Settings | None = None,
                 on_input: Callable[[str], str] | None = None, network: bool = False,
                 env: dict[str, str] | None = None, on_tool_call: Callable[[bridge.Call], bool | None] | None = None,
                 tool_timeout: float = 30.0, tool_tracebacks: bool = False,
                 mcp_servers: Iterable[MCPServer] = (), user: str | None = None) -> None:
        self.settings = settings or resolve(
            model=model, llm_url=llm_url, sandbox_url=sandbox_url, api_key=api_key, sandbox_token=sandbox_token,
            timeout=timeout, request_timeout=request_timeout, max_executions=max_executions)
        self.tools: list[Tool] = [as_tool(function) for function in tools]
        self.setup = setup_code(self.tools)  # refuses an unshippable tool now, not mid-conversation
        # Host tools: called from sandbox code, run here. `on_tool_call` may refuse a call (return False).
        self.host_tools = bridge.HostTools({t.name: t.function for t in self.tools if not t.ship}, tool_timeout,
                                           on_tool_call, tool_tracebacks)
        self.base_prompt = system_prompt or protocol.SYSTEM_PROMPT + (protocol.NETWORK_NOTE if network else "")
        self.system_prompt = self._prompt()
        self.mcp_servers = list(mcp_servers)  # connected in open(): their tools join the host tools there
        self._mcp: MCPConnections | None = None
        self.messages: list[dict[str, str]] = []
        self.model = ModelClient(self.settings.llm_url, self.settings.model, self.settings.api_key,
                                 self.settings.request_timeout, self.settings.max_retries)
        self.on_input = on_input
        self.network = network  # the kernel gets the network (the sandbox server must have a token)
        self.env = dict(env or {})  # environment variables set in the kernel before its first code
        self.user = user  # on a gateway, who the kernel is started for (its quotas); see docs/scale-out.md
        self.transcript_path = transcript_path
        self._transcript: transcript.TranscriptWriter | None = None
        self._local: LocalSandbox | None = None
        self._sandbox: SandboxClient | None = None
        self._sandbox_session: str | None = None
        self._notes: list[str] = []  # said before the next user message (a fresh kernel, a stopped run's output)
        self._stop = threading.Event()
        self._withdraw = self._kernel_restarted = False
        self._executing = False
        self._append("system", self.system_prompt)

    # -- lifecycle -------------------------------------------------------------------------------------

    def open(self) -> Session:
        """Connect to the sandbox (starting a private one when no URL is set) and create the kernel session."""
        if self._sandbox_session is not None:
            return self
        url, token = self.settings.sandbox_url, self.settings.sandbox_token
        if url is None:
            self._local = LocalSandbox(pool_size=1).start()
            url, token = self._local.url, self._local.token
        self._sandbox = SandboxClient(url, token, self.settings.request_timeout)
        try:
            if self.mcp_servers and self._mcp is None:
                self._connect_mcp()
            self._sandbox_session = self._create_sandbox_session()
        except BaseException:
            self.close()  # what was started so far: a private sandbox, MCP connections
            raise
        return self

    def _connect_mcp(self) -> None:
        """List the MCP servers' tools; each becomes a host tool, grouped per server in the kernel."""
        from .mcp_tools import MCPConnections, namespaces_source, stub_name

        self._mcp = MCPConnections(self.mcp_servers, self.host_tools.event_loop())
        found = self._mcp.open()
        self.tools += found
        self.host_tools.tools.update({t.name: t.function for t in found})
        stubs = [bridge.stub_source(stub_name(t.name), t.function, t.description, call_name=t.name) for t in found]
        bridge_code = "" if "_codeact_call" in self.setup else bridge.kernel_source()
        self.setup = "\n\n".join(part for part in [self.setup, bridge_code, *stubs, namespaces_source(found)] if part)
        self.system_prompt = self._prompt()
        if len(self.messages) == 1 and self.messages[0]["role"] == "system":  # nothing said yet
            self.messages[0] = {"role": "system", "content": self.system_prompt}
            self._record({"type": "message", "role": "system", "content": self.system_prompt, "time": time.time()})

    def _prompt(self) -> str:
        return protocol.system_prompt([describe(t) for t in self.tools], self.base_prompt)

    def _create_sandbox_session(self) -> str:
        return self._sandbox.create_session(setup=self.setup, env=self.env, timeout=self.settings.timeout,
                                            network=self.network, user=self.user)

    def close(self) -> None:
        if self._sandbox is not None:
            if self._sandbox_session is not None:
                try:
                    self._sandbox.close_session(self._sandbox_session)
                except Exception:  # closing must not mask the error that brought us here
                    pass
            self._sandbox.close()
        self._sandbox = self._sandbox_session = None
        if self._local is not None:
            self._local.stop()
            self._local = None
        if self._transcript is not None:
            self._transcript.close()
        if self._mcp is not None:
            self._mcp.close()
            self._mcp = None
        self.host_tools.close()
        self.model.close()

    def __enter__(self) -> Session:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def reset(self) -> None:
        """Forget the conversation and start a fresh kernel; the transcript file keeps the old messages."""
        if self._sandbox is not None and self._sandbox_session is not None:
            self._sandbox.close_session(self._sandbox_session)
            self._sandbox_session = self._create_sandbox_session()
        self.messages = []
        self._notes = []
        self._append("system", self.system_prompt)

    @classmethod
    def resume(cls, path: str, **kwargs) -> Session:
        """Continue the conversation in a transcript: the model sees the history, the kernel is fresh and the
        model is told so, and new messages are appended to the same file."""
        meta, messages = transcript.read(path)
        kwargs.setdefault("model", meta.get("model"))
        session = cls(transcript_path=None, **kwargs)
        session.continue_from(messages)
        session.transcript_path = path
        return session

    def continue_from(self, messages: list[dict[str, str]]) -> None:
        """Take up a conversation kept elsewhere (a transcript, the web chat's store): the model sees its
        history; the kernel is fresh, and the model is told so with the next message."""
        self.messages = list(messages) or self.messages
        if any(m["role"] == "assistant" for m in messages):
            self._notes.append(protocol.KERNEL_REPLACED_NOTE)

    # -- the turn loop -----------------------------------------------------------------------------------

    def chat(self, message: str, on_event: Callable[[events.Event], None] | None = None) -> Reply:
        """Run the loop for one user message; `on_event` sees every event as it happens."""
        for event in self.stream(message):
            if on_event is not None:
                on_event(event)
            if isinstance(event, events.ReplyFinished):
                return event.reply
        raise AssertionError("stream ended without a reply")

    def stop(self, withdraw: bool = False) -> None:
        """Stop the reply in progress; callable from any thread. The model's stream ends, a running execute is
        interrupted, and `stream` finishes with stop_reason "stopped" (what the model said so far is kept).

        withdraw=True takes the turn back instead (stop_reason "withdrawn"): the conversation is as it was
        before the message. Code still running then is past its interrupt, so the kernel is restarted (and
        the model told so with the next message)."""
        self._withdraw = self._withdraw or withdraw
        self._stop.set()
        self.model.abort()
        if self._executing and self._sandbox is not None and self._sandbox_session is not None:
            try:
                if withdraw:
                    self._sandbox.restart(self._sandbox_session)
                    self._kernel_restarted = True
                else:
                    self._sandbox.interrupt(self._sandbox_session)
            except CodeActError:
                pass  # the execute ends anyway: by its timeout, or with its kernel

    def stream(self, message: str) -> Iterator[events.Event]:
        """Run the loop for one user message, yielding typed events as they happen; the last is ReplyFinished.

        A turn that does not finish (the caller stops iterating, Ctrl-C, an error from the model or the
        sandbox) is taken back: the conversation is as it was before the message, in memory and in the
        transcript, so the next message does not follow a user message left without an answer. What its code
        did to the kernel stays; `stop()` is the way to end a turn early and keep it."""
        self._stop.clear()
        self._withdraw = self._kernel_restarted = False
        self.open()
        before, notes = len(self.messages), list(self._notes)
        kept = False
        try:
            for event in self._turn(message):
                if isinstance(event, events.ReplyFinished):
                    if self._withdraw:
                        break
                    kept = True
                yield event
        except CodeActError:
            if not self._withdraw:  # withdrawing can cut the model's reply or the execute: expected then
                raise
        finally:
            if not kept:
                if len(self.messages) > before:
                    self._take_back(len(self.messages) - before)
                self._notes = notes + ([protocol.KERNEL_REPLACED_NOTE] if self._kernel_restarted else [])
        if not kept:
            yield events.ReplyFinished(Reply(text="", solution=None, turns=[], stop_reason=WITHDRAWN))

    def _take_back(self, count: int) -> None:
        del self.messages[-count:]
        self._record({"type": "take_back", "messages": count, "time": time.time()})

    def _turn(self, message: str) -> Iterator[events.Event]:
        self._append("user", "\n\n".join([*self._notes, message]))
        self._notes = []
        turns: list[Turn] = []
        executions = 0
        while True:
            said: list[str] = []
            try:
                completion = yield from self._ask_model(said)
            except CodeActError:
                if not self._stop.is_set():
                    raise
                completion = Completion("".join(said))
            if self._stop.is_set():
                turns.append(Turn(model_output=completion.text))
                self._append("assistant", completion.text)
                yield from self._finish(completion.text, turns, STOPPED)
                return
            code, kept = protocol.parse_action(completion.text, self.settings.fenced_code)
            turn = Turn(model_output=completion.text, code=code, model_seconds=completion.seconds,
                        first_token_seconds=completion.first_token_seconds, usage=completion.usage)
            turns.append(turn)
            self._append("assistant", kept)
            yield events.ModelReply(completion.text, completion.usage)
            if code is None or executions >= self.settings.max_executions:
                yield from self._finish(completion.text, turns, ANSWERED if code is None else EXECUTION_LIMIT)
                return
            executions += 1
            if len(turns) > 1 and completion.text.strip() == turns[-2].model_output.strip():
                # Word for word again: small models loop like this until the limit. Say so once, then stop.
                if len(turns) > 2 and turns[-2].code is not None and turns[-2].execution is None:
                    yield from self._finish(completion.text, turns, REPEATED)
                    return
                self._append("user", protocol.REPEATED)
                continue
            yield events.CodeStarted(code)
            started = time.monotonic()
            self._executing = True
            try:
                turn.execution = yield from self._execute(code)
            finally:
                self._executing = False
            turn.execution_seconds = time.monotonic() - started
            yield events.ExecutionFinished(turn.execution)
            observation = protocol.observation(turn.execution.text, turn.execution.new_kernel,
                                               self.settings.observation_head, self.settings.observation_tail)
            if self._stop.is_set():
                # Stopped: the output goes before the next user message, so that user and assistant messages
                # still alternate (a chat template may refuse two user messages in a row).
                self._notes.append(observation)
                yield from self._finish(completion.text, turns, STOPPED)
                return
            self._append("user", observation)

    def _finish(self, text: str, turns: list[Turn], reason: str) -> Iterator[events.Event]:
        reply = Reply(text=text, solution=protocol.parse_solution(text), turns=turns, stop_reason=reason)
        self._record({"type": "turns", "stop_reason": reason, "turns": [turn_record(t) for t in turns]})
        yield events.ReplyFinished(reply)

    def _ask_model(self, said: list[str]) -> Generator[events.Event, None, Completion]:
        """The model's next reply; what it streams is also appended to `said`, kept if it is stopped."""
        if not self.settings.stream_model:
            return self.model.complete(self.messages, stop=protocol.STOP_SEQUENCES,
                                       temperature=self.settings.temperature, max_tokens=self.settings.max_tokens)
            yield  # a generator either way, so `stream` composes both alike
        pieces = self.model.stream(self.messages, stop=protocol.STOP_SEQUENCES,
                                   temperature=self.settings.temperature, max_tokens=self.settings.max_tokens)
        while True:
            try:
                piece = next(pieces)
            except StopIteration as finished:
                return finished.value
            said.append(piece)
            if self._stop.is_set():
                pieces.close()  # closes the response
                return Completion("".join(said))
            yield events.ModelDelta(piece)

    def _execute(self, code: str) -> Generator[events.Event, None, Execution]:
        """The execute's events; input requests are answered here: host tool calls, else `on_input`."""
        raw = self._sandbox.execute_events(self._sandbox_session, code, self.settings.timeout)
        reply = None
        while True:
            try:
                event = raw.send(reply)
            except StopIteration as finished:
                return finished.value
            reply = None
            if event["type"] != "input_request":
                converted = output_event(event)
                if converted is not None:
                    yield converted
            elif event.get("prompt", "").startswith(bridge.MARKER):
                reply = yield from self._call_tool(event["prompt"])
            else:
                reply = self.on_input(event.get("prompt", "")) if self.on_input else ""

    def _call_tool(self, prompt: str) -> Generator[events.Event, None, str]:
        call = bridge.parse_call(prompt)
        if isinstance(call, str):
            return bridge.answer(bridge.Outcome(error=call))
        yield events.ToolCall(call.name, call.args, call.kwargs)
        outcome = self.host_tools.run(call)
        self._record({"type": "tool_call", "tool": call.name, "args": call.args, "kwargs": call.kwargs,
                      "value": outcome.value if outcome.error is None else None, "error": outcome.error,
                      "seconds": round(outcome.seconds, 4)})
        text = bridge.answer(outcome)  # may turn an unsendable result into an error
        yield events.ToolResult(call.name, outcome.value if outcome.error is None else None, outcome.error,
                                outcome.seconds, outcome.traceback)
        return text

    # -- files and transcripts -------------------------------------------------------------------------

    def upload(self, path: str, data: bytes) -> None:
        self.open()
        self._sandbox.upload(self._sandbox_session, path, data)

    def download(self, path: str) -> bytes:
        self.open()
        return self._sandbox.download(self._sandbox_session, path)

    def files(self) -> list[dict]:
        """The session directory's files: `{"path", "size", "modified"}` each, paths relative to it."""
        self.open()
        return self._sandbox.list_files(self._sandbox_session)

    def export(self, destination: str | None = None) -> dict:
        """The conversation in the ShareGPT `conversations` format of CodeActInstruct."""
        return transcript.to_sharegpt(self.messages, destination)

    def _append(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})
        writer = self._writer()
        if writer is not None:
            writer.message(role, content)

    def _record(self, record: dict) -> None:
        writer = self._writer()
        if writer is not None:
            writer.append(record)

    def _writer(self) -> transcript.TranscriptWriter | None:
        if self.transcript_path and self._transcript is None:
            self._transcript = transcript.TranscriptWriter(self.transcript_path, {"model": self.settings.model})
        return self._transcript


def output_event(event: dict) -> events.Event | None:
    """A sandbox event as the session's typed event; the rest (errors, input requests) are not relayed."""
    if event["type"] in ("stdout", "stderr"):
        return events.Output(event["type"], event.get("text", ""))
    if event["type"] in ("result", "display"):
        return events.Result(event["type"], event.get("data", {}))
    return None


def turn_record(turn: Turn) -> dict:
    execution = turn.execution
    return {
        "code": turn.code,
        "status": execution.status if execution else None,
        "model_seconds": round(turn.model_seconds, 4),
        "first_token_seconds": turn.first_token_seconds,
        "execution_seconds": round(turn.execution_seconds, 4),
        "usage": turn.usage,
    }
