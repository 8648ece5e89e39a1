"""The README's Python examples run as they are (the first one, which trains a `model` the reader
brings, is checked for its names only)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code: str, tmp_path: Path) -> None:
    if "trainer.fit(model)" in code:
        code = code.replace("trainer.fit(model)", "")  # the reader's own model
    script = tmp_path / "example.py"
    script.write_text(code)
    runpy.run_path(str(script), run_name="readme_example")
