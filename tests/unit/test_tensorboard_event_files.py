"""TensorBoard files written without tensorboard (``ddp.tensorboard_events``) are read by tensorboard."""

from __future__ import annotations

import json

from ddp.layout import RunDir
from ddp.reporting import MetricsSink
from ddp.tensorboard_events import crc32c, masked_crc32c


def test_tensorboard_reads_our_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    assert masked_crc32c(b"") == ((((0 >> 15) | (0 << 17)) + 0xA282EAD8) & 0xFFFFFFFF)
    sink = MetricsSink(RunDir(tmp_path), enabled=True)
    for step in range(1, 6):
        sink.write(step, {"train/loss": 1.0 / step, "train/lr": 0.1}, epoch=0)
    sink.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr"}
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")] == [(s, round(1 / s, 6))
                                                                                    for s in range(1, 6)]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
