"""``python -m lightning_escape``: the command line (see :func:`lightning_escape.report.main`).

Example: ``python -m lightning_escape report runs/demo --out reports``.
"""

from __future__ import annotations

import sys

from lightning_escape.report import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m lightning_escape"))
