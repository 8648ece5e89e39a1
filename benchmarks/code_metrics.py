"""Size metrics of a package's code, to compare before and after a refactor.

For every ``.py`` file below the package directory, parsed with :mod:`ast`:

- the largest class, in lines from its ``class`` line to its last line (``end_lineno - lineno +
  1``, decorators not counted), with the number of methods defined directly in its body (``def``
  and ``async def`` statements of the class body, nested classes' methods not counted);
- the largest function or method, in lines the same way (nested functions count on their own);
- the number of constructor arguments (``self`` excluded; ``*args`` and ``**kwargs`` count one
  each) of each public callback, read with :func:`inspect.signature` from the package imported from
  that directory, so inherited constructors are found too.

Run: ``python benchmarks/code_metrics.py lightning_escape`` (any checkout: ``python
benchmarks/code_metrics.py /tmp/base/lightning_escape``). ``--top N`` lists the N largest of each.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import sys
from pathlib import Path
from typing import NamedTuple

CALLBACKS = ("GradientMonitor", "StallDetector", "EscapeCallback", "GradientNoise")


class Node(NamedTuple):
    name: str
    file: str
    line: int
    lines: int
    methods: int


def collect(package: Path) -> tuple[list[Node], list[Node]]:
    """All classes and all functions (methods included) below ``package``, largest first."""
    classes: list[Node] = []
    functions: list[Node] = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        parents: dict[ast.AST, ast.AST] = {
            child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)
        }
        for node in ast.walk(tree):
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            assert node.end_lineno is not None
            size = node.end_lineno - node.lineno + 1
            qual = [node.name]
            parent = parents.get(node)
            while parent is not None:
                if isinstance(parent, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    qual.insert(0, parent.name)
                parent = parents.get(parent)
            name = ".".join(qual)
            if isinstance(node, ast.ClassDef):
                methods = sum(
                    isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in node.body
                )
                classes.append(Node(name, rel, node.lineno, size, methods))
            else:
                functions.append(Node(name, rel, node.lineno, size, 0))
    classes.sort(key=lambda n: -n.lines)
    functions.sort(key=lambda n: -n.lines)
    return classes, functions


def constructor_args(package: Path) -> dict[str, int | str]:
    """Number of constructor arguments (without ``self``) of each public callback."""
    sys.path.insert(0, str(package.resolve().parent))
    module = importlib.import_module(package.resolve().name)
    where = Path(module.__file__ or "").resolve().parent
    if where != package.resolve():
        raise SystemExit(f"imported {module.__name__} from {where}, not from {package.resolve()}")
    counts: dict[str, int | str] = {}
    for name in CALLBACKS:
        cls = getattr(module, name, None)
        if cls is None:
            counts[name] = "not exported"
            continue
        params = list(inspect.signature(cls).parameters.values())
        counts[name] = len(params)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path, help="the package directory, e.g. lightning_escape")
    parser.add_argument("--top", type=int, default=1, help="how many of the largest to list")
    args = parser.parse_args()
    classes, functions = collect(args.package)
    print(f"package: {args.package.resolve()}")
    print("largest classes (lines, methods):")
    for c in classes[: args.top]:
        print(f"  {c.name}  {c.file}:{c.line}  {c.lines} lines, {c.methods} methods")
    print("largest functions/methods (lines):")
    for f in functions[: args.top]:
        print(f"  {f.name}  {f.file}:{f.line}  {f.lines} lines")
    print("constructor arguments (without self):")
    for name, count in constructor_args(args.package).items():
        print(f"  {name}: {count}")


if __name__ == "__main__":
    main()
