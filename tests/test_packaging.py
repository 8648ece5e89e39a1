"""The installed package imports on a plain install and carries no benchmark or test-only code."""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from pathlib import Path
from typing import NamedTuple

import pytest

import lightning_escape

# Names that belong to the benchmarks (benchmarks/problems.py, benchmarks/architectures.py) or to the
# tests (tests/references.py).
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
    "AttentionPointer",
    "CNNDigitsCosine",
    "DeepSigmoidCNN",
    "ModularAddition",
    "TabularMLPLong",
    "TransformerSort",
    "VanillaRNNLatch",
    "WarmupTransformerLM",
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


# --- The built wheel and sdist, installed in a fresh virtual environment ---------------------------

QUICKSTART = textwrap.dedent(
    """
    import json, sys
    from importlib import metadata

    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    import lightning_escape
    from lightning_escape import EscapeCallback

    trainer = pl.Trainer(
        max_steps=3, callbacks=[EscapeCallback()], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=sys.argv[1],
    )
    trainer.fit(BoringModel())
    print(json.dumps({
        "file": lightning_escape.__file__,
        "version": lightning_escape.__version__,
        "metadata_version": metadata.version("lightning-escape"),
        "license": metadata.metadata("lightning-escape").get("License-Expression"),
        "global_step": trainer.global_step,
    }))
    """
)


class Installed(NamedTuple):
    dist: Path
    wheel: Path
    sdist: Path
    venv: Path
    python: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel built from this checkout, installed alone in a new virtual environment.

    The new environment gets only our wheel (``pip install --no-index --no-deps``: nothing is
    downloaded). Its dependencies (torch, lightning, ...) are the ones already installed for this
    test run: after the wheel is installed, a ``.pth`` file in the new environment's site-packages
    appends this interpreter's site-packages directories to ``sys.path``. Paths a ``.pth`` file adds
    come after the environment's own site-packages, and the ``.pth`` files inside them are not run,
    so the editable install of the checkout there (a ``.pth`` pointing at the source tree) is not
    active: ``import lightning_escape`` finds the wheel's copy. So the test checks what the wheel
    holds, not the source tree, without re-installing torch. The ``.pth`` file is written only
    after ``pip install``, so that pip does not see the checkout's own install as already there.
    """
    root = Path(__file__).resolve().parents[1]
    tmp = tmp_path_factory.mktemp("packaging")
    dist = tmp / "dist"
    try:
        import hatchling  # noqa: F401
    except ModuleNotFoundError:
        pytest.fail(
            "hatchling (in the dev extra) builds the wheel and the sdist: pip install -e .[dev]"
        )
    build = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "--directory", str(dist)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")

    venv_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(venv_dir)
    python = venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(VIRTUAL_ENV=str(venv_dir), PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    pip = (python, "-m", "pip", "install", "--no-index", "--find-links", dist, "--no-deps")
    install = subprocess.run(
        [*pip, "--only-binary", ":all:", "lightning-escape"],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    purelib = subprocess.run(
        [python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    assert ours, sys.path
    (Path(purelib) / "_lightning_escape_test_deps.pth").write_text("\n".join(ours) + "\n")
    return Installed(dist, wheel, sdist, venv_dir, python, env)


def test_the_wheel_installs_and_runs_the_quickstart_in_a_fresh_venv(
    installed: Installed, tmp_path: Path
) -> None:
    # `-I` and a working directory outside the checkout: the source tree is not on sys.path.
    proc = subprocess.run(
        [installed.python, "-I", "-c", QUICKSTART, str(tmp_path)],
        cwd=tmp_path,
        env=installed.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().is_relative_to(installed.venv.resolve()), report["file"]
    assert report["version"] == lightning_escape.__version__ == report["metadata_version"]
    assert report["license"] == "Apache-2.0"
    assert report["global_step"] == 3


def test_the_wheel_holds_the_package_and_the_license_only(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
    assert "lightning_escape/__init__.py" in names
    assert "lightning_escape/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"lightning_escape"}, top


def test_the_sdist_holds_the_docs_license_package_and_tests(installed: Installed) -> None:
    with tarfile.open(installed.sdist) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    expected = {"README.md", "LICENSE", "CHANGELOG.md", "pyproject.toml", "dev.py"}
    expected |= {"lightning_escape/__init__.py", "tests/test_packaging.py", "tests/conftest.py"}
    assert expected <= names, sorted(expected - names)
    # The tests import the benchmark problems (see pytest's `pythonpath` in pyproject.toml).
    assert "benchmarks/problems.py" in names


def _console_scripts(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as archive:
        entry_points = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser(delimiters=("=",))
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        for name in entry_points:
            parser.read_string(archive.read(name).decode())
    return dict(parser["console_scripts"]) if parser.has_section("console_scripts") else {}


def test_the_console_script_runs_from_the_fresh_venv(installed: Installed, tmp_path: Path) -> None:
    scripts = _console_scripts(installed.wheel)
    if sys.version_info >= (3, 11):  # tomllib: what pyproject.toml declares is what the wheel has
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        declared = tomllib.loads(pyproject.read_text()).get("project", {}).get("scripts", {})
        assert scripts == declared
    if "lightning-escape" not in scripts:
        pytest.skip("pyproject.toml declares no `lightning-escape` console script (yet)")
    bindir = installed.python.parent
    script = bindir / ("lightning-escape.exe" if os.name == "nt" else "lightning-escape")
    proc = subprocess.run(
        [script, "--help"],
        cwd=tmp_path,
        env=installed.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "usage" in proc.stdout.lower()


def test_the_quickstart_example_runs_on_the_installed_wheel(
    installed: Installed, tmp_path: Path
) -> None:
    pytest.importorskip("sklearn")
    # The example, copied out of the checkout and run with the fresh venv's interpreter.
    script = tmp_path / "quickstart.py"
    script.write_text(
        (Path(__file__).resolve().parents[1] / "examples" / "quickstart.py").read_text()
    )
    proc = subprocess.run(
        [installed.python, "-I", str(script), "--steps", "20", "--out", str(tmp_path / "runs")],
        cwd=tmp_path,
        env=installed.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "EscapeCallback: 0 stalls in 20 steps; nothing escaped." in out
    assert "lightning-escape report" in out
