"""Bad inputs through every entry point: each is used, skipped with one warning, or refused with one line;
nothing crashes, hangs or runs out of memory. Heavy cases run in a subprocess under a memory cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import vggkit
from vggkit.data.images import ImageError, check_rescaled, load_image
from vggkit.data.folders import scan_folder
from vggkit.utils.limits import ENV_VAR, max_pixels

from bad_inputs import NON_UTF8, make_corpus, noise

ROOT = Path(__file__).resolve().parents[1]
MEMORY_CAP = 8 << 30  # address space of the subprocess: torch alone maps ~3.6 GB of it
PEAK_LIMIT_MB = 2048


def run_capped(script: str, tmp_path: Path, timeout: float = 120, env: dict | None = None) -> dict:
    """Run ``script`` in a fresh Python under an address-space cap; it prints one JSON line as its result.
    -> that dict plus "peak_mb": its peak resident memory (VmHWM, which starts afresh at exec; ru_maxrss
    would carry over the forking pytest process's peak)."""
    prelude = textwrap.dedent(f"""
        import json, resource, sys, warnings
        resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_CAP}, {MEMORY_CAP}))
        sys.path.insert(0, {str(ROOT / 'tests')!r})
    """)
    path = tmp_path / "case.py"
    path.write_text(prelude + textwrap.dedent(script)
                    + "\nPEAK_KB = next(int(line.split()[1]) for line in open('/proc/self/status')"
                      " if line.startswith('VmHWM:'))"
                    + "\nprint(json.dumps({**RESULT, 'peak_mb': PEAK_KB / 1024}))\n")
    completed = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=timeout,
                               cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def make_data(root: Path) -> dict[str, str]:
    """root/a: 4 photos + the corpus + a folder loop; root/b: 4 photos + a symlink and a hard link to a/'s."""
    expected = make_corpus(root / "a")
    (root / "b").mkdir()
    for name in ("a", "b"):
        for i in range(4):
            noise(40, 36, seed=10 * i + len(name)).save(root / name / f"{name}{i}.png")
    os.symlink(".", root / "a" / "loop")
    os.symlink(root / "a" / "a0.png", root / "b" / "link.png")
    os.link(root / "a" / "a1.png", root / "b" / "hard.png")
    return expected


# --------------------------------------------------------------------------- the loader


def test_every_corpus_file_loads_or_is_refused_with_what_it_is(tmp_path):
    expected = make_corpus(tmp_path)
    for name, outcome in expected.items():
        path = tmp_path / name
        if outcome == "refused":
            with pytest.raises(ImageError) as caught:
                load_image(path)
            assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)
            continue
        image = load_image(path)
        assert image.mode == "RGB" and image.width >= 1
        if outcome == "rescale":
            with pytest.raises(ImageError, match=rf"over the limit of 40,000,000 \(set {ENV_VAR} to change it\)"):
                check_rescaled(image.width, image.height, 224, path)
        else:
            assert check_rescaled(image.width, image.height, 224, path)[0] >= 224
    reasons = {name: pytest.raises(ImageError, load_image, tmp_path / name).value.reason
               for name in ("dir.jpg", "loop.jpg", "fifo.jpg", "broken.jpg", "bomb.png", "empty.jpg", "text.jpg")}
    assert reasons["dir.jpg"].startswith("a folder, not an image file")
    assert reasons["loop.jpg"] == "a symbolic link loop, not an image file"
    assert reasons["fifo.jpg"] == "a FIFO (named pipe), not an image file"  # refused without opening: no hang
    assert reasons["broken.jpg"] == "a symbolic link to nowhere.jpg, which does not exist"
    assert reasons["bomb.png"] == ("900,000,000 pixels, over the limit of 40,000,000 (set VGGKIT_MAX_PIXELS to change "
                                   "it); refused as a possible decompression bomb")
    assert "not an image PIL can read" in reasons["text.jpg"] and "not an image PIL can read" in reasons["empty.jpg"]
    assert load_image(tmp_path / "rotated.jpg").size == (40, 48)  # EXIF orientation applied: 48x40 stood up
    assert load_image(tmp_path / "grey16.png").getextrema()[0][1] == 149  # 16-bit 38380 -> 149, not clipped to 255


def test_the_one_limit_is_read_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "photo.png"
    noise(300, 200).save(path)
    monkeypatch.setenv(ENV_VAR, "50000")
    assert max_pixels() == 50_000
    with pytest.raises(ImageError, match=r"60,000 pixels, over the limit of 50,000 \(set VGGKIT_MAX_PIXELS"):
        load_image(path)
    monkeypatch.setenv(ENV_VAR, "1_000_000")
    assert load_image(path).size == (300, 200)
    with pytest.raises(ImageError, match=r"photo\.png: rescaled to shortest side 1024"):
        vggkit.data.images.rescale_shortest(load_image(path), 1024)  # 1536x1024 > 1,000,000: named by its file
    monkeypatch.setenv(ENV_VAR, "lots")
    with pytest.raises(ValueError, match="VGGKIT_MAX_PIXELS='lots' must be a positive whole number"):
        load_image(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0",
                                                              b"GIF89a", b"II*\x00", b"RIFF"]))
def test_random_bytes_load_or_raise_image_error(tmp_path, data, prefix):
    path = tmp_path / "random.jpg"
    path.write_bytes(prefix + data)
    try:
        image = load_image(path)
    except ImageError as error:
        assert str(error).startswith(str(path)) and error.reason
    else:
        assert image.mode == "RGB"


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 64), height=st.integers(1, 64),
       mode=st.sampled_from(["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I", "I;16", "F", "YCbCr", "HSV"]))
def test_any_shape_and_mode_comes_out_rgb_of_the_same_size(width, height, mode):
    array = np.random.default_rng(width * height).integers(0, 255, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(array).convert("L" if mode in ("I", "I;16", "F") else "RGB")
    image = image.convert(mode) if mode not in ("YCbCr", "HSV") else Image.fromarray(array, mode=mode)
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == (width, height)


# --------------------------------------------------------------------------- folders: every file once


def test_links_hard_links_and_loops_count_once_and_splits_stay_disjoint(tmp_path):
    root = tmp_path / "data"
    for name in ("circle", "square"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            noise(40, 40, seed=i + 10 * len(name)).save(root / name / f"{name}{i}.png")
    os.symlink(".", root / "circle" / "loop")  # a folder loop: every file again, forever
    os.symlink(root / "square", root / "circle" / "squares")  # another class's folder
    os.link(root / "square" / "square0.png", root / "square" / "hard.png")  # same inode
    os.symlink("circle0.png", root / "circle" / "alias.png")
    scan = scan_folder(root)
    assert scan.counts() == {"circle": 6, "square": 6}
    real = [os.path.realpath(p) for p, _ in scan.samples]
    assert len(set(real)) == len(real) == 12
    skipped = dict(scan.skipped)
    assert "the same folder as" in skipped[str(root / "circle" / "loop")]
    assert "the same file as" in skipped[str(root / "square" / "square0.png")] or \
        "the same file as" in skipped[str(root / "square" / "hard.png")]
    with pytest.warns(UserWarning, match=r"(?s)Skipped 4 file\(s\).*loop.*alias\.png"):
        result = vggkit.evaluate(vggkit.create_model("vgg11", width=1 / 16, num_classes=2), root, protocol="center",
                                 workers=0, progress=False, precision="fp32", device="cpu")
    assert result["center"].n_images == 12  # not 12 + a loop's worth

    from vggkit.data.folders import prepare_splits

    splits = prepare_splits(root, seed=0, verify=False)
    train, val = {os.path.realpath(p) for p, _ in splits.train}, {os.path.realpath(p) for p, _ in splits.val}
    assert not train & val and len(train) + len(val) == 12

    (root / "val" / "circle").mkdir(parents=True)  # a val/ split whose file is a link into train/
    (root / "train").mkdir()
    for name in ("circle", "square"):
        os.rename(root / name, root / "train" / name)
    os.symlink(root / "train" / "circle" / "circle1.png", root / "val" / "circle" / "leak.png")
    noise(40, 40, seed=99).save(root / "val" / "circle" / "own.png")
    (root / "val" / "square").mkdir()
    noise(40, 40, seed=98).save(root / "val" / "square" / "own.png")
    splits = prepare_splits(root, verify=False)
    assert [Path(p).name for p, _ in splits.val] == ["own.png", "own.png"]
    assert any("leak.png" in path for path, _ in splits.skipped)

    from vggkit.data.folders import scan_imagenet

    with pytest.warns(UserWarning, match="leak.png"):
        train_scan, val_scan = scan_imagenet(root)
    assert len(train_scan.samples) == 12 and len(val_scan.samples) == 2


def test_an_empty_train_class_and_an_output_inside_the_data_are_refused(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("circle", "square"):
            (root / split / name).mkdir(parents=True)
            if not (split == "train" and name == "square"):
                noise(40, 40).save(root / split / name / "x.png")
    from vggkit.data.folders import scan_imagenet

    with pytest.raises(ValueError, match=r"Class folder\(s\) \['square'\] in .*train hold no usable image"):
        scan_imagenet(root)
    from vggkit.cli import main

    code = subprocess.run([sys.executable, "-m", "vggkit", "train", "--recipe", "A", "--data", str(root),
                           "--output", str(root / "train" / "circle" / "run")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert code.returncode == 2 and code.stderr.strip().splitlines() == [
        f"vggkit train: error: The output folder {root / 'train' / 'circle' / 'run'} is inside the data folder "
        f"{root}; the next run would read its files as data. Choose a --output outside {root}."]
    assert not (root / "train" / "circle" / "run").exists()
    with pytest.raises(ValueError, match="is inside the data folder"):
        vggkit.finetune(root / "train", weights=None, model="vgg11", width=1 / 16, output_dir=root / "train",
                        progress=False)
    assert main(["finetune", str(root), "--weights", "none", "--model", "vgg11", "--output",
                 str(root / "val" / "circle" / "out")]) == 2


# --------------------------------------------------------------------------- non-UTF-8 names


def test_non_utf8_class_and_file_names_are_kept_and_written_safely(tmp_path):
    root = tmp_path / "data"
    odd_class = os.fsdecode(b"sq\xff\xfe")
    for name in ("circle", odd_class):
        (root / name).mkdir(parents=True)
        for i in range(4):
            noise(40, 40, seed=i + len(name)).save(root / name / f"{i}.png")
    noise(40, 40).save(root / "circle" / NON_UTF8)
    csv_path = tmp_path / "pred.csv"
    result = vggkit.evaluate(vggkit.create_model("vgg11", width=1 / 16, num_classes=2), root, protocol="center",
                             workers=0, progress=False, predictions_csv=csv_path, precision="fp32", device="cpu")
    assert result["center"].n_images == 9
    raw = csv_path.read_bytes()
    assert raw.count(b"\n") == 10 and b"sq\xff\xfe" in raw and b"sq\xff\xfe.png" in raw  # the names' own bytes
    out = tmp_path / "out"
    finetuned = vggkit.finetune(root, 2, weights=None, model="vgg11", width=1 / 16, image_size=32, batch_size=8,
                                epochs=1, progress=False, output_dir=out)
    assert odd_class in finetuned.class_names and (out / "confusion_matrix.png").stat().st_size > 0
    cli = subprocess.run([sys.executable, "-m", "vggkit", "predict", str(out / "model.pth"), str(root)],
                         capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"})
    assert cli.returncode == 0, cli.stderr
    assert "sq\ufffd\ufffd.png".encode() in cli.stdout and cli.stdout.count(b"\n") == 9 * 3  # path + top-2 each


# --------------------------------------------------------------------------- memory: the rescaled size decides


def test_extreme_aspect_ratios_stay_under_2_gb_in_evaluate_and_the_score_map_view(tmp_path):
    result = run_capped(f"""
        import time, warnings
        from pathlib import Path
        import vggkit
        from vggkit.data.images import ImageError
        from vggkit.app.demo import DemoModel
        from bad_inputs import noise
        root = Path({str(tmp_path / 'data')!r})
        for name in ("a", "b"):
            (root / name).mkdir(parents=True)
            noise(40, 36).save(root / name / "photo.png")
        noise(10000, 2).save(root / "a" / "wide.png")
        noise(2, 10000).save(root / "b" / "tall.png")
        model = vggkit.create_model("vgg11", width=1 / 16, num_classes=2)
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            evaluated = vggkit.evaluate(model, root, protocol=["center", "dense"], scales=(256, 384), workers=0,
                                        progress=False)
        seconds = time.perf_counter() - started
        views = []
        for name in ("a/wide.png", "b/tall.png"):
            try:
                DemoModel(model).score_maps_view(root / name, (384,))
                views.append("answered")
            except ValueError as error:  # the app's own budget for a dense view (ImageError is one too)
                views.append(str(error))
        RESULT = {{"n": evaluated["dense"].n_images, "warnings": [str(w.message) for w in caught],
                  "seconds": seconds, "views": views}}
    """, tmp_path)
    assert result["n"] == 2  # the two photographs; the strips skipped
    skipped = [w for w in result["warnings"] if w.startswith("Skipped")]
    assert len(skipped) == 1 and "wide.png: rescaled to shortest side" in skipped[0] and "tall.png" in skipped[0]
    # The app holds a dense view to APP_DENSE_MAX_PIXELS after rescaling, before anything is allocated.
    assert all("above the limit of 1,000,000 pixels for dense evaluation" in v for v in result["views"])
    assert result["views"][0].startswith("A 10000 x 2 image rescaled to Q = 384 is 1920000 x 384")
    assert result["seconds"] < 30
    assert result["peak_mb"] < PEAK_LIMIT_MB, result


# --------------------------------------------------------------------------- the corpus through every entry point


def test_the_corpus_through_every_entry_point_under_a_memory_cap(tmp_path):
    expected = make_data(tmp_path / "data")
    usable = sum(outcome == "ok" for outcome in expected.values())
    result = run_capped(f"""
        import warnings
        from pathlib import Path
        import vggkit
        from vggkit.data.folders import scan_folder
        from vggkit.evaluation.predict import predict_paths
        root, out = Path({str(tmp_path / 'data')!r}), Path({str(tmp_path / 'out')!r})

        def warned(call):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                value = call()
            return value, [str(w.message) for w in caught if "Skipped" in str(w.message)]

        scan = scan_folder(root, verify=True)
        model = vggkit.create_model("vgg11", width=1 / 16, num_classes=2)
        evaluated, eval_warnings = warned(lambda: vggkit.evaluate(model, root, protocol=["center", "dense"],
                                                                 scales=224, workers=0, progress=False))
        tuned, tune_warnings = warned(lambda: vggkit.finetune(root, 2, weights=None, model="vgg11", width=1 / 16,
                                                             image_size=32, batch_size=8, epochs=1, progress=False,
                                                             output_dir=out))
        features, extract_warnings = warned(lambda: vggkit.extract_features(model, root, layer="pool5",
                                                                           scales=(224,), progress=False))
        predicted, predict_warnings = warned(lambda: predict_paths(out / "model.pth", [root / "a"]))
        RESULT = {{"scan": scan.counts(), "skipped": [Path(p).name for p, _ in scan.skipped],
                  "evaluated": evaluated["dense"].n_images, "tuned": sum(tuned.metrics["support"].values()),
                  "features": len(features.paths), "predicted": len(predicted),
                  "warnings": [len(w) for w in (eval_warnings, tune_warnings, extract_warnings, predict_warnings)],
                  "predict_warning": predict_warnings[0]}}
    """, tmp_path, timeout=180)
    a_count = 4 + usable
    assert result["scan"] == {"a": a_count, "b": 4}  # b's symlink to a0 and hard link to a1: counted in a only
    bad = {name for name, outcome in expected.items() if outcome != "ok"} - {"dir.jpg"}  # dir.jpg is walked
    assert bad | {"loop", "link.png", "hard.png"} <= set(result["skipped"])
    assert result["evaluated"] == a_count + 4
    assert result["features"] == a_count + 4
    # The checkpoint's own input is 32 px (resized to 36): the strips rescale within the limit there, so they are used.
    assert result["predicted"] == a_count + 2
    assert result["tuned"] > 0 and result["warnings"] == [2, 1, 1, 1]  # evaluate: the scan's, then the reads'
    assert "fifo.jpg: a FIFO (named pipe)" in result["predict_warning"]
    assert result["peak_mb"] < PEAK_LIMIT_MB, result

    cli = subprocess.run([sys.executable, "-m", "vggkit", "predict", str(tmp_path / "out" / "model.pth"),
                          str(tmp_path / "data" / "a"), str(tmp_path / "data" / "a" / "fifo.jpg")],
                         capture_output=True, text=True, timeout=120, errors="replace",
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert cli.returncode == 0 and "Traceback" not in cli.stderr
    assert cli.stderr.startswith("vggkit predict: warning: Skipped") and cli.stdout.count("\n") == 3 * (a_count + 2)
    cli = subprocess.run([sys.executable, "-m", "vggkit", "predict", str(tmp_path / "out" / "model.pth"),
                          str(tmp_path / "data" / "a" / "dir.jpg")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert cli.returncode == 2 and cli.stderr.splitlines()[-1].startswith("vggkit predict: error: No usable image")
    with pytest.raises(ImageError, match=r"loop\.jpg: a symbolic link loop"):
        vggkit.predict(tmp_path / "out" / "model.pth", [tmp_path / "data" / "a" / "loop.jpg"])


def test_predict_paths_counts_each_file_given_once_when_none_is_usable(tmp_path):
    from vggkit.evaluation.predict import predict_paths

    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    model = vggkit.create_model("vgg11", width=1 / 16, num_classes=2)
    with pytest.warns(UserWarning, match="notes.jpg: not an image"):
        with pytest.raises(ValueError, match=r"No usable image among the 1 file\(s\) given"):
            predict_paths(model, [text])
