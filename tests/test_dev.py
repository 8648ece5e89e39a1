"""``dev.py``'s help, and the efficacy benchmark's Ctrl-C, which must leave no worker behind."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("demo", "test", "lint", "bench", "efficacy")


def _dev(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "dev.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("flag", ["--help", "-h", "help"])
def test_help_lists_the_commands_and_exits_0(flag: str) -> None:
    proc = _dev(flag)
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert f"python3 dev.py {command}" in proc.stdout


@pytest.mark.parametrize("args", [[], ["no-such-command"]])
def test_a_missing_or_unknown_command_is_a_usage_error(args: list[str]) -> None:
    proc = _dev(*args)
    assert proc.returncode == 2
    assert "python3 dev.py test" in proc.stderr
    if args:
        assert "unknown command 'no-such-command'" in proc.stderr


def _processes() -> dict[int, tuple[int, int]]:
    """Every live process: pid -> (parent pid, process group); zombies left out."""
    try:
        import psutil
    except ModuleNotFoundError:
        psutil = None
    if psutil is not None:
        found = {}
        for p in psutil.process_iter():
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    found[p.pid] = (p.ppid(), os.getpgid(p.pid))
            except (psutil.Error, ProcessLookupError):
                continue
        return found
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it ended meanwhile
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
        state, ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if state != "Z":
            found[int(entry.name)] = (int(ppid), int(pgrp))
    return found


@pytest.mark.skipif(
    sys.platform != "linux", reason="process groups and /proc (or psutil): Linux only"
)
def test_ctrl_c_stops_the_efficacy_benchmark_and_its_workers() -> None:
    # Its own process group (a session), as a shell runs a foreground job: Ctrl-C signals the group.
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "efficacy.py"),
            # Runs of several seconds each (about 5 s): after the first one is done, the signal
            # comes long before the last one ends, however loaded the machine.
            *("--problems", "monkey_saddle", "--seeds", "0,1,2", "--workers", "2"),
            *("--out", os.devnull),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    output: list[str] = []
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while True:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, "".join(output)
            output.append(line)
            if line.startswith("[1/6]"):
                break
        workers = {pid for pid, (ppid, _) in _processes().items() if ppid == proc.pid}
        assert workers, "no worker processes while runs were left"
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    while (line := lines.get(timeout=10)) is not None:
        output.append(line)
    text = "".join(output)
    assert rc == 130, text
    assert "interrupted" in text
    assert "Traceback" not in text
    # Whatever is left (the workers, or a process they started) has a few seconds to go.
    left: dict[int, tuple[int, int]] = {}
    for _ in range(50):
        left = {
            pid: owner
            for pid, owner in _processes().items()
            if pid in workers or owner[1] == proc.pid
        }
        if not left:
            break
        time.sleep(0.1)
    assert left == {}, f"processes left behind: {left}\n{text}"


def _dev_module() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args", [["-n", "0"], ["-n0"], ["--numprocesses=3"], ["--dist", "no"], ["-p", "no:xdist"]]
)
def test_the_tests_run_in_the_workers_the_arguments_choose(args: list[str]) -> None:
    assert _dev_module()._workers(args) == []  # type: ignore[attr-defined]


def test_the_tests_run_on_every_core_up_to_four(monkeypatch: pytest.MonkeyPatch) -> None:
    dev = _dev_module()
    for cores, expected in [(1, []), (2, ["-n", "2"]), (16, ["-n", "4"])]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert dev._workers(["tests/test_dev.py"]) == expected  # type: ignore[attr-defined]
