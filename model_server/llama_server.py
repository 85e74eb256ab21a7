"""llama-cpp-python's OpenAI-compatible server, run with what CodeAct clients need and it lacks.

`python -m model_server.llama_server ARGS` takes llama_cpp.server's own arguments, and one of its own. The
changes:

- A streamed chat completion reports its usage (prompt and completion tokens) in its last chunk, the one
  with the finish reason, as vLLM and OpenAI do with `stream_options.include_usage`. llama-cpp-python
  reports usage only for replies that are not streamed, so every streamed turn lacked its prompt size.
- No extra weight buffers (AMX, repacking): a natively built llama.cpp used AMX on a virtual machine whose CPU
  advertised it and crashed on the first completion (`model_params_without_extra_buffers`).
- The RAM prompt cache (`--cache true`) keeps to its `--cache_size`. Each cached state also holds a batch of
  logits (n_batch x vocabulary floats: 311 MB for Qwen2.5), which the cache left out of its size: measured,
  the server grew by ~350 MB a turn past any bound. Counted, the bound holds.

- `--return_stop_strings true` (ours): a completion cut by one of the request's stop strings ends with that
  string, as vLLM does with `include_stop_str_in_output` (and as the vLLM release the original CodeAct clients
  were written against always did). Those clients run code only when the reply holds a closing `</execute>`:
  their demo matches `<execute>(.*)</execute>`, their chat-ui fork completes a trailing `</execute`. Servers
  that drop the stop string, llama-cpp-python's among them, leave them never running any code. With the
  option on, the request's stop strings are watched here rather than by llama-cpp-python, on the text as it
  streams: the chunk that completes one is cut after it and the generation is closed.

The usage goes on the finishing chunk rather than in a chunk of its own with no choices: clients that never
asked for usage (the original CodeAct demo reads `choices[0]` of every chunk) see one more field and
nothing else.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterator

import llama_cpp
from llama_cpp.llama_cache import LlamaRAMCache
from llama_cpp.server.__main__ import main

create_completion = llama_cpp.Llama.create_completion
create_chat_completion = llama_cpp.Llama.create_chat_completion


@functools.wraps(create_completion)
def create_completion_counting_the_prompt(self: llama_cpp.Llama, prompt, *args, **kwargs):
    # The chat handlers call this with the formatted prompt, already tokenized (a string where a format does
    # not tokenize it). Noted on the model for the chat completion that called it: requests hold the model
    # one at a time, so the next request cannot overwrite it in between.
    self.codeact_prompt_tokens = len(prompt) if isinstance(prompt, list) else len(
        self.tokenize(prompt.encode(), add_bos=True, special=True))
    return create_completion(self, prompt, *args, **kwargs)


@functools.wraps(create_chat_completion)
def create_chat_completion_with_usage(self: llama_cpp.Llama, *args, **kwargs):
    result = create_chat_completion(self, *args, **kwargs)
    if not kwargs.get("stream"):
        return result
    return with_usage(self, result, getattr(self, "codeact_prompt_tokens", 0))


def with_usage(model: llama_cpp.Llama, chunks: Iterator[dict], prompt_tokens: int) -> Iterator[dict]:
    text = []
    for chunk in chunks:
        choice = chunk["choices"][0] if chunk.get("choices") else {}
        text.append(choice.get("delta", {}).get("content") or "")
        if choice.get("finish_reason") is not None:
            chunk = {**chunk, "usage": usage(model, prompt_tokens, "".join(text))}
        yield chunk


def usage(model: llama_cpp.Llama, prompt_tokens: int, completion: str) -> dict:
    completion_tokens = len(model.tokenize(completion.encode(), add_bos=False, special=True))
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def create_completion_returning_stop_strings(self: llama_cpp.Llama, prompt, *args, stop=None, stream=False,
                                             **kwargs):
    stops = [stop] if isinstance(stop, str) else [text for text in stop or () if text]
    if not stops or args or kwargs.get("logprobs") is not None:  # positional options: not a server's call
        return create_completion_counting_the_prompt(self, prompt, *args, stop=stop, stream=stream, **kwargs)
    chunks = ending_with_stop_string(
        create_completion_counting_the_prompt(self, prompt, stop=None, stream=True, **kwargs), stops)
    return chunks if stream else joined(self, list(chunks))


def ending_with_stop_string(chunks: Iterator[dict], stops: list[str]) -> Iterator[dict]:
    """Completion chunks up to and including the first stop string the text completes; the generation is
    closed there. A stop string may span chunks, so the end of the text already passed on is kept to look
    for one across the boundary."""
    keep = max(map(len, stops)) - 1
    passed = ""
    for chunk in chunks:
        choice = chunk["choices"][0]
        window = passed + choice["text"]
        ends = [window.find(text) + len(text) for text in stops if text in window]
        if ends:
            chunks.close()  # llama-cpp-python's generator: closing it stops the generation
            # The text and the finish go in two chunks: the chat handler drops the text of a finishing chunk.
            yield {**chunk, "choices": [{**choice, "text": window[len(passed):min(ends)], "finish_reason": None}]}
            yield {**chunk, "choices": [{**choice, "text": "", "finish_reason": "stop"}]}
            return
        yield chunk
        if choice["finish_reason"] is not None:
            return
        passed = window[-keep:] if keep else ""


def joined(model: llama_cpp.Llama, chunks: list[dict]) -> dict:
    """A reply that is not streamed, from its chunks: llama-cpp-python's text completion."""
    text = "".join(chunk["choices"][0]["text"] for chunk in chunks)
    first = chunks[0] if chunks else {"id": f"cmpl-{time.time_ns()}", "created": int(time.time()), "model": ""}
    return {"id": first["id"], "object": "text_completion", "created": first["created"], "model": first["model"],
            "choices": [{"text": text, "index": 0, "logprobs": None,
                         "finish_reason": chunks[-1]["choices"][0]["finish_reason"] if chunks else "stop"}],
            "usage": usage(model, getattr(model, "codeact_prompt_tokens", 0), text)}


def option(argv: list[str], name: str) -> tuple[bool, list[str]]:
    """A `--name true|false` option of ours, taken out of llama_cpp.server's arguments."""
    if name not in argv:
        return False, argv
    at = argv.index(name)
    if at + 1 == len(argv) or argv[at + 1] not in ("true", "false"):
        raise SystemExit(f"{name} takes true or false")
    return argv[at + 1] == "true", argv[:at] + argv[at + 2:]


def cache_size_with_logits(cache: LlamaRAMCache) -> int:
    return sum(state.llama_state_size + state.scores.nbytes for state in cache.cache_state.values())


def model_params_without_extra_buffers() -> llama_cpp.llama_cpp.llama_model_params:
    """llama.cpp's model defaults, less its CPU backend's extra weight buffers (AMX tiles, repacked layouts). Built
    for this machine (pip compiles llama.cpp natively), it uses AMX wherever the CPU advertises it, and a virtual
    machine can advertise AMX that faults: seen here, every completion killed the server (a general protection
    fault on `ldtilecfg` in ggml_backend_amx_mul_mat) and the stack never answered. Without them the weights stay
    in plain CPU buffers, computed with AVX2/AVX-512: decode measured 14 tokens/s on the 0.5B model, as before."""
    params = llama_model_default_params()
    params.use_extra_bufts = False
    return params


llama_model_default_params = llama_cpp.llama_cpp.llama_model_default_params
llama_cpp.llama_cpp.llama_model_default_params = model_params_without_extra_buffers
LlamaRAMCache.cache_size = property(cache_size_with_logits)
llama_cpp.Llama.create_completion = create_completion_counting_the_prompt
llama_cpp.Llama.create_chat_completion = create_chat_completion_with_usage

if __name__ == "__main__":
    return_stop_strings, sys.argv = option(sys.argv, "--return_stop_strings")
    if return_stop_strings:
        llama_cpp.Llama.create_completion = create_completion_returning_stop_strings
    main()
