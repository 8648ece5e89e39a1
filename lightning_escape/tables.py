"""Records as tables: CSV and markdown without pandas, and the facts a summary is made of.

Diagnoses (:class:`~lightning_escape.detectors.Diagnosis`) and escapes
(:class:`~lightning_escape.probation.EscapeEvent`) are frozen dataclasses; these helpers turn a list
of either into a CSV file or a markdown table, and count what happened in a run.

Example:
    >>> from lightning_escape.probation import EscapeEvent
    >>> events = [EscapeEvent(40, "plateau", "Perturb(radius=0.5)", "jumped", 1.0, "accepted", 0.5, 240)]
    >>> print(to_markdown(events, columns=("step", "diagnosis", "action", "verdict", "end_step")))
    | step | diagnosis | action | verdict | end_step |
    |---|---|---|---|---|
    | 40 | plateau | Perturb(radius=0.5) | accepted | 240 |
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from lightning_escape.detectors import Diagnosis
from lightning_escape.probation import EscapeEvent

__all__ = ["escape_facts", "to_csv", "to_markdown"]


def _rows(
    records: Sequence[Any], columns: Sequence[str] | None
) -> tuple[list[str], list[dict[str, Any]]]:
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise ValueError(f"`records` must be a list of dataclass instances, got {records!r}.")
    if isinstance(columns, str) or not (columns is None or isinstance(columns, Sequence)):
        raise ValueError(f"`columns` must be a list of field names or None, got {columns!r}.")
    if not records:
        return list(columns or ()), []
    first = records[0]
    for record in records:
        if type(record) is not type(first) or not is_dataclass(record) or isinstance(record, type):
            raise ValueError(
                "`records` must be dataclass instances of one type, got "
                f"{type(first).__name__} and {type(record).__name__}."
                if is_dataclass(first) and not isinstance(first, type)
                else f"`records` must be dataclass instances, got {type(first).__name__}."
            )
    names = list(columns) if columns is not None else [f.name for f in fields(first)]
    rows = [asdict(r) for r in records]
    missing = [c for c in names if c not in rows[0]]
    if missing:
        raise ValueError(f"`columns` {missing} are not fields of {type(first).__name__}.")
    return names, rows


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)  # a diagnosis' evidence: one cell
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def to_csv(
    records: Sequence[Any], path: str | Path | None = None, columns: Sequence[str] | None = None
) -> str:
    """Write ``records`` as CSV, one row each, and return the text.

    Args:
        records: Diagnoses or escape events (any dataclass instances of one type).
        path: Where to write it too; None only returns the text.
        columns: Fields to write, in order; None for all of them.

    Returns:
        The CSV text (a header row, then one row per record).
    """
    names, rows = _rows(records, columns)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        writer.writerow([_cell(row[n]) for n in names])
    text = buffer.getvalue()
    if path is not None:
        Path(path).write_text(text)
    return text


def to_markdown(records: Sequence[Any], columns: Sequence[str] | None = None) -> str:
    """``records`` as a markdown table (pipes in cells escaped); see :func:`to_csv`."""
    names, rows = _rows(records, columns)
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in rows:
        cells = [_cell(row[n]).replace("|", "\\|").replace("\n", " ") for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def escape_facts(
    diagnoses: Sequence[Diagnosis], events: Sequence[EscapeEvent], now: int
) -> dict[str, Any]:
    """What a run's diagnoses and escapes add up to.

    Args:
        diagnoses: Every diagnosis made.
        events: Every escape (and rollback after divergence).
        now: The current optimizer step, for a trial still on probation.

    Returns:
        ``stalls`` (count per kind), ``escapes`` (per action name, count per verdict),
        ``probation_steps`` (steps spent on probation), ``wasted_steps`` (steps of trials
        rolled back) and ``kept`` and ``rolled_back`` (counts).
    """
    stalls = Counter(d.kind for d in diagnoses)
    escapes: dict[str, Counter[str]] = {}
    probation = wasted = 0
    for e in events:
        escapes.setdefault(e.action.split("(")[0], Counter())[e.verdict] += 1
        length = (now if e.end_step is None else e.end_step) - e.step
        if e.action != "rollback":
            probation += length
            if e.verdict == "rolled_back":
                wasted += length
    return {
        "stalls": dict(stalls),
        "escapes": {name: dict(counts) for name, counts in escapes.items()},
        "kept": sum(e.verdict == "accepted" for e in events),
        "neutral": sum(e.verdict == "neutral" for e in events),
        "rolled_back": sum(e.verdict == "rolled_back" for e in events),
        "probation_steps": probation,
        "wasted_steps": wasted,
    }
