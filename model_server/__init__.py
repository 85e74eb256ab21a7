"""codeact model server: vLLM pinned to CUDA devices, or llama.cpp with an embedded model on the CPU."""

from .launch import Launch, LlamaOptions, VllmOptions, llama_launch, vllm_launches
from .supervisor import StartError, Supervisor

__all__ = ["Launch", "LlamaOptions", "StartError", "Supervisor", "VllmOptions", "llama_launch", "vllm_launches"]
