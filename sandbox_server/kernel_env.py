"""The kernel environment: the Python installation kernels run in, found once at start-up.

By default it is the server's own interpreter (a venv made by `make install`, or wherever `codeact[server]`
was installed, which brings the data stack through the `[kernel]` extra). An operator can name another
with `--kernel-python`, e.g. a venv holding their company's packages; it needs ipykernel, and the stack is
reported, not required. Kernels then see that environment and only it: `sys.executable` is its interpreter
(never resolved past a venv's symlink), its `bin` leads PATH, and `pip` installs go through the session's
own prefix (packages.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

# What a kernel is expected to have, by distribution name: the set the original CodeAct image and E2B's
# kernel ship, and what models reach for first. Reported at start-up; missing ones are a warning.
STACK = ("numpy", "pandas", "scipy", "sympy", "matplotlib", "pillow", "scikit-learn", "requests")

# Run by the environment's interpreter: metadata only (importing the stack would take seconds).
INSPECT = """
import importlib.metadata as metadata, json, sys
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
print(json.dumps({"version": "%d.%d" % sys.version_info[:2], "prefix": sys.prefix, "base_prefix": sys.base_prefix,
                  "path": [entry for entry in sys.path if entry], "ipykernel": version("ipykernel"),
                  "stack": {name: version(name) for name in STACK}}))
"""


@dataclass(frozen=True)
class KernelEnvironment:
    python: str  # the interpreter kernels run, as given (a venv's bin/python, not what it links to)
    version: str  # "3.11"
    paths: tuple[str, ...]  # directories the interpreter reads, made reachable in the kernel's mount namespace
    stack: tuple[tuple[str, str | None], ...]  # (distribution, version or None when missing)

    @property
    def bin_dir(self) -> str:
        return os.path.dirname(self.python)

    @property
    def site_packages(self) -> str:
        """Where a prefix install puts packages for this interpreter, relative to the prefix."""
        return os.path.join("lib", f"python{self.version}", "site-packages")

    def report(self) -> str:
        present = [f"{name} {version}" for name, version in self.stack if version]
        missing = [name for name, version in self.stack if not version]
        text = f"kernel environment: {self.python} (Python {self.version}): {', '.join(present) or 'no data stack'}"
        if missing:
            text += f"; missing: {', '.join(missing)} (pip install 'codeact[kernel]' into it)"
        return text


def inspect(python: str | None = None, timeout: float = 30.0) -> KernelEnvironment:
    """The environment of `python` (default: this interpreter); ValueError, with the reason, when it cannot
    run kernels."""
    python = os.path.abspath(python) if python else sys.executable
    if not os.access(python, os.X_OK) or os.path.isdir(python):
        raise ValueError(f"--kernel-python {python}: not an executable file")
    try:
        done = subprocess.run([python, "-I", "-c", f"STACK = {STACK!r}\n{INSPECT}"], capture_output=True,
                              timeout=timeout, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ValueError(f"--kernel-python {python}: does not run ({error})") from None
    if done.returncode != 0:
        raise ValueError(f"--kernel-python {python}: does not run: {done.stderr.decode(errors='replace')[-300:]}")
    found = json.loads(done.stdout)
    if not found["ipykernel"]:
        raise ValueError(f"--kernel-python {python}: ipykernel is not installed there "
                         f"(install it, or the whole kernel environment: pip install 'codeact[kernel]')")
    paths = {found["prefix"], found["base_prefix"], os.path.dirname(python),
             os.path.dirname(os.path.realpath(python)), *found["path"]}
    return KernelEnvironment(
        python=python,
        version=found["version"],
        paths=tuple(sorted(os.path.realpath(p) for p in paths if os.path.isdir(p))),
        stack=tuple(found["stack"].items()),
    )
