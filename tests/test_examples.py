"""Every example script runs as it is, at a small step count, and prints what it promises.

Each runs in its own process, as a reader would run it (``python examples/X.py --steps N --out
DIR`` from the repository root), so no global state (seeds, warning filters, logging levels,
``sys.argv``) leaks between the examples and the rest of the suite. ``examples/demo.py`` is run by
``python3 dev.py demo`` and is not repeated here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(*args: str | Path, timeout: float = 240) -> str:
    """Run ``python examples/<args>`` from the repository root; return stdout and stderr."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["MPLBACKEND"] = "Agg"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, *(str(a) for a in args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{output[-4000:]}"
    return output


def event_files(root: Path) -> list[Path]:
    return sorted(root.rglob("events.out.tfevents.*"))


def test_every_example_is_tested() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py")} - {"demo.py"}
    assert scripts == {
        "quickstart.py",
        "smoke_alarm.py",
        "cli.py",
        "custom_step.py",
        "read_report.py",
    }


def test_quickstart(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    out = run_example(EXAMPLES / "quickstart.py", "--steps", "30", "--out", tmp_path)
    assert "Trained 30 steps" in out
    assert f"TensorBoard logs: {tmp_path.resolve()}" in out
    assert event_files(tmp_path)


def test_smoke_alarm(tmp_path: Path) -> None:
    out = run_example(EXAMPLES / "smoke_alarm.py", "--steps", "350", "--out", tmp_path)
    assert re.search(r"=== deep_linear.*\n  diagnosis at step \d+: plateau\n", out)
    assert re.search(r"=== matrix_factorization.*\n  diagnosis at step \d+: saddle\n", out)
    assert "no diagnosis: the run never stalled" in out  # the healthy control
    assert out.count("parameters bitwise identical to a run without the detector: True") == 3
    assert len(event_files(tmp_path)) == 3


def test_cli(tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    out = run_example(
        EXAMPLES / "cli.py",
        "fit",
        "--config",
        EXAMPLES / "cli_config.yaml",
        "--trainer.max_steps",
        "20",
        "--trainer.default_root_dir",
        tmp_path,
    )
    assert "Trained 20 steps" in out
    # the nested YAML reached the callback: detector, classifier and ladders
    assert "Configured: EscapeCallback(StallDetector(training loss, mode='min', patience=100" in out
    assert "ladder plateau: [\"Perturb(radius=0.5, scale='auto', seed=0)\", " in out
    assert "'LRKick(factor=10.0, steps=50)'" in out
    assert "ladder local_minimum: []" in out
    assert event_files(tmp_path) and list(tmp_path.rglob("config.yaml"))


def test_custom_step(tmp_path: Path) -> None:
    out = run_example(EXAMPLES / "custom_step.py", "--steps", "300", "--out", tmp_path)
    assert "stronger: Shake(radius=1e-10, noise_steps=10, noise=0.1, seed=0)" in out
    assert (
        "Shake(radius=1e-12, noise_steps=10, noise=0.1, seed=0) against saddle -> rolled_back"
        in out
    )
    assert (
        "Shake(radius=1e-10, noise_steps=10, noise=0.1, seed=0) against saddle -> accepted" in out
    )
    assert "final point (" in out


def test_read_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = run_example(EXAMPLES / "read_report.py", "--steps", "250", "--out", tmp_path)
    [png] = tmp_path.rglob("report.png")
    [md] = tmp_path.rglob("report.md")
    assert f"Timeline: {png.resolve()}" in out and f"Summary:  {md.resolve()}" in out
    assert "# lightning_escape run report" in out and "| plateau | 1 |" in out
    assert "escapes: 1 (1 accepted, 0 kept without effect, 0 rolled back, 0 pending)" in out
    assert f"lightning-escape report {png.parent.resolve()}" in out
    assert png.read_bytes().startswith(b"\x89PNG")
