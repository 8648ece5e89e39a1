"""The installed package imports on a plain install and carries no benchmark or test-only code."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning_escape

# Names that belong to the benchmarks (benchmarks/problems.py) or to the tests (tests/references.py).
NOT_IN_PACKAGE = (
    "PROBLEMS",
    "PlainResult",
    "ProblemSpec",
    "TargetTracker",
    "make_problem",
    "train_plain",
    "problem_loss",
    "explicit_hessian",
    "DeepTanhDigits",
    "DigitsMLP",
    "LogisticRegression",
    "SparseParity",
    "Rastrigin2D",
    "Diverging",
)

# Runs in a fresh interpreter: scikit-learn (a dev dependency only) is made unimportable, then
# every module of the package is imported and every module's attributes are searched.
SCRIPT = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    sys.modules["sklearn"] = None  # `import sklearn` now raises ModuleNotFoundError
    forbidden = set(json.loads(sys.argv[1]))
    sys.path.insert(0, sys.argv[2])  # where the package under test lies, nothing else

    import lightning_escape

    modules = ["lightning_escape"]
    for info in pkgutil.walk_packages(lightning_escape.__path__, "lightning_escape."):
        importlib.import_module(info.name)
        modules.append(info.name)
    found = []
    for name in modules:
        module = sys.modules[name]
        found += [f"{name}.{attr}" for attr in sorted(forbidden) if hasattr(module, attr)]
        found += [f"{name}.__all__: {a}" for a in getattr(module, "__all__", []) if a in forbidden]
    foreign = sorted(
        m for m in sys.modules if m.split(".")[0] in ("benchmarks", "tests", "models", "references")
    )
    report = {"file": lightning_escape.__file__, "modules": modules, "found": found}
    print(json.dumps({**report, "foreign": foreign}))
    """
)


def test_every_module_imports_without_sklearn_and_exports_nothing_test_only(
    tmp_path: Path,
) -> None:
    # `-I`: no PYTHONPATH and no current directory on sys.path; only the installed packages and the
    # folder holding the `lightning_escape` these tests import (the installed one or the checkout).
    root = str(Path(lightning_escape.__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, "-I", "-c", SCRIPT, json.dumps(NOT_IN_PACKAGE), root],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve() == Path(lightning_escape.__file__).resolve()
    assert "lightning_escape.demos.problems" in report["modules"]
    assert "lightning_escape.curvature" in report["modules"]
    assert report["found"] == []
    assert report["foreign"] == []
