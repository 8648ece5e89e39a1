"""The run report: event files read back, escapes paired with verdicts, the PNG, markdown and CLI."""

from __future__ import annotations

import math
import os
import re
import struct
import subprocess
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from models import Scripted, fit
from torch.utils.tensorboard import SummaryWriter

import lightning_escape
from lightning_escape import EscapeCallback, LRKick, StallDetector
from lightning_escape.report import (
    EscapeRecord,
    MissingDependencyError,
    ReportError,
    ReportWarning,
    RunLog,
    find_runs,
    load_run,
    main,
    render_markdown,
    render_png,
    write_report,
)

torch.set_num_threads(1)

ROOT = Path(lightning_escape.__file__).resolve().parents[1]
KINDS = ("plateau", "saddle", "local_minimum", "symmetric_units", "dead_units")

LRKICK = "LRKick(factor=10.0, steps=5)"
PERTURB = "Perturb(radius=0.5, scale='auto', seed=0)"
NCS = "NegativeCurvatureStep(scale=1.0)"
LAST = 600


def monitored(step: int) -> float:
    """2.0 until the accepted escape starts at 300, then down to 0.01 at 600 (more than 2 decades)."""
    return 2.0 if step <= 300 else 2.0 * math.exp(-math.log(200.0) * (step - 300) / 300)


def write_synthetic(run_dir: Path) -> None:
    """A run in exactly the tag scheme the callbacks write, with known escapes and verdicts.

    plateau at 200 -> LRKick, rolled back at 300 -> Perturb (escalated at once), probation extended
    at 400, accepted at 500; saddle at 550 -> NegativeCurvatureStep, still pending at 600.
    """
    with SummaryWriter(str(run_dir)) as w:
        for step in range(0, LAST + 1, 5):
            w.add_scalar("grad/norm", 0.5 * math.exp(-step / 200) + 1e-3, step)
        probation = [(201, 500), (551, LAST)]
        for step in range(0, LAST + 1, 10):
            w.add_scalar("stall/monitored", monitored(step), step)
            w.add_scalar("stall/score", min(step, 200) / 200, step)
            w.add_scalar("stall/grad_ratio", 1.0, step)
            w.add_scalar("stall/diagnosis", float(step in (200, 550)), step)
            w.add_scalar("escape/escape", float(step in (200, 300, 550)), step)
            on = any(a <= step <= b for a, b in probation)
            w.add_scalar("escape/probation", float(on), step)
            w.add_scalar("escape/verdict", {300: -1.0, 500: 1.0}.get(step, 0.0), step)
        for step, lmax, lmin in ((200, 4.0, 1e-4), (300, 3.5, 2e-4), (550, 2.0, -0.3)):
            w.add_scalar("stall/lambda_max", lmax, step)
            w.add_scalar("stall/lambda_min", lmin, step)
        w.add_scalar("escape/verdict_before", 2.0, 300)
        w.add_scalar("escape/verdict_after", 2.0, 300)
        w.add_scalar("escape/verdict_before", 2.0, 500)
        w.add_scalar("escape/verdict_after", 0.125, 500)
        texts = [
            (
                200,
                "stall/diagnosis",
                "**plateau** at step 200: loss 2 has not improved in 200 steps",
            ),
            (
                200,
                "escape/escape",
                f"**{LRKICK}** at step 200 against **plateau**: learning rate x10.0 for 5 steps; "
                "because loss 2 has not improved in 200 steps. Judged at step 300.",
            ),
            (
                300,
                "escape/verdict",
                f"**rolled_back**: {LRKICK} from step 200: loss 2 -> 2, not better by 0.02: "
                "restored the state of step 200",
            ),
            (
                300,
                "escape/escape",
                f"**{PERTURB}** at step 300 against **plateau**: jumped 2 tensors; because loss 2 "
                "has not improved in 200 steps. Judged at step 400.",
            ),
            (
                400,
                "escape/escape",
                f"probation of {PERTURB} extended to step 500: the monitored value 2 -> 1.9 is "
                "better, not yet by 0.02",
            ),
            (
                500,
                "escape/verdict",
                f"**accepted**: {PERTURB} from step 300: loss 2 -> 0.125, better by more than "
                "0.02: kept",
            ),
            (550, "stall/diagnosis", "**saddle** at step 550: λ_min = -0.3 | a descent remains"),
            (
                550,
                "escape/escape",
                f"**{NCS}** at step 550 against **saddle**: stepped along the eigenvector; because "
                "λ_min = -0.3. Judged at step 750.",
            ),
        ]
        for step, tag, text in texts:
            w.add_text(tag, text, step)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log directory: a synthetic run, and a run that lightning_escape did not log."""
    root = tmp_path_factory.mktemp("logs")
    write_synthetic(root / "synthetic")
    with SummaryWriter(str(root / "unrelated")) as w:
        w.add_scalar("train_loss", 1.0, 0)
    return root


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run logged by EscapeCallback itself (whatever tag scheme the callbacks write now)."""
    root = tmp_path_factory.mktemp("real")
    escape = EscapeCallback(
        StallDetector(patience=20, warmup_steps=0, check_every_n_steps=5, smoothing=0.0),
        probation_steps=20,
        max_escapes=2,
        ladders={k: [LRKick(factor=10.0, steps=5)] for k in KINDS},
    )
    logger = TensorBoardLogger(root)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        fit(Scripted([1.0] * 40 + [0.5] * 40), [escape], max_steps=80, logger=logger)
    return Path(logger.log_dir)


def is_png(path: Path) -> tuple[int, int]:
    """The PNG's width and height (asserting the signature and the IHDR chunk)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# ----------------------------------------------------------------------------- reading back


def test_find_runs_and_load_every_tag(logs: Path) -> None:
    assert find_runs(logs) == [logs / "synthetic", logs / "unrelated"]
    run = load_run(logs / "synthetic")
    assert run.name == "synthetic" and run.path == logs / "synthetic"
    assert run.first_step == 0 and run.last_step == LAST
    assert len(run.scalars["grad/norm"]) == LAST // 5 + 1
    assert run.scalars["stall/monitored"][:2] == [(0, 2.0), (10, 2.0)]
    steps, values = zip(*run.scalars["stall/lambda_min"])
    assert steps == (200, 300, 550)
    assert values == pytest.approx((1e-4, 2e-4, -0.3))  # stored as float32
    assert run.scalars["escape/verdict_after"] == [(300, 2.0), (500, 0.125)]
    assert [s for s, v in run.scalars["escape/verdict"] if v] == [300, 500]
    assert set(run.texts) == {"stall/diagnosis", "escape/escape", "escape/verdict"}
    assert [s for s, _ in run.texts["escape/escape"]] == [200, 300, 400, 550]


def test_diagnoses_escapes_and_notes(logs: Path) -> None:
    run = load_run(logs / "synthetic")
    assert [(d.step, d.kind) for d in run.diagnoses()] == [(200, "plateau"), (550, "saddle")]
    assert run.diagnoses()[1].reason == "λ_min = -0.3 | a descent remains"
    assert run.escapes() == [
        EscapeRecord(
            200,
            300,
            LRKICK,
            "plateau",
            "rolled_back",
            2.0,
            2.0,
            "learning rate x10.0 for 5 steps; because loss 2 has not improved in 200 steps",
            "loss 2 -> 2, not better by 0.02: restored the state of step 200",
        ),
        EscapeRecord(
            300,
            500,  # the verdict's step, not the first "Judged at": probation was extended
            PERTURB,
            "plateau",
            "accepted",
            2.0,
            0.125,
            "jumped 2 tensors; because loss 2 has not improved in 200 steps",
            "loss 2 -> 0.125, better by more than 0.02: kept",
        ),
        EscapeRecord(
            550,
            None,
            NCS,
            "saddle",
            "pending",
            pytest.approx(monitored(550)),
            None,
            "stepped along the eigenvector; because λ_min = -0.3",
        ),
    ]
    assert [e.steps(run.last_step) for e in run.escapes()] == [100, 200, 50]
    [(step, note)] = run.notes()
    assert step == 400 and note.startswith(f"probation of {PERTURB} extended to step 500")


def test_verdicts_pair_with_the_escape_they_name_in_order() -> None:
    def escape(step: int, action: str) -> tuple[int, str]:
        return step, f"**{action}** at step {step} against **saddle**: did it; because. "

    def verdict(step: int, outcome: str, action: str, started: int) -> tuple[int, str]:
        return step, f"**{outcome}**: {action} from step {started}: loss 1 -> 1: restored"

    run = RunLog(
        "r",
        Path("r"),
        texts={
            "escape/escape": [escape(10, "A()"), escape(20, "B()"), escape(20, "C()")],
            # B's verdict first, then one naming no escape logged (its text was lost), then C's.
            "escape/verdict": [
                verdict(20, "rolled_back", "B()", 20),
                verdict(25, "accepted", "X()", 3),
                verdict(30, "accepted", "C()", 20),
            ],
        },
    )
    got = [(e.start, e.end, e.action, e.diagnosis, e.verdict) for e in run.escapes()]
    assert got == [
        (3, 25, "X()", "unknown", "accepted"),
        (10, None, "A()", "saddle", "pending"),
        (20, 20, "B()", "saddle", "rolled_back"),
        (20, 30, "C()", "saddle", "accepted"),
    ]


def test_the_lowest_value_is_a_kept_models() -> None:
    # A trial from 10 to 30 measured 0.1 at step 20 and was rolled back: the summary gave it as
    # the run's lowest; the run's own lowest is 0.5 at step 50.
    run = RunLog(
        "r",
        Path("r"),
        scalars={"stall/monitored": [(0, 1.0), (20, 0.1), (30, 1.0), (50, 0.5)]},
        texts={
            "escape/escape": [(10, "**Perturb()** at step 10 against **saddle**: jumped.")],
            "escape/verdict": [(30, "**rolled_back**: Perturb() from step 10: loss 1 -> 1")],
        },
    )
    text = render_markdown(run)
    assert (
        "- monitored value: 1 at step 0, 0.5 at step 50 (lowest 0.5 at step 50; 0.1 at step 20 "
        "in a trial rolled back)"
    ) in text


def test_markdown_summary_with_exact_numbers(logs: Path) -> None:
    text = render_markdown(load_run(logs / "synthetic"))
    assert text.startswith("# lightning_escape run report: synthetic\n")
    for line in [
        "- stalls diagnosed: 2 (plateau 1, saddle 1)",
        "- escapes: 3 (1 accepted, 0 kept without effect, 1 rolled back, 1 pending)",
        "- steps on probation: 350",
        "- steps wasted in rolled-back trials: 100",
        "- monitored value: 2 at step 0, 0.01 at step 600 (lowest 0.01 at step 600)",
        "| plateau | 1 |",
        f"| `{LRKICK}` | 0 | 0 | 1 | 0 | 1 |",
        f"| `{PERTURB}` | 1 | 0 | 0 | 0 | 1 |",
        f"| 1 | 200 | 300 | 100 | plateau | `{LRKICK}` | rolled back | 2 | 2 |",
        f"| 2 | 300 | 500 | 200 | plateau | `{PERTURB}` | accepted | 2 | 0.125 |",
        f"| 3 | 550 |  | 50 | saddle | `{NCS}` | pending | 0.02418 |  |",
        "| 550 | saddle | λ_min = -0.3 \\| a descent remains |",  # a pipe in a cell is escaped
        "## Notes",
    ]:
        assert line in text.splitlines(), line
    assert "![timeline]" not in text
    assert "![timeline](report.png)" in render_markdown(load_run(logs / "synthetic"), "report.png")


def test_png_timeline(logs: Path, tmp_path: Path) -> None:
    path = render_png(load_run(logs / "synthetic"), tmp_path / "deep" / "t.png")
    assert path == tmp_path / "deep" / "t.png"
    assert is_png(path) == (1400, 900)
    assert path.stat().st_size > 20_000


def test_report_on_a_run_the_callbacks_logged(real_run: Path, tmp_path: Path) -> None:
    run = load_run(real_run)
    assert run.series("stall/monitored")  # the new tag, or the one logged before it
    assert (24, "plateau") in [(d.step, d.kind) for d in run.diagnoses()]
    first = run.escapes()[0]
    assert (first.start, first.end, first.action, first.diagnosis, first.verdict) == (
        24,
        44,
        "LRKick(factor=10.0, steps=5)",
        "plateau",
        "accepted",
    )
    assert (first.before, first.after) == (1.0, 0.5)
    assert 1 <= len(run.escapes()) <= 2
    written = write_report(real_run.parent, out_dir=tmp_path)
    assert written == [tmp_path / "version_0" / "report.png", tmp_path / "version_0" / "report.md"]
    width, height = is_png(written[0])
    assert (width, height) == (1400, 900)
    assert "| `LRKick(factor=10.0, steps=5)` |" in written[1].read_text(encoding="utf-8")


# ------------------------------------------------------------------------------- write_report


def test_write_report_into_each_run_skipping_foreign_runs(logs: Path, tmp_path: Path) -> None:
    with pytest.warns(ReportWarning, match="unrelated: not logged by lightning_escape"):
        written = write_report(logs, out_dir=tmp_path / "out")
    assert written == [tmp_path / "out/synthetic/report.png", tmp_path / "out/synthetic/report.md"]
    assert "![timeline](report.png)" in written[1].read_text(encoding="utf-8")
    run_dir = tmp_path / "one"
    write_synthetic(run_dir)
    assert write_report(run_dir) == [run_dir / "report.png", run_dir / "report.md"]


def test_errors_name_the_path(logs: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ReportError, match=re.escape(f"{missing}: no such directory")):
        load_run(missing)
    with pytest.raises(ReportError, match="no TensorBoard event files"):
        write_report(tmp_path)
    with pytest.raises(
        ReportError, match=r"unrelated: no stall/, escape/ or grad/ tags.*not logged"
    ):
        load_run(logs / "unrelated")
    with pytest.raises(ReportError, match="unrelated: no stall/, escape/ or grad/ tags"):
        write_report(logs / "unrelated")
    with pytest.raises(ReportError, match="holds 2 runs \\(synthetic, unrelated\\)"):
        load_run(logs)
    only_foreign = tmp_path / "foreign"
    for name in ("a", "b"):
        with SummaryWriter(str(only_foreign / name)) as w:
            w.add_scalar("loss", 1.0, 0)
    with pytest.warns(ReportWarning), pytest.raises(ReportError, match="none of its 2 runs"):
        write_report(only_foreign)
    assert issubclass(ReportError, ValueError)


def test_without_matplotlib_the_error_says_how_to_install_it(
    logs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = load_run(logs / "synthetic")
    with pytest.raises(MissingDependencyError, match='pip install "lightning-escape\\[report\\]"'):
        render_png(run, tmp_path / "x.png")
    with pytest.raises(ImportError, match="pip install matplotlib"):
        render_png(run, tmp_path / "x.png")
    assert render_markdown(run)  # the markdown needs no matplotlib
    assert main(["report", str(logs / "synthetic"), "--out", str(tmp_path)]) == 2


# ------------------------------------------------------------------------------------- CLI


def test_cli_in_process(logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: lightning-escape" in capsys.readouterr().err
    assert main([], prog="python -m lightning_escape") == 2
    assert "usage: python -m lightning_escape" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "report" in capsys.readouterr().out
    assert main(["report", "--help"]) == 0
    assert "--out DIR" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "nope: no such directory" in capsys.readouterr().err
    assert main(["report", str(logs / "synthetic"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'synthetic' / 'report.png'}" in out
    assert "- escapes: 3 (1 accepted, 0 kept without effect, 1 rolled back, 1 pending)" in out


def test_cli_says_where_it_cannot_write(
    logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A traceback (FileNotFoundError, exit status 1) where every other bad argument is a usage
    # error: here `--out` names a path under a file.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["report", str(logs / "synthetic"), "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-escape: error: cannot write the report of ")
    assert str(blocker / "out" / "synthetic") in err


def test_cli_as_a_module(logs: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "lightning_escape",
        "report",
        str(logs),
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {tmp_path / 'synthetic' / 'report.md'}" in proc.stdout
    assert "- steps wasted in rolled-back trials: 100" in proc.stdout
    assert "skipped" in proc.stderr and "unrelated" in proc.stderr
    assert is_png(tmp_path / "synthetic" / "report.png") == (1400, 900)


def test_console_script_is_declared() -> None:
    [script] = [e for e in entry_points(group="console_scripts") if e.name == "lightning-escape"]
    assert script.value == "lightning_escape.report:main"
