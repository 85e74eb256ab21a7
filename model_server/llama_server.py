"""llama-cpp-python's OpenAI-compatible server, run with what CodeAct clients need and it lacks.

`python -m model_server.llama_server ARGS` takes llama_cpp.server's own arguments. Two changes:

- A streamed chat completion reports its usage (prompt and completion tokens) in its last chunk, the one
  with the finish reason, as vLLM and OpenAI do with `stream_options.include_usage`. llama-cpp-python
  reports usage only for replies that are not streamed, so every streamed turn lacked its prompt size.
- The RAM prompt cache (`--cache true`) keeps to its `--cache_size`. Each cached state also holds a batch of
  logits (n_batch x vocabulary floats: 311 MB for Qwen2.5), which the cache left out of its size: measured,
  the server grew by ~350 MB a turn past any bound. Counted, the bound holds.

The usage goes on the finishing chunk rather than in a chunk of its own with no choices: clients that never
asked for usage (the original CodeAct demo reads `choices[0]` of every chunk) see one more field and
nothing else.
"""

from __future__ import annotations

import functools
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
            completion_tokens = len(model.tokenize("".join(text).encode(), add_bos=False, special=True))
            chunk = {**chunk, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                        "total_tokens": prompt_tokens + completion_tokens}}
        yield chunk


def cache_size_with_logits(cache: LlamaRAMCache) -> int:
    return sum(state.llama_state_size + state.scores.nbytes for state in cache.cache_state.values())


LlamaRAMCache.cache_size = property(cache_size_with_logits)
llama_cpp.Llama.create_completion = create_completion_counting_the_prompt
llama_cpp.Llama.create_chat_completion = create_chat_completion_with_usage

if __name__ == "__main__":
    main()
