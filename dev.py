#!/usr/bin/env python3
"""The project's commands, runnable on a fresh machine with only Python 3.10+.

    python3 dev.py demo     # the main job: a stalled run, diagnosed and escaped, logged to TensorBoard
    python3 dev.py test     # the test suite on every core (--lowest: the lowest allowed versions)
    python3 dev.py lint     # ruff and mypy
    python3 dev.py bench    # the overhead benchmark, with the committed results' settings
    python3 dev.py bench --step  # per-step cost beside Lightning's (results/step_overhead.md)
    python3 dev.py efficacy # plain vs EscapeCallback on every demo problem
    python3 dev.py --help   # this list

``bench`` and ``efficacy`` print a line per finished run with an estimate of the time left and
write a new file, ``benchmarks/results/overhead-<time>.md`` or ``efficacy-<time>.md``; with
``--overwrite`` they replace the committed ``overhead.md`` or ``efficacy.md``, with ``--out PATH``
they write PATH. Ctrl-C stops them and their worker processes; nothing is written then.

Each command creates the virtual environment ``.venv`` next to this file, or reuses it, and installs
what it needs. torch is pinned by ``constraints.txt`` and installed first, so no other torch build is
ever resolved. Installation is skipped while ``pyproject.toml``, ``constraints.txt`` and the set of
extras are unchanged since the last install.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("LIGHTNING_ESCAPE_VENV", ROOT / ".venv"))
CONSTRAINTS = ROOT / "constraints.txt"
# The lowest dependency versions pyproject.toml allows, tested in a venv of their own.
LOWEST = (ROOT / ".venv-lowest", ROOT / "constraints-lowest.txt")
# pytest's exit status when it collected no tests: an empty run must never pass silently.
NO_TESTS_COLLECTED = 5
# The shell's exit status of a command stopped by Ctrl-C (128 + SIGINT).
INTERRUPTED = 130


def _python(venv_dir: Path) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(*args: str | Path, env: dict[str, str] | None = None) -> int:
    print("+", " ".join(str(a) for a in args), flush=True)
    with subprocess.Popen([str(a) for a in args], cwd=ROOT, env=env) as proc:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            return _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    """After a Ctrl-C: let the command stop (it got the same Ctrl-C), else make it stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan it
    steps = [(lambda: None, 2.0), (proc.terminate, 10.0)]
    if os.name != "nt":  # a Ctrl-C sent to dev.py alone: pass it on first
        steps.insert(1, (lambda: proc.send_signal(signal.SIGINT), 30.0))
    for act, timeout in steps:
        act()
        try:
            rc = proc.wait(timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        proc.kill()
        rc = proc.wait()
    print("dev.py: interrupted", file=sys.stderr)
    return rc if rc > 0 else INTERRUPTED


def _check(*args: str | Path) -> None:
    rc = _run(*args)
    if rc != 0:
        sys.exit(f"dev.py: command failed with exit status {rc}")


def ensure_venv(extras: str, venv_dir: Path = VENV, constraints: Path = CONSTRAINTS) -> Path:
    """Create or reuse ``venv_dir`` and install the project with ``extras`` (``""`` for none)."""
    python = _python(venv_dir)
    if not python.exists():
        print(f"Creating the virtual environment {venv_dir}", flush=True)
        venv.EnvBuilder(with_pip=True).create(venv_dir)
    digest = hashlib.sha256()
    for path in (ROOT / "pyproject.toml", constraints):
        digest.update(path.read_bytes())
    digest.update(f"{extras}|{sys.version_info[:2]}".encode())
    stamp = venv_dir / f".installed-{extras or 'base'}"
    if stamp.exists() and stamp.read_text() == digest.hexdigest():
        return python
    pip = (python, "-m", "pip", "install", "--disable-pip-version-check", "-c", constraints)
    # torch first and on its own: it is the one package whose resolution must not be left to chance.
    _check(*pip, "torch")
    target = f".[{extras}]" if extras else "."
    _check(*pip, "-e", target)
    stamp.write_text(digest.hexdigest())
    return python


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # One thread per process: on small shared machines parallel elementwise kernels stall.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def demo(args: list[str]) -> int:
    """Run the demo (base install)."""
    python = ensure_venv("")
    return _run(python, ROOT / "examples" / "demo.py", *args, env=_env())


def _workers(args: list[str]) -> list[str]:
    """pytest-xdist's ``-n``: a worker per core (at most 4), unless ``args`` choose for themselves.

    The tests are small and single-threaded (``OMP_NUM_THREADS=1``), so the cores run them side by
    side; more than 4 workers only add start-up time.
    """
    if any(a.startswith(("-n", "--numprocesses", "--dist")) for a in args) or "no:xdist" in args:
        return []
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    workers = min(cores, 4)
    return ["-n", str(workers)] if workers > 1 else []


def test(args: list[str]) -> int:
    """Run the test suite; an empty collection fails. ``--lowest`` uses the lowest versions."""
    if "--lowest" in args:
        args = [a for a in args if a != "--lowest"]
        python = ensure_venv("dev", *LOWEST)
    else:
        python = ensure_venv("dev")
    rc = _run(python, "-m", "pytest", *_workers(args), *args, env=_env())
    if rc == NO_TESTS_COLLECTED:
        print("dev.py: pytest collected no tests; that is a failure, not a pass", file=sys.stderr)
        return 1
    return rc


def lint(args: list[str]) -> int:
    """Run ruff (lint and format check) and mypy."""
    python = ensure_venv("dev")
    rc = _run(python, "-m", "ruff", "check", ".", *args)
    rc = _run(python, "-m", "ruff", "format", "--check", ".") or rc
    return _run(python, "-m", "mypy") or rc


def bench(args: list[str]) -> int:
    """Run the overhead benchmark; ``--step`` runs the per-step cost benchmark instead."""
    python = ensure_venv("dev")
    script = "overhead.py"
    if "--step" in args:
        args = [a for a in args if a != "--step"]
        script = "step_overhead.py"
    return _run(python, ROOT / "benchmarks" / script, *args, env=_env())


def efficacy(args: list[str]) -> int:
    """Run the efficacy benchmark."""
    python = ensure_venv("dev")
    return _run(python, ROOT / "benchmarks" / "efficacy.py", *args, env=_env())


COMMANDS = {"demo": demo, "test": test, "lint": lint, "bench": bench, "efficacy": efficacy}


HELP = ("--help", "-h", "help")
# The exit status of a missing or unknown command, as argparse uses for a usage error.
USAGE_ERROR = 2


def main(argv: list[str]) -> int:
    """Dispatch ``argv[0]`` to its command; ``--help`` prints the commands."""
    if argv and argv[0] in HELP:
        print(__doc__)
        return 0
    if not argv or argv[0] not in COMMANDS:
        if argv:
            print(f"dev.py: unknown command {argv[0]!r}", file=sys.stderr)
        print(__doc__, file=sys.stderr)
        return USAGE_ERROR
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
