from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from models import read_scalars

from lightning_escape.logging import EscapeLogger, to_host


def _trainer(loggers: list[Any], zero: bool = True) -> Any:
    return SimpleNamespace(loggers=loggers, is_global_zero=zero)


def test_to_host_reads_mixed_values() -> None:
    assert to_host({"a": torch.tensor(2.0), "b": 3, "c": torch.tensor(1, dtype=torch.int64)}) == {
        "a": 2.0,
        "b": 3.0,
        "c": 1.0,
    }
    assert to_host({}) == {}


def test_no_logger_writes_nothing() -> None:
    log = EscapeLogger(_trainer([]))
    assert not log.enabled
    log.scalars({"escape/x": 1.0}, 0)
    log.text("escape/t", "hi", 0)
    log.histogram("escape/h", torch.ones(3), 0)
    log.layout({"c": {"t": ["Multiline", ["escape/x"]]}})
    log.flush()


def test_only_rank_zero_writes(tmp_path: Path) -> None:
    tb = TensorBoardLogger(tmp_path, name="tb")
    EscapeLogger(_trainer([tb], zero=False)).scalars({"escape/x": 1.0}, 0)
    assert not Path(tb.log_dir).exists() or not any(Path(tb.log_dir).iterdir())


def test_tensorboard_scalars_text_and_merged_layout(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    tb = TensorBoardLogger(tmp_path, name="tb")
    log = EscapeLogger(_trainer([tb]))
    log.scalars({"escape/x": 1.5}, 3)
    log.text("escape/note", "a **diagnosis**", 3)
    log.layout({"first": {"x": ["Multiline", ["escape/x"]]}})
    log.layout({"second": {"y": ["Multiline", ["escape/y"]]}})
    log.flush()
    assert read_scalars(tb.log_dir)["escape/x"] == {3: 1.5}
    ea = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0})
    ea.Reload()
    text = ea.Tensors("escape/note/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == "a **diagnosis**"
    raw = ea.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0]
    assert [c.title for c in layout_pb2.Layout.FromString(raw).category] == ["first", "second"]


def test_other_loggers_get_scalars(tmp_path: Path) -> None:
    csv = CSVLogger(tmp_path, name="csv")
    log = EscapeLogger(_trainer([csv]))
    log.scalars({"escape/x": 2.0}, 7)
    log.text("escape/note", "ignored by CSV", 7)
    csv.save()
    content = (Path(csv.log_dir) / "metrics.csv").read_text().splitlines()
    assert content[0].split(",") == ["escape/x", "step"]
    assert content[1] == "2.0,7"
