"""What the benchmark scripts share to write their tables: a docstring paragraph, the output."""

from __future__ import annotations

import datetime
from pathlib import Path


def doc_paragraph(doc: str | None, index: int = 1) -> str:
    """Paragraph ``index`` of a module docstring on one line, reST literals as Markdown code."""
    return (doc or "").split("\n\n")[index].replace("\n", " ").replace("``", "`")


def heading(title: str, how: str, doc: str | None) -> list[str]:
    """A result file's first lines: its title, when and how it was measured, what it measures.

    ``how`` ends the "Measured <date> with ..." sentence; the paragraph is the second of ``doc``.
    """
    today = datetime.date.today().isoformat()
    return [f"# {title}", "", f"Measured {today} with {how}", "", doc_paragraph(doc), ""]


def emit(text: str, out: Path | None) -> None:
    """Print ``text``, or write it to ``out`` and say so."""
    if out is None:
        print(text)
    else:
        out.write_text(text)
        print(f"Written to {out}")
