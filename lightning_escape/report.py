"""Run reports: what the callbacks logged to TensorBoard, read back as a timeline and a summary.

:func:`load_run` reads a run's event files with TensorBoard's own reader into a :class:`RunLog`
(scalar series and text events); :meth:`RunLog.diagnoses` and :meth:`RunLog.escapes` turn the text
events back into records. :func:`render_png` draws the timeline (monitored value, gradient norm and
Hessian eigenvalues, with every escape shaded by its verdict and every diagnosis marked),
:func:`render_markdown` writes the summary, and :func:`write_report` does both for every run under a
log directory. The command line::

    lightning-escape report LOGDIR [--out DIR]
    python -m lightning_escape report LOGDIR [--out DIR]

The tags read are those the callbacks write: scalars ``stall/monitored``, ``stall/score``,
``stall/grad_ratio``, ``stall/lambda_max``, ``stall/lambda_min``, ``stall/diagnosis``,
``grad/norm``, ``escape/escape``, ``escape/probation``, ``escape/verdict``,
``escape/verdict_before`` and ``escape/verdict_after``, and the text events ``stall/diagnosis``,
``escape/escape`` and ``escape/verdict``. Runs logged before the ``stall/`` and ``grad/`` tags
(everything under ``escape/``) are read through :data:`LEGACY_TAGS`.

The PNG needs matplotlib (``pip install "lightning-escape[report]"``); everything else needs only
the package's own dependencies.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "LEGACY_TAGS",
    "DiagnosisRecord",
    "EscapeRecord",
    "MissingDependencyError",
    "ReportError",
    "ReportWarning",
    "RunLog",
    "find_runs",
    "load_run",
    "main",
    "render_markdown",
    "render_png",
    "write_report",
]

EVENT_FILES = "events.out.tfevents.*"
PREFIXES = ("stall/", "escape/", "grad/")
INSTALL_HINT = 'pip install "lightning-escape[report]" (or pip install matplotlib)'

MONITORED = "stall/monitored"
GRAD_NORM = "grad/norm"
LAMBDA_MAX = "stall/lambda_max"
LAMBDA_MIN = "stall/lambda_min"
DIAGNOSIS = "stall/diagnosis"
ESCAPE = "escape/escape"
VERDICT = "escape/verdict"
VERDICT_BEFORE = "escape/verdict_before"
VERDICT_AFTER = "escape/verdict_after"

#: Where runs logged before the ``stall/`` and ``grad/`` tags keep the same series.
LEGACY_TAGS = {
    MONITORED: "escape/monitored",
    "stall/score": "escape/stall_score",
    "stall/grad_ratio": "escape/grad_ratio",
    LAMBDA_MAX: "escape/lambda_max",
    LAMBDA_MIN: "escape/lambda_min",
    GRAD_NORM: "escape/grad_norm",
    DIAGNOSIS: "escape/diagnosis",  # the text events
}

Outcome = Literal["accepted", "neutral", "rolled_back", "pending"]
COLOURS: dict[str, str] = {
    "accepted": "tab:green",
    "neutral": "tab:olive",
    "rolled_back": "tab:red",
    "pending": "grey",
}
VERDICTS: tuple[Outcome, ...] = ("accepted", "neutral", "rolled_back", "pending")
KIND_COLOURS = {
    "plateau": "tab:blue",
    "saddle": "tab:purple",
    "local_minimum": "tab:brown",
    "symmetric_units": "tab:orange",
    "dead_units": "tab:olive",
    "vanishing_gradient": "tab:cyan",
    "diverging": "black",
}

_DIAGNOSIS_TEXT = re.compile(
    r"\*\*(?P<kind>[^*]+)\*\* at step (?P<step>\d+): (?P<reason>.*)\Z", re.S
)
_ESCAPE_TEXT = re.compile(
    r"\*\*(?P<action>.+?)\*\* at step (?P<step>\d+) against \*\*(?P<kind>[^*]+)\*\*: "
    # "Judged at step N." or "Judged at the first validation after step N." (and older texts).
    r"(?P<reason>.*?)\.?(?:\s+Judged at (?P<judged>.*?)\.)?\s*\Z",
    re.S,
)
# A trial whose change never came in force (a dataloader that ignored `batch_size`).
_WITHDRAWN_TEXT = re.compile(
    r"(?P<action>.+?) from step (?P<started>\d+) did not act \((?P<reason>.*)\): withdrawn, unjudged\Z",
    re.S,
)
_VERDICT_TEXT = re.compile(
    r"\*\*(?P<outcome>accepted|neutral|rolled_back)\*\*: (?P<action>.+?) from step (?P<started>\d+): "
    r"(?P<reason>.*)\Z",
    re.S,
)


class ReportError(ValueError):
    """A log directory or run that cannot be reported on; the message names the path."""


class MissingDependencyError(ReportError, ImportError):
    """matplotlib, which the PNG needs, is not installed; the message says how to install it."""


class ReportWarning(UserWarning):
    """A run under a log directory was skipped (it was not logged by lightning_escape)."""


@dataclass(frozen=True)
class DiagnosisRecord:
    """One diagnosis, read back from its ``stall/diagnosis`` text event.

    Attributes:
        step: Optimizer step of the check that diagnosed it.
        kind: ``plateau``, ``saddle``, ... (``unknown`` when the text does not name one).
        reason: The detector's sentence.
    """

    step: int
    kind: str
    reason: str


@dataclass(frozen=True)
class EscapeRecord:
    """One escape and its verdict, read back from the ``escape/escape`` and ``escape/verdict`` texts.

    Attributes:
        start: Optimizer step of the check that started it.
        end: Optimizer step of its verdict (None while pending).
        action: The escape step, as ``Name(arg=value, ...)``.
        diagnosis: The kind of stall it answered (``unknown`` when no escape text was found).
        verdict: ``"accepted"``, ``"neutral"`` (kept without effect), ``"rolled_back"`` or
            ``"pending"``.
        before: Monitored value compared at the verdict (or at the start, while pending).
        after: Monitored value at the verdict (None while pending).
        reason: What was done and why.
        verdict_reason: The verdict's sentence ("" while pending).
    """

    start: int
    end: int | None
    action: str
    diagnosis: str
    verdict: Outcome
    before: float | None = None
    after: float | None = None
    reason: str = ""
    verdict_reason: str = ""

    def steps(self, last_step: int) -> int:
        """Optimizer steps from its start to its verdict, or to ``last_step`` while pending."""
        return (self.end if self.end is not None else max(last_step, self.start)) - self.start


@dataclass
class RunLog:
    """What one run logged: scalar series and text events by tag, in the order they were written.

    Attributes:
        name: The run's name (its path under the log directory it was found in).
        path: The run directory.
        scalars: Tag to ``[(step, value), ...]``.
        texts: Tag to ``[(step, markdown), ...]`` (TensorBoard's ``T/text_summary`` stored as ``T``).

    Example:
        >>> run = RunLog("demo", Path("runs/demo"), scalars={"stall/monitored": [(0, 1.0), (10, 0.5)]},
        ...     texts={"stall/diagnosis": [(10, "**plateau** at step 10: flat")],
        ...            "escape/escape": [(10, "**LRKick(factor=10.0, steps=5)** at step 10 against "
        ...                                   "**plateau**: kicked; because flat. Judged at step 30.")],
        ...            "escape/verdict": [(30, "**accepted**: LRKick(factor=10.0, steps=5) from step 10: "
        ...                                    "loss 0.5 -> 0.2, better by more than 0.005: kept")]})
        >>> run.diagnoses()
        [DiagnosisRecord(step=10, kind='plateau', reason='flat')]
        >>> [(e.start, e.end, e.action, e.diagnosis, e.verdict) for e in run.escapes()]
        [(10, 30, 'LRKick(factor=10.0, steps=5)', 'plateau', 'accepted')]
        >>> run.last_step, run.logged_by_lightning_escape
        (30, True)
    """

    name: str
    path: Path
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    @property
    def logged_by_lightning_escape(self) -> bool:
        """Whether any tag is one of the callbacks' (``stall/``, ``escape/`` or ``grad/``)."""
        return any(tag.startswith(PREFIXES) for tag in (*self.scalars, *self.texts))

    @property
    def first_step(self) -> int:
        """The lowest step of any scalar or text event (0 without any)."""
        return min(self._steps(), default=0)

    @property
    def last_step(self) -> int:
        """The highest step of any scalar or text event (0 without any)."""
        return max(self._steps(), default=0)

    def _steps(self) -> list[int]:
        events: list[list[Any]] = [*self.scalars.values(), *self.texts.values()]
        return [step for series in events for step, _ in series]

    def series(self, tag: str) -> list[tuple[int, float]]:
        """The scalar series of ``tag``, or of its :data:`LEGACY_TAGS` name; ``[]`` if neither."""
        if tag in self.scalars:
            return self.scalars[tag]
        return self.scalars.get(LEGACY_TAGS.get(tag, tag), [])

    def text_events(self, tag: str) -> list[tuple[int, str]]:
        """The text events of ``tag``, or of its :data:`LEGACY_TAGS` name; ``[]`` if neither."""
        if tag in self.texts:
            return self.texts[tag]
        return self.texts.get(LEGACY_TAGS.get(tag, tag), [])

    def diagnoses(self) -> list[DiagnosisRecord]:
        """Every diagnosis, by step."""
        found = []
        for step, text in self.text_events(DIAGNOSIS):
            m = _DIAGNOSIS_TEXT.match(text.strip())
            if m is None:
                found.append(DiagnosisRecord(step, "unknown", text.strip()))
            else:
                found.append(DiagnosisRecord(int(m["step"]), m["kind"], m["reason"].strip()))
        return sorted(found, key=lambda d: d.step)

    def notes(self) -> list[tuple[int, str]]:
        """The free-form ``escape/escape`` texts (probation extended, no escape possible, ...)."""
        return [
            (step, text.strip())
            for step, text in self.text_events(ESCAPE)
            if _ESCAPE_TEXT.match(text.strip()) is None
        ]

    def escapes(self) -> list[EscapeRecord]:
        """Every escape with its verdict, by start step.

        Escape texts and verdict texts are paired in order: a verdict goes to the first escape not
        yet judged that started at the step its text names. An escape without a verdict is pending
        (one withdrawn unjudged, whose change never came in force, is left out);
        a verdict without an escape text (a lost event) is kept, with its diagnosis ``unknown``.
        """
        started: list[re.Match[str]] = []
        for _, text in sorted(self.text_events(ESCAPE), key=lambda e: e[0]):
            m = _ESCAPE_TEXT.match(text.strip())
            if m is not None:
                started.append(m)
            elif (w := _WITHDRAWN_TEXT.match(text.strip())) is not None:
                # Withdrawn unjudged: it never acted, and is no escape of the run.
                gone = [
                    i
                    for i, e in enumerate(started)
                    if e["step"] == w["started"] and e["action"] == w["action"]
                ]
                if gone:
                    del started[gone[-1]]
        before = _by_step(self.series(VERDICT_BEFORE))
        after = _by_step(self.series(VERDICT_AFTER))
        judged: dict[int, EscapeRecord] = {}
        orphans: list[EscapeRecord] = []
        for step, text in sorted(self.text_events(VERDICT), key=lambda e: e[0]):
            v = _VERDICT_TEXT.match(text.strip())
            if v is None:
                continue
            begun = int(v["started"])
            free = [i for i in range(len(started)) if i not in judged]
            pick = [i for i in free if int(started[i]["step"]) == begun]
            record = EscapeRecord(
                start=begun,
                end=step,
                action=v["action"],
                diagnosis="unknown",
                verdict=cast(Outcome, v["outcome"]),
                before=before.get(step),
                after=after.get(step),
                verdict_reason=v["reason"].strip(),
            )
            if not pick:
                orphans.append(record)
                continue
            m = started[pick[0]]
            judged[pick[0]] = replace(
                record,
                start=int(m["step"]),
                action=m["action"],
                diagnosis=m["kind"],
                reason=m["reason"].strip(),
            )
        monitored = _by_step(self.series(MONITORED))
        records = list(orphans)
        for i, m in enumerate(started):
            if i in judged:
                records.append(judged[i])
                continue
            start = int(m["step"])
            records.append(
                EscapeRecord(
                    start=start,
                    end=None,
                    action=m["action"],
                    diagnosis=m["kind"],
                    verdict="pending",
                    before=monitored.get(start),
                    reason=m["reason"].strip(),
                )
            )
        return sorted(records, key=lambda e: e.start)


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _by_step(series: list[tuple[int, float]]) -> dict[int, float]:
    return dict(series)


def _natural(path: Path) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.as_posix())]


def find_runs(logdir: str | Path) -> list[Path]:
    """Every run under ``logdir``: each directory (``logdir`` itself included) holding event files.

    Args:
        logdir: A run directory or a directory holding runs at any depth.

    Returns:
        The run directories, in natural order (``version_2`` before ``version_10``).

    Raises:
        ReportError: ``logdir`` does not exist, is not a directory, or holds no event files.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     for run in ("a/version_10", "a/version_2"):
        ...         (Path(tmp) / run).mkdir(parents=True)
        ...         (Path(tmp) / run / "events.out.tfevents.1.host").touch()
        ...     [p.relative_to(tmp).as_posix() for p in find_runs(tmp)]
        ['a/version_2', 'a/version_10']
    """
    root = Path(logdir)
    if not root.exists():
        raise ReportError(f"{root}: no such directory")
    if not root.is_dir():
        raise ReportError(f"{root}: not a directory (pass the run's directory, not a file)")
    runs = {p.parent for p in root.rglob(EVENT_FILES) if p.is_file()}
    if not runs:
        raise ReportError(
            f"{root}: no TensorBoard event files ({EVENT_FILES}) in it or below it; "
            "is this the logger's directory?"
        )
    return sorted(runs, key=lambda p: _natural(p.relative_to(root)))


def _run_name(run_dir: Path, root: Path) -> str:
    rel = run_dir.relative_to(root).as_posix()
    return rel if rel != "." else run_dir.resolve().name


def _read(run_dir: Path, name: str) -> RunLog:
    """Read every scalar and text event of the event files directly in ``run_dir``."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    guidance = {
        ea.SCALARS: 0,
        ea.TENSORS: 0,
        ea.HISTOGRAMS: 1,
        ea.COMPRESSED_HISTOGRAMS: 1,
        ea.IMAGES: 1,
        ea.AUDIO: 1,
    }
    acc = ea.EventAccumulator(str(run_dir), size_guidance=guidance)
    try:
        acc.Reload()
    except Exception as err:  # a truncated or foreign file: say which run
        raise ReportError(f"{run_dir}: cannot read its event files: {err}") from err
    tags = acc.Tags()
    run = RunLog(name, run_dir)
    for tag in tags.get(ea.SCALARS, []):
        run.scalars[tag] = [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]
    for tag in tags.get(ea.TENSORS, []):
        plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
        events = acc.Tensors(tag)
        if plugin == "text":
            key = tag.removesuffix("/text_summary")
            run.texts[key] = [(int(e.step), _text(e.tensor_proto)) for e in events]
        elif plugin == "scalars":  # written by tf.summary.scalar rather than add_scalar
            run.scalars[tag] = [
                (int(e.step), float(tensor_util.make_ndarray(e.tensor_proto))) for e in events
            ]
    return run


def _text(proto: Any) -> str:
    values = list(proto.string_val)
    if not values:
        return ""
    raw = values[0]
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def load_run(logdir: str | Path) -> RunLog:
    """Read one run's scalars and text events with TensorBoard's reader (nothing is sampled away).

    Args:
        logdir: The run directory, or a directory holding exactly one run below it.

    Returns:
        The run's :class:`RunLog`.

    Raises:
        ReportError: The directory is missing, holds no event files or several runs (use
            :func:`find_runs` to pick one), or the run has no ``stall/``, ``escape/`` or ``grad/``
            tag (it was not logged by lightning_escape).

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     with SummaryWriter(tmp) as w:
        ...         w.add_scalar("stall/monitored", 2.5, 10)
        ...         w.add_text("stall/diagnosis", "**saddle** at step 10: negative curvature", 10)
        ...     run = load_run(tmp)
        >>> run.scalars["stall/monitored"], run.diagnoses()[0].kind
        ([(10, 2.5)], 'saddle')
    """
    root = Path(logdir)
    runs = find_runs(root)
    if len(runs) > 1:
        names = ", ".join(_run_name(r, root) for r in runs[:5]) + (", ..." if len(runs) > 5 else "")
        raise ReportError(
            f"{root}: holds {len(runs)} runs ({names}); pass one of them, or report on all of "
            "them with write_report / `lightning-escape report`"
        )
    run = _read(runs[0], _run_name(runs[0], root))
    _check_ours(run)
    return run


def _check_ours(run: RunLog) -> None:
    if not run.logged_by_lightning_escape:
        tags = sorted({*run.scalars, *run.texts})
        shown = ", ".join(tags[:5]) + (", ..." if len(tags) > 5 else "") if tags else "none"
        raise ReportError(
            f"{run.path}: no stall/, escape/ or grad/ tags (found: {shown}); this run was not "
            "logged by lightning_escape (add GradientMonitor, StallDetector or EscapeCallback "
            "to the Trainer, with a TensorBoardLogger)"
        )


# --------------------------------------------------------------------------------------- markdown


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(run: RunLog, image: str | None = None) -> str:
    """A markdown summary of a run: stalls, escapes, verdicts, their cost, and both as tables.

    Args:
        run: The run.
        image: A path to the timeline PNG to show under the title (relative to the markdown file),
            or None for none.

    Returns:
        The markdown, ending with a newline.

    Example:
        >>> run = RunLog("r", Path("r"), scalars={"stall/monitored": [(0, 1.0), (50, 0.5)]},
        ...     texts={"escape/escape": [(10, "**Perturb(radius=0.5)** at step 10 against "
        ...                                   "**saddle**: jumped. Judged at step 30.")],
        ...            "escape/verdict": [(30, "**rolled_back**: Perturb(radius=0.5) from step 10: "
        ...                                    "loss 1 -> 1, not better by 0.01: restored")]})
        >>> text = render_markdown(run)
        >>> print(text[text.index("## Summary"):text.index("## Stalls")].strip())
        ## Summary
        <BLANKLINE>
        - stalls diagnosed: 0
        - escapes: 1 (0 accepted, 0 kept without effect, 1 rolled back, 0 pending)
        - steps on probation: 20
        - steps wasted in rolled-back trials: 20
        - monitored value: 1 at step 0, 0.5 at step 50 (lowest 0.5 at step 50)
    """
    diagnoses = run.diagnoses()
    escapes = run.escapes()
    last = run.last_step
    verdicts = Counter(e.verdict for e in escapes)
    kinds = Counter(d.kind for d in diagnoses)
    on_probation = sum(e.steps(last) for e in escapes)
    wasted = sum(e.steps(last) for e in escapes if e.verdict == "rolled_back")

    lines = [f"# lightning_escape run report: {run.name}", ""]
    lines += [f"Run directory `{run.path}`, steps {run.first_step} to {last}.", ""]
    if image is not None:
        lines += [f"![timeline]({image})", ""]
    by_kind = ", ".join(f"{k} {n}" for k, n in kinds.most_common())
    lines += ["## Summary", ""]
    lines.append(f"- stalls diagnosed: {len(diagnoses)}" + (f" ({by_kind})" if by_kind else ""))
    lines.append(
        f"- escapes: {len(escapes)} ({verdicts['accepted']} accepted, {verdicts['neutral']} kept "
        f"without effect, {verdicts['rolled_back']} rolled back, {verdicts['pending']} pending)"
    )
    lines.append(f"- steps on probation: {on_probation}")
    lines.append(f"- steps wasted in rolled-back trials: {wasted}")
    monitored = [(s, v) for s, v in run.series(MONITORED) if math.isfinite(v)]
    if monitored:
        (s0, v0), (s1, v1) = monitored[0], monitored[-1]
        # A value measured of a trial that was rolled back is no model's the run went on with.
        undone = [(e.start, e.end) for e in escapes if e.verdict == "rolled_back" and e.end]
        kept = [(s, v) for s, v in monitored if not any(a < s <= b for a, b in undone)]
        lowest = min(kept or monitored, key=lambda e: e[1])
        text = f"lowest {_fmt(lowest[1])} at step {lowest[0]}"
        in_trial = min(monitored, key=lambda e: e[1])
        if kept and in_trial[1] < lowest[1]:
            text += f"; {_fmt(in_trial[1])} at step {in_trial[0]} in a trial rolled back"
        lines.append(
            f"- monitored value: {_fmt(v0)} at step {s0}, {_fmt(v1)} at step {s1} ({text})"
        )
    lines.append("")

    lines += ["## Stalls by kind", ""]
    if kinds:
        lines += _table(["kind", "diagnoses"], [[k, str(n)] for k, n in kinds.most_common()])
    else:
        lines.append("No stall was diagnosed.")
    lines.append("")

    lines += ["## Escapes by action and verdict", ""]
    if escapes:
        actions: dict[str, Counter[str]] = {}
        for e in escapes:
            actions.setdefault(e.action, Counter())[e.verdict] += 1
        rows = [
            [f"`{a}`", *(str(c[v]) for v in VERDICTS), str(c.total())] for a, c in actions.items()
        ]
        lines += _table(["action", "accepted", "neutral", "rolled back", "pending", "total"], rows)
    else:
        lines.append("No escape was applied.")
    lines.append("")

    lines += ["## Escapes", ""]
    if escapes:
        rows = [
            [
                str(i),
                str(e.start),
                "" if e.end is None else str(e.end),
                str(e.steps(last)),
                e.diagnosis,
                f"`{e.action}`",
                e.verdict.replace("_", " "),
                _fmt(e.before),
                _fmt(e.after),
            ]
            for i, e in enumerate(escapes, 1)
        ]
        header = ["#", "start", "verdict at", "steps", "against", "action", "verdict"]
        lines += _table([*header, "before", "after"], rows)
    else:
        lines.append("None.")
    lines.append("")

    lines += ["## Diagnoses", ""]
    if diagnoses:
        lines += _table(
            ["step", "kind", "reason"], [[str(d.step), d.kind, d.reason] for d in diagnoses]
        )
    else:
        lines.append("None.")
    notes = run.notes()
    if notes:
        lines += ["", "## Notes", ""]
        lines += _table(["step", "note"], [[str(s), t] for s, t in notes])
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- png


def _finite(series: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    kept = [(s, v) for s, v in series if math.isfinite(v)]
    return [s for s, _ in kept], [v for _, v in kept]


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="grey")


def _symlog_ticks(ax: Axes, linthresh: float) -> None:
    """Ticks at 0 and at the decades above ``linthresh`` only (none crowding round 0)."""
    bottom, top = ax.get_ylim()
    first = math.floor(math.log10(linthresh)) + 1
    last = math.ceil(math.log10(max(abs(bottom), abs(top), linthresh * 10)))
    stride = max(1, math.ceil((last - first + 1) / 4))
    decades = [10.0**k for k in range(last, first - 1, -stride)]
    ticks = [0.0, *decades, *(-d for d in decades)]
    ax.set_yticks(sorted(t for t in ticks if bottom <= t <= top))
    ax.set_ylim(bottom, top)
    ax.minorticks_off()


def render_png(run: RunLog, path: str | Path) -> Path:
    """Draw the run's timeline into a PNG (about 1400x900 pixels) with matplotlib's Agg canvas.

    Panels, sharing the step axis: the monitored value (log scale when positive over more than two
    decades), the gradient norm (log scale), and λ_min / λ_max where probed (symlog). Every escape
    is shaded on every panel from its start to its verdict, green when kept, olive when kept
    without effect, red when rolled back, grey while pending; every diagnosis is a dashed
    vertical line labelled with its kind.

    Args:
        run: The run.
        path: The PNG file to write (its directory is created).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        MissingDependencyError: matplotlib is not installed.

    Example:
        >>> import tempfile
        >>> run = RunLog("r", Path("r"), scalars={"stall/monitored": [(0, 1.0), (10, 0.5)],
        ...                                       "grad/norm": [(0, 0.1), (10, 0.01)]})
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     png = render_png(run, Path(tmp) / "timeline.png")
        ...     png.read_bytes()[1:4]
        b'PNG'
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as err:
        raise MissingDependencyError(
            f"writing {path} needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from err

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    diagnoses = run.diagnoses()
    escapes = run.escapes()
    first, last = run.first_step, run.last_step

    fig = Figure(figsize=(14, 9), dpi=100)
    axes = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2, 2]})
    top, mid, low = axes

    steps, values = _finite(run.series(MONITORED))
    if steps:
        top.plot(steps, values, color="black", lw=1.4, label="monitored (smoothed)")
        positive = [v for v in values if v > 0]
        if len(positive) == len(values) and max(values) / min(values) > 100:
            top.set_yscale("log")
    else:
        _empty(top, f"no {MONITORED} values")
    top.set_ylabel("monitored value")
    top.set_title("monitored value (smoothed, at each check)", loc="left", fontsize=10)

    norms = [t for t in run.scalars if re.fullmatch(rf"{GRAD_NORM}(/opt\d+)?", t)]
    if not norms and run.series(GRAD_NORM):
        norms = [LEGACY_TAGS[GRAD_NORM]]
    drawn = False
    positive_only = True
    for i, tag in enumerate(norms):
        steps, values = _finite(run.scalars[tag])
        if steps:
            mid.plot(steps, values, lw=1.0, color=f"C{i}", label=tag)
            positive_only = positive_only and min(values) > 0
            drawn = True
    if drawn:
        mid.set_yscale("log" if positive_only else "linear")
    else:
        _empty(mid, f"no {GRAD_NORM} values")
    mid.set_ylabel("gradient norm")
    mid.set_title("global gradient norm (before clipping)", loc="left", fontsize=10)

    probed = False
    magnitudes: list[float] = []
    for tag, colour, label in ((LAMBDA_MAX, "tab:blue", "λ_max"), (LAMBDA_MIN, "tab:red", "λ_min")):
        steps, values = _finite(run.series(tag))
        if steps:
            low.plot(steps, values, marker="o", ms=4, lw=0.8, ls=":", color=colour, label=label)
            magnitudes += [abs(v) for v in values if v != 0]
            probed = True
    if probed:
        low.axhline(0.0, color="grey", lw=0.6)
        # Linear within three decades of the largest magnitude: a near-zero λ_min stays readable.
        linthresh = max(max(magnitudes, default=1.0) * 1e-3, 1e-12)
        low.set_yscale("symlog", linthresh=linthresh)
        _symlog_ticks(low, linthresh)
        low.legend(loc="upper right", fontsize=8)
    else:
        _empty(low, "no curvature probe in this run")
    low.set_ylabel("Hessian eigenvalue")
    low.set_title("extreme Hessian eigenvalues where probed (symlog)", loc="left", fontsize=10)
    low.set_xlabel("optimizer step")

    for e in escapes:
        end = e.end if e.end is not None else max(last, e.start)
        for ax in axes:
            ax.axvspan(e.start, max(end, e.start + 0.5), color=COLOURS[e.verdict], alpha=0.18, lw=0)
        top.text(
            e.start,
            0.02,
            f" {e.action.split('(')[0]}",
            transform=top.get_xaxis_transform(),
            rotation=90,
            ha="left",
            va="bottom",
            fontsize=8,
            color=COLOURS[e.verdict],
            clip_on=True,
        )
    for d in diagnoses:
        colour = KIND_COLOURS.get(d.kind, "dimgrey")
        for ax in axes:
            ax.axvline(d.step, color=colour, ls="--", lw=0.9, alpha=0.8)
        top.text(
            d.step,
            0.98,
            f" {d.kind}",
            transform=top.get_xaxis_transform(),
            rotation=90,
            ha="right",
            va="top",
            fontsize=8,
            color=colour,
            clip_on=True,
        )

    handles: list[Any] = list(top.get_legend_handles_labels()[0])
    for outcome in VERDICTS:
        if any(e.verdict == outcome for e in escapes):
            label = {
                "accepted": "escape kept",
                "neutral": "escape kept, no effect",
                "rolled_back": "escape rolled back",
            }.get(outcome, "escape pending")
            handles.append(Patch(color=COLOURS[outcome], alpha=0.3, label=label))
    for kind in dict.fromkeys(d.kind for d in diagnoses):
        colour = KIND_COLOURS.get(kind, "dimgrey")
        handles.append(Line2D([], [], color=colour, ls="--", label=f"diagnosis: {kind}"))
    if handles:
        top.legend(handles=handles, loc="best", fontsize=8, framealpha=0.9)
    if norms and drawn:
        mid.legend(loc="upper right", fontsize=8)
    if last > first:
        top.set_xlim(first, last)
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)

    verdicts = Counter(e.verdict for e in escapes)
    fig.suptitle(
        f"{run.name}: {_count(len(diagnoses), 'diagnosis', 'diagnoses')}, "
        f"{_count(len(escapes), 'escape', 'escapes')} "
        f"({verdicts['accepted']} kept, {verdicts['neutral']} kept without effect, "
        f"{verdicts['rolled_back']} rolled back, "
        f"{verdicts['pending']} pending)",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out


# --------------------------------------------------------------------------------------- reports


def write_report(logdir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``report.png`` and ``report.md`` for every run under ``logdir``.

    Args:
        logdir: A run directory or a directory holding runs.
        out_dir: Where to write: ``out_dir/<run name>/`` for each run; None writes into each run's
            own directory.

    Returns:
        The files written, two per run (the PNG, then the markdown).

    Raises:
        ReportError: ``logdir`` is missing or holds no event files, or no run in it was logged by
            lightning_escape (other runs are skipped with a :class:`ReportWarning`), or the report
            cannot be written where it should go.
        MissingDependencyError: matplotlib is not installed.

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     with SummaryWriter(f"{tmp}/runs/a") as w:
        ...         w.add_scalar("stall/monitored", 1.0, 0)
        ...     [p.relative_to(tmp).as_posix() for p in write_report(f"{tmp}/runs", f"{tmp}/out")]
        ['out/a/report.png', 'out/a/report.md']
    """
    root = Path(logdir)
    runs = find_runs(root)
    written: list[Path] = []
    for run_dir in runs:
        run = _read(run_dir, _run_name(run_dir, root))
        if not run.logged_by_lightning_escape:
            if len(runs) == 1:
                _check_ours(run)
            warnings.warn(
                f"skipped {run_dir}: not logged by lightning_escape", ReportWarning, stacklevel=2
            )
            continue
        target = run_dir if out_dir is None else Path(out_dir) / run.name
        try:
            png = render_png(run, target / "report.png")
            md = target / "report.md"
            md.write_text(render_markdown(run, image=png.name), encoding="utf-8")
        except OSError as err:  # a read-only place, a file where a directory should be, ...
            raise ReportError(f"cannot write the report of {run_dir} into {target}: {err}") from err
        written += [png, md]
    if not written:
        raise ReportError(
            f"{root}: none of its {len(runs)} runs has stall/, escape/ or grad/ tags; they were "
            "not logged by lightning_escape"
        )
    return written


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The command line: ``lightning-escape report LOGDIR [--out DIR]``.

    Args:
        argv: The arguments (``sys.argv[1:]`` when None).
        prog: The program name shown in usage (``lightning-escape`` when None).

    Returns:
        0 when every report was written; 2 on a usage error or a :class:`ReportError`.

    Example:
        >>> main(["report", "/no/such/dir"])
        2
    """
    parser = argparse.ArgumentParser(
        prog=prog or "lightning-escape",
        description="Tools for runs logged by lightning_escape's callbacks.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="write a timeline PNG and a markdown summary for each run under LOGDIR",
        description=(
            "Read the TensorBoard event files of each run under LOGDIR and write report.png (the "
            "timeline of stalls, escapes and verdicts) and report.md (a summary) for each."
        ),
    )
    report.add_argument("logdir", type=Path, metavar="LOGDIR", help="a run or a folder of runs")
    report.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        default=None,
        help="write into DIR/<run name>/ instead of each run's own directory",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: a command is required (report)", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ReportWarning)
            written = write_report(args.logdir, args.out)
    except ReportError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    for w in caught:
        if issubclass(w.category, ReportWarning):
            print(w.message, file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for path in written:
        print(f"wrote {path}")
    for path in written:
        if path.suffix == ".md":
            print()
            print(path.read_text(encoding="utf-8"), end="")
    return 0
