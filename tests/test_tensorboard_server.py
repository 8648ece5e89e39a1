"""A real TensorBoard server reads what the callbacks wrote: runs, tags, text and the layout.

The event-file tests read the files with TensorBoard's own reader; this one starts the
``tensorboard`` program on 127.0.0.1 and asks its HTTP data API what a person opening the
dashboard would see.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.request import urlopen

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from models import Net, Scripted, fit

from lightning_escape import EscapeCallback, GradientMonitor, LRKick, StallDetector
from lightning_escape.policy import ESCAPABLE

TEXT_TAGS = ["stall/diagnosis", "escape/escape", "escape/verdict"]
STARTUP_S = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, route: str) -> Any:
    with urlopen(f"http://127.0.0.1:{port}{route}", timeout=5) as response:
        return json.loads(response.read().decode())


def _chart_patterns(chart: dict[str, Any]) -> list[str]:
    if "multiline" in chart:
        return list(chart["multiline"].get("tag", []))
    series = chart.get("margin", {}).get("series", [])
    return [s[key] for s in series for key in ("value", "lower", "upper") if key in s]


def _train(logdir: Path) -> tuple[str, str]:
    """An escaping run and a monitor-only run; returns their TensorBoard run names."""
    escape = EscapeCallback(
        StallDetector(patience=20, warmup_steps=0, check_every_n_steps=5, smoothing=0.0),
        probation_steps=20,
        max_escapes=2,
        ladders={kind: [LRKick(factor=10.0, steps=5)] for kind in ESCAPABLE},
    )
    # TensorBoard merges the runs' layouts in the order of the run names, so the run that writes
    # every category sorts first ("escape" < "monitor").
    escaping = TensorBoardLogger(logdir, name="escape", version="run")
    fit(Scripted([1.0] * 40 + [0.5] * 40), [escape], max_steps=80, logger=escaping)
    assert escape.events and escape.diagnoses
    monitored = TensorBoardLogger(logdir, name="monitor", version="run")
    fit(Net(), [GradientMonitor()], max_steps=20, logger=monitored)
    return "escape/run", "monitor/run"


def test_tensorboard_server_serves_runs_tags_text_and_layout(tmp_path: Path) -> None:
    executable = Path(sys.executable).parent / "tensorboard"
    if not executable.exists():
        pytest.skip(f"no tensorboard program next to {sys.executable}")
    logdir = tmp_path / "logs"
    escaping, monitored = _train(logdir)

    port = _free_port()
    log = (tmp_path / "tensorboard.log").open("w")
    server = subprocess.Popen(
        [
            str(executable),
            "--logdir",
            str(logdir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast=false",
            "--reload_interval",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # Wait until the server answers and has loaded both runs, their text and the layout.
        deadline = time.monotonic() + STARTUP_S
        while True:
            if server.poll() is not None:
                pytest.fail(
                    f"tensorboard exited with {server.returncode}:\n"
                    + (tmp_path / "tensorboard.log").read_text()
                )
            try:
                runs = _get(port, "/data/runs")
                scalars = _get(port, "/data/plugin/scalars/tags")
                texts = _get(port, "/data/plugin/text/tags")
                layout = _get(port, "/data/plugin/custom_scalars/layout")
                if (
                    {escaping, monitored} <= set(runs)
                    and {escaping, monitored} <= set(scalars)
                    and escaping in texts
                    and layout.get("category")
                ):
                    break
            except (URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"tensorboard did not serve both runs within {STARTUP_S:.0f} s:\n"
                    + (tmp_path / "tensorboard.log").read_text()
                )
            time.sleep(0.5)

        # Both runs, each with its own tags.
        assert {escaping, monitored} <= set(runs)
        escape_tags = set(scalars[escaping])
        monitor_tags = set(scalars[monitored])
        for group in ("stall/", "escape/", "grad/"):
            assert any(tag.startswith(group) for tag in escape_tags), (group, escape_tags)
        assert any(tag.startswith("grad/") for tag in monitor_tags), monitor_tags
        assert not any(tag.startswith(("stall/", "escape/")) for tag in monitor_tags)

        # Diagnoses, escapes and verdicts are text (filed as `T/text_summary` in the Text tab).
        text_tags = {tag for tags in texts.values() for tag in tags}
        for tag in TEXT_TAGS:
            assert f"{tag}/text_summary" in text_tags, (tag, text_tags)

        # One layout, in the order stall, escape, grad; every chart shows a tag some run has.
        assert [c["title"] for c in layout["category"]] == ["stall", "escape", "grad"]
        all_tags = {tag for tags in scalars.values() for tag in tags}
        for category in layout["category"]:
            for chart in category["chart"]:
                patterns = _chart_patterns(chart)
                assert patterns, chart
                assert any(re.search(p, tag) for p in patterns for tag in all_tags), chart["title"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()
