#!/usr/bin/env python3
"""The project's commands, runnable on a fresh machine with only Python 3.10+.

    python3 dev.py demo     # the main job: a stalled run, diagnosed and escaped, logged to TensorBoard
    python3 dev.py test     # the test suite (--lowest: against the lowest allowed versions)
    python3 dev.py lint     # ruff and mypy
    python3 dev.py bench    # the overhead benchmark (writes benchmarks/results/overhead.md)
    python3 dev.py bench --step  # per-step cost beside Lightning's (results/step_overhead.md)
    python3 dev.py efficacy # plain vs EscapeCallback on every demo problem (results/efficacy.md)

Each command creates the virtual environment ``.venv`` next to this file, or reuses it, and installs
what it needs. torch is pinned by ``constraints.txt`` and installed first, so no other torch build is
ever resolved. Installation is skipped while ``pyproject.toml``, ``constraints.txt`` and the set of
extras are unchanged since the last install.
"""

from __future__ import annotations

import hashlib
import os
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


def _python(venv_dir: Path) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(*args: str | Path, env: dict[str, str] | None = None) -> int:
    print("+", " ".join(str(a) for a in args), flush=True)
    return subprocess.call([str(a) for a in args], cwd=ROOT, env=env)


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


def test(args: list[str]) -> int:
    """Run the test suite; an empty collection fails. ``--lowest`` uses the lowest versions."""
    if "--lowest" in args:
        args = [a for a in args if a != "--lowest"]
        python = ensure_venv("dev", *LOWEST)
    else:
        python = ensure_venv("dev")
    rc = _run(python, "-m", "pytest", *args, env=_env())
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


def main(argv: list[str]) -> int:
    """Dispatch ``argv[0]`` to its command."""
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
