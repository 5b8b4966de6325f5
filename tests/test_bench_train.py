"""Bench rows (f)-(h) in their small CPU form: every path runs and gives a complete row."""

import math

import torch

from vggkit.bench._common import Settings
from vggkit.bench.training import TrainSizes, make_jpeg_folder, train_rows


def test_train_rows_run_every_path_on_the_cpu():
    messages = []
    rows = train_rows(Settings.quick(), "cpu", messages.append)
    tasks = [r.task for r in rows]
    assert tasks.count("(f) training step of A, data on the device") == 2  # no compiled rows in quick settings
    assert tasks.count("(f) training step of D, data on the device") == 2
    assert [r.how for r in rows if r.task.startswith("(g)")] == [
        "vggkit train --recipe D-256, 0 CPU decode workers", "vggkit train --recipe D-256, --gpu-decode"]
    assert sum(r.task.startswith("(h)") for r in rows) == 3
    for row in rows:
        assert math.isfinite(row.images_per_s) and row.images_per_s > 0, row
        assert row.reference or row.ratio is not None, row  # every row is compared with its task's reference
        assert "CPU small form" in row.note, row  # never mistaken for GPU figures
        assert (row.peak_fraction is None) == row.task.startswith("(h)"), row
    assert any("(g)" in m and "--gpu-decode" in m for m in messages)


def test_generated_folder_holds_jpegs_of_the_asked_size(tmp_path):
    sizes = TrainSizes.for_device(Settings.quick(), torch.device("cpu"))
    root = make_jpeg_folder(tmp_path / "data", sizes)
    train = sorted((root / "train").rglob("*.JPEG"))
    assert len({p.parent.name for p in train}) == sizes.classes and len(train) >= sizes.batch * sizes.steps
    assert len(list((root / "val").rglob("*.JPEG"))) == 2 * sizes.classes
    from PIL import Image

    with Image.open(train[0]) as image:
        assert image.format == "JPEG" and image.size == sizes.image_size


def test_train_rows_take_the_device_bench_settings():
    from vggkit.bench.gpu import DeviceSettings

    sizes = TrainSizes.for_device(DeviceSettings.tiny(), torch.device("cpu"))
    assert sizes.batch == 2 and sizes.width == 1 / 16
    full = TrainSizes.for_device(DeviceSettings(), torch.device("cuda"))
    assert (full.batch, full.steps, full.crop, full.image_size, full.images) == (256, 20, 224, (500, 375), 2048)
