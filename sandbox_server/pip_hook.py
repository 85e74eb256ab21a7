"""`pip install` inside a local kernel, which has no network: the server fetches the wheels, the kernel installs.

The server copies this file as `sitecustomize.py` into a directory at the head of the kernel's PYTHONPATH, so
it runs when any Python process in the kernel starts and acts only when that process is pip installing:
`!pip install`, `!pip3 install`, `%pip install`, `!python -m pip install` and `!{sys.executable} -m pip
install` all come here. For packages named from the index it asks the server, over the session's socket,
to resolve them against the kernel environment and download the wheels needed (on the host, where no
package code runs: wheels only); pip then installs exactly those, with no index, into the session's own
prefix (on PYTHONPATH, gone with the session). Local files (`pip install ./x.whl`) install as usual, offline.

Self-contained, standard library only: it runs in whatever environment the kernels use.
"""

import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import socket
import sys

# pip install options, by what this hook does with them.
FORWARDED = {"-U": "upgrade", "--upgrade": "upgrade", "--pre": "pre", "--no-deps": "no_deps",
             "--force-reinstall": "force", "-I": "force", "--ignore-installed": "force"}
KEPT = {"-q", "--quiet", "-v", "--verbose", "--no-color", "--no-warn-script-location", "--no-cache-dir",
        "--disable-pip-version-check", "--no-input", "--isolated", "--no-compile", "--compile"}
KEPT_WITH_VALUE = {"--progress-bar", "--root-user-action"}
DROPPED = {"--user", "--break-system-packages"}  # installs always go to the session's prefix here
REQUIREMENT_FILES = {"-r", "--requirement"}
OPTION_SPELLING = re.compile(r"^-[qv]+$")  # -qq, -vvv
LOCAL = re.compile(r"(^[./~])|(/)|(\.(whl|zip|tar\.gz|tgz|tar\.bz2)$)|(://)|(\s@\s)|(^@)")


class NotForUs(Exception):
    """An install this hook leaves to pip as given (local files, options it does not know)."""


def read_requirement_file(path, depth=0):
    requirements = []
    with open(path) as handle:
        for line in handle:
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            if line.split()[0] in REQUIREMENT_FILES and depth < 5:
                nested = line.split(None, 1)[1].strip()
                requirements += read_requirement_file(os.path.join(os.path.dirname(path), nested), depth + 1)
            elif line.startswith("-"):
                raise NotForUs(line)
            else:
                requirements.append(line)
    return requirements


def parse(arguments):
    """(requirements from the index, forwarded flags, kept options) of `pip install ARGUMENTS`."""
    requirements, flags, kept = [], {}, []
    items = iter(arguments)
    for item in items:
        option, _, value = item.partition("=") if item.startswith("--") else (item, "", "")
        if option in DROPPED:
            continue
        if option in FORWARDED:
            flags[FORWARDED[option]] = True
            if FORWARDED[option] == "force":
                kept.append("--force-reinstall")
        elif option in KEPT or OPTION_SPELLING.match(option):
            kept.append(item)
        elif option in KEPT_WITH_VALUE:
            kept += [option, value or next(items, "")]
        elif option in REQUIREMENT_FILES:
            requirements += read_requirement_file(value or next(items, ""))
        elif item.startswith("-r") and len(item) > 2:
            requirements += read_requirement_file(item[2:])
        elif item.startswith("-") or LOCAL.search(item) or os.path.exists(item):
            raise NotForUs(item)  # an option this hook does not know, a local file, a URL
        else:
            requirements.append(item)
    return requirements, flags, kept


def ask_server(request):
    """The server's answer to one install request, over the session's socket."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(float(os.environ.get("CODEACT_PIP_TIMEOUT", "120")) + 10)
    try:
        connection.connect(os.environ["CODEACT_PIP_SOCKET"])
        connection.sendall(json.dumps(request).encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    except OSError as error:
        return {"ok": False, "error": f"the sandbox server did not answer ({error})"}
    finally:
        connection.close()
    try:
        return json.loads(answer)
    except ValueError:
        return {"ok": False, "error": "the sandbox server gave no answer"}


def normalized(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def remove_from_prefix(names):
    """Remove earlier versions of these projects from the session's prefix (never from the environment), so
    that one version of each stays."""
    prefix, site = os.environ.get("PIP_PREFIX", ""), os.environ.get("CODEACT_PIP_SITE", "")
    if not prefix or not os.path.isdir(site):
        return
    wanted = {normalized(name) for name in names}
    for entry in os.listdir(site):
        if not entry.endswith(".dist-info") or normalized(entry[:-10].rsplit("-", 1)[0]) not in wanted:
            continue
        record = os.path.join(site, entry, "RECORD")
        if os.path.exists(record):
            with open(record) as handle:
                for line in handle:
                    path = os.path.normpath(os.path.join(site, line.rsplit(",", 2)[0]))
                    if path.startswith(prefix + os.sep) and os.path.isfile(path):
                        os.remove(path)
        shutil.rmtree(os.path.join(site, entry), ignore_errors=True)


def pip_install(arguments):
    """Rewrite `pip install ARGUMENTS` to install what the server fetched, or exit with its refusal."""
    try:
        requirements, flags, kept = parse(arguments)
    except NotForUs:
        return  # pip runs as given: offline, from local files and the session's wheels
    except OSError as error:
        finish(f"ERROR: {error}", 1)
    if not requirements:
        return  # pip says what is missing
    answer = ask_server({"requirements": requirements, **flags})
    if not answer.get("ok"):
        finish(f"ERROR: {answer.get('error', 'the install was refused')}", 1)
    install = answer.get("install", [])
    if not install:
        finish("\n".join(f"Requirement already satisfied: {requirement}" for requirement in requirements), 0)
    remove_from_prefix(pinned.split("==")[0] for pinned in install)
    # The wheels directory is pip's --find-links through PIP_FIND_LINKS; PIP_NO_INDEX keeps it offline.
    sys.argv[1:] = ["install", "--no-deps", "--ignore-installed", *kept, *install]


def finish(message, code):
    """End this process here: SystemExit raised during site's import of this module would be a fatal error."""
    print(message, file=sys.stderr if code else sys.stdout, flush=True)
    os._exit(code)


def pip_arguments():
    """The arguments after `pip` when this process is pip (`python -m pip ...` or a pip script), else None."""
    argv = sys.orig_argv
    if len(argv) >= 3 and argv[1] == "-m" and argv[2] == "pip":
        return sys.argv[1:]
    if len(argv) >= 2 and re.fullmatch(r"pip(3(\.\d+)?)?", os.path.basename(argv[1])):
        return sys.argv[1:]
    return None


def chain():
    """Run the environment's own sitecustomize, if it has one: this file took its name."""
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.machinery.PathFinder.find_spec(
        "sitecustomize", [entry for entry in sys.path if os.path.abspath(entry or ".") != here])
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


def main():
    arguments = pip_arguments()
    if arguments and arguments[0] == "install" and os.environ.get("CODEACT_PIP_SOCKET"):
        sys.argv[:] = [item for item in sys.argv if item not in DROPPED]
        pip_install(sys.argv[2:])
    chain()


main()
