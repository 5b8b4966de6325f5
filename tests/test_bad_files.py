"""Floods of bad files and odd names: 0-byte files skipped at the scan without being opened, one summary
warning, an epoch as long as the good files make it; names with control characters printed escaped; an
unreadable data folder named as such."""

import os
import sys
import time
import warnings

import numpy as np
import pytest
from PIL import Image

import vggkit
from vggkit.cli import main
from vggkit.data import folders, images
from vggkit.data.folders import ImageListDataset, find_splits, report_skipped, scan_folder, scan_imagenet
from vggkit.training.loop import train
from vggkit.utils.paths import display_name
from vggkit.weights.factory import save_checkpoint

TINY = ["model.num_classes=2", "model.width=0.0625", "data.crop=32", "data.scale=36", "data.val_scale=36",
        "data.workers=0", "optim.batch_size=4", "schedule.epochs=1", "run.precision='fp32'", "run.device='cpu'"]
EMPTY = 2000


def write_images(folder, count: int, label: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 90, (40, 40, 3))
        pixels[..., label] += 150
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"good_{i}.jpg", quality=90)


@pytest.fixture(scope="module")
def flooded(tmp_path_factory):
    """train/: 2 x 10 good JPEGs among 2,000 empty ones; val/: 2 x 2 good ones."""
    root = tmp_path_factory.mktemp("flooded")
    for label, name in enumerate(("a", "b")):
        write_images(root / "train" / name, 10, label, seed=label)
        write_images(root / "val" / name, 2, label, seed=9 + label)
        for i in range(EMPTY // 2):
            (root / "train" / name / f"empty_{i:04d}.jpg").write_bytes(b"")
    return root


def skip_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "kipp" in str(w.message)]


def test_a_flood_of_empty_files_is_one_warning_and_an_epoch_of_the_good_ones(flooded, tmp_path, monkeypatch):
    opened = []
    real_open = images.Image.open
    monkeypatch.setattr(images.Image, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = train("A", flooded, tmp_path / "run", overrides=TINY, progress=False)
    seconds = time.perf_counter() - started
    messages = skip_warnings(record)
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"Skipped {EMPTY:,} file(s)") and f"... and {EMPTY - 10:,} more" in messages[0]
    assert len(messages[0].splitlines()) == 12 and "an empty file (0 bytes)" in messages[0]
    assert result.completed and result.history[0]["step"] == 5  # 20 good images / batch 4, not 2,020 / 4
    assert not [path for path in opened if "empty_" in path]  # known empty from the stat: never opened
    print(f"\n{EMPTY} empty + 20 good files: scan and one epoch in {seconds:.1f} s", file=sys.stderr)


def test_verify_scan_opens_no_empty_file_and_warns_once(flooded, monkeypatch):
    opened = []
    real_open = images.Image.open
    monkeypatch.setattr(images.Image, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train_scan, _ = scan_imagenet(flooded, verify=True)
    assert len(train_scan.samples) == 20 and len(train_scan.skipped) == EMPTY
    assert len(skip_warnings(record)) == 1
    assert len(opened) == 24 and not [path for path in opened if "empty_" in path]  # only the good ones, once


def test_unreadable_headers_are_screened_at_the_scan_a_clean_folder_reads_a_sample(tmp_path, monkeypatch):
    write_images(tmp_path / "data" / "a", 150, 0)
    write_images(tmp_path / "data" / "b", 150, 1)
    checked = []
    real_check = folders.check_header
    monkeypatch.setattr(folders, "check_header", lambda path: checked.append(path) or real_check(path))
    assert len(scan_folder(tmp_path / "data").samples) == 300
    assert len(checked) == folders.SCREEN_SAMPLE  # a clean data set: a sample of headers, nothing decoded
    for i in range(500):  # text named .jpg: not empty, so only its header tells
        (tmp_path / "data" / "b" / f"note_{i:03d}.jpg").write_text("not an image")
    checked.clear()
    scan = scan_folder(tmp_path / "data")
    assert len(scan.samples) == 300 and len(scan.skipped) == 500
    assert {reason for _, reason in scan.skipped} == {"not an image PIL can read; remove or replace the file"}
    # The sample stopped at its first bad file; then every header was read, once.
    assert len(set(checked)) == 800 and 800 < len(checked) <= 800 + folders.SCREEN_SAMPLE


def test_files_that_fail_only_when_decoded_warn_a_few_times_per_process(tmp_path):
    write_images(tmp_path / "a", 1, 0)
    whole = (tmp_path / "a" / "good_0.jpg").read_bytes()
    for i in range(40):  # a valid header, the pixel data cut off: the header check lets these through
        (tmp_path / "a" / f"cut_{i:02d}.jpg").write_bytes(whole[: whole.index(b"\xff\xda") + 40])
    assert images.check_header(tmp_path / "a" / "cut_00.jpg") is None
    dataset = ImageListDataset(sorted((str(p), 0) for p in (tmp_path / "a").iterdir()))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for index in range(len(dataset)):
            assert dataset[index][1] == 0  # each replaced by the readable one
    messages = [str(w.message) for w in record]
    assert len(dataset.failed) == 40 and len(messages) == folders.RUNTIME_WARNINGS + 1, messages
    assert "further ones are skipped without a warning" in messages[-1]


def test_control_characters_in_names_are_escaped_in_every_output_line(tmp_path, capsys):
    names = ["cat\nfish", "tab\tesc\x1b[31m"]
    assert [display_name(name) for name in names] == ["cat\\nfish", "tab\\tesc\\x1b[31m"]
    assert display_name(os.fsdecode(b"caf\xe9\xe2\x80\xa8")) == "caf\ufffd\\u2028"
    for label, name in enumerate(names):
        write_images(tmp_path / "data" / name, 1, label)
    image = tmp_path / "data" / names[0] / "good_0.jpg"
    (tmp_path / "data" / names[0] / "line\nbreak.jpg").write_bytes(b"")
    model = vggkit.create_model("vgg11", num_classes=2, width=0.0625)
    model.class_names = names
    save_checkpoint(model, tmp_path / "model.pth")
    assert main(["predict", str(tmp_path / "model.pth"), str(image), "--top-k", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[0] == display_name(image), out  # the image, then one line per class
    assert sorted(line.split()[-1] for line in out[1:]) == ["cat\\nfish", "tab\\tesc\\x1b[31m"]
    assert main(["extract", str(tmp_path / "data"), "--model", "vgg11", "--weights", "none", "--width", "0.0625",
                 "--layer", "pool5", "--scales", "32", "--device", "cpu", "--no-progress",
                 "-o", str(tmp_path / "f.npz")]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1 and "classes: cat\\nfish, tab\\tesc\\x1b[31m" in captured.out
    assert "\x1b" not in captured.out + captured.err
    warned = [line for line in captured.err.splitlines() if "line" in line]
    assert len(warned) == 1 and "line\\nbreak.jpg: an empty file" in warned[0], captured.err  # one line
    with pytest.warns(UserWarning) as record:
        report_skipped([("a\nb.jpg", "corrupt"), ("c\rd.jpg", "corrupt")])
    assert str(record[0].message).splitlines()[1:] == ["  a\\nb.jpg: corrupt", "  c\\rd.jpg: corrupt"]


@pytest.mark.filterwarnings("ignore:Random weights")  # finetune's note on its defaults, not the subject
def test_an_unreadable_data_folder_is_named_not_a_missing_train_folder(flooded, tmp_path, monkeypatch, capsys):
    # chmod 000 does not stop root (the test user here): the refusal is simulated where it happens.
    locked = str(flooded)
    real_scandir, real_listdir = os.scandir, os.listdir

    def refuse(function):
        def call(path=".", *args):
            if os.path.realpath(path) == os.path.realpath(locked):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return function(path, *args)
        return call

    monkeypatch.setattr(os, "scandir", refuse(real_scandir))
    monkeypatch.setattr(os, "listdir", refuse(real_listdir))
    expected = f"Cannot read the folder {flooded}: permission denied; make it readable (chmod u+rx {flooded})."
    for call in (lambda: find_splits(flooded), lambda: scan_folder(flooded),
                 lambda: vggkit.finetune(flooded, model="vgg11", weights=None, width=0.0625, output_dir=tmp_path / "ft")):
        with pytest.raises(PermissionError) as error:
            call()
        assert str(error.value) == expected
    assert main(["train", "--recipe", "A", "--data", locked, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"vggkit train: error: {expected}" and "train not found" not in err
