"""Data sources: class folders, WebDataset shards and Hugging Face datasets give the same samples, errors
and features; corrupt samples are skipped and reported; pack/verify; torchrun evaluation and extraction."""

import csv
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vggkit
from vggkit.cli import main
from vggkit.data.images import load_image
from vggkit.data.pack import pack, verify_pack
from vggkit.data.sources import detect, open_scan
from vggkit.evaluation.evaluate import evaluate
from vggkit.features.extract import extract_features

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
WIDTH = 1 / 32
FP32 = {"precision": "fp32", "device": "cpu", "progress": False}


def write_photos(root: Path) -> Path:
    """root/<photo>/*: 7 small crops of real photos (JPEG, one PNG, one BMP), 3 classes, an odd count."""
    rng = np.random.default_rng(0)
    counts = {"astronaut": 3, "chelsea": 2, "coffee": 2}
    for name, count in counts.items():
        photo = Image.open(ROOT / "assets" / "examples" / f"{name}.jpg").convert("RGB")
        (root / name).mkdir(parents=True)
        for i in range(count):
            x, y = (int(v) for v in rng.integers(0, min(photo.size) - 120, 2))
            crop = photo.crop((x, y, x + 100 + 10 * i, y + 80)).resize((70 + 5 * i, 56))
            suffix = {0: ".jpg", 1: ".png"}.get(i, ".bmp") if name == "astronaut" else ".jpg"
            crop.save(root / name / f"{name}_{i}{suffix}")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tree, its shards (several: a small shard size), its parquet files and a save_to_disk DatasetDict."""
    import datasets

    base = tmp_path_factory.mktemp("sources")
    tree = write_photos(base / "val")
    pack(tree, base / "wds", "wds", shard_size="20KB", progress=False)
    pack(tree, base / "parquet", "parquet", shard_size="20KB", progress=False)
    scan = open_scan(tree)
    images = [{"bytes": Path(p).read_bytes(), "path": Path(p).name}
              for p, _ in scan.samples]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=scan.classes)})
    table = datasets.Dataset.from_dict({"image": images, "label": [label for _, label in scan.samples]},
                                       features=features)
    datasets.DatasetDict({"validation": table, "train": table}).save_to_disk(str(base / "disk"))
    return {"folder": tree, "wds": base / "wds", "parquet": base / "parquet", "disk": base / "disk", "base": base}


def tiny(num_classes: int = 3) -> vggkit.VGG:
    return vggkit.create_model("vgg11", width=WIDTH, num_classes=num_classes)


def test_every_kind_is_detected_and_gives_the_folder_pixels(data):
    folder = open_scan(data["folder"])
    shards = sorted(str(p) for p in data["wds"].glob("*.tar"))
    assert len(shards) > 1
    pattern = str(data["wds"] / f"val-{{000000..{len(shards) - 1:06d}}}.tar")
    kinds = {"wds": "webdataset", "parquet": "huggingface", "disk": "huggingface"}
    for name, given in [("wds", data["wds"]), ("wds", pattern), ("wds", shards), ("parquet", data["parquet"]),
                        ("disk", data["disk"])]:
        assert detect(given) == kinds[name]
        scan = open_scan(given)
        assert scan.classes == folder.classes and not scan.skipped
        assert [label for _, label in scan.samples] == [label for _, label in folder.samples]
        for (path, _), (sample, _) in zip(folder.samples, scan.samples):
            assert np.array_equal(np.asarray(load_image(path)), np.asarray(load_image(sample)))
    assert str(open_scan(pattern).samples[0][0]) == "val-000000.tar:astronaut_0.jpg"
    assert str(open_scan(data["disk"]).samples[3][0]) == "disk:validation[3]:chelsea_0.jpg"
    assert verify_pack(data["wds"]) == [] and verify_pack(data["parquet"]) == []


def test_what_is_no_kind_is_one_line_naming_the_kinds_tried(data, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    for given in (tmp_path, tmp_path / "notes.txt"):
        with pytest.raises(ValueError, match=r"^[^\n]*tried a class-folder tree; WebDataset shards.*Hugging Face"):
            detect(given)
    with pytest.raises(FileNotFoundError, match="Data folder not found"):
        detect(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="Shard not found"):
        open_scan(str(tmp_path / "val-{000000..000001}.tar"))


def write_shard(path: Path, samples: list[dict]) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


def test_corrupt_samples_are_skipped_and_reported_as_folders_report_them(data, tmp_path, monkeypatch, capsys):
    good = (data["folder"] / "chelsea" / "chelsea_0.jpg").read_bytes()
    big = io.BytesIO()
    Image.new("RGB", (600, 600)).save(big, format="PNG")
    shard = tmp_path / "val-000000.tar"
    write_shard(shard, [{"__key__": "ok", "jpg": good, "cls": b"1"},
                        {"__key__": "corrupt", "jpg": b"not a jpeg", "cls": b"0"},
                        {"__key__": "nolabel", "jpg": good},
                        {"__key__": "badlabel", "jpg": good, "cls": b"cat"},
                        {"__key__": "outofrange", "jpg": good, "cls": b"7"},
                        {"__key__": "big", "png": big.getvalue(), "cls": b"2"},
                        {"__key__": "noimage", "txt": b"hello", "cls": b"0"}])
    (tmp_path / "classes.txt").write_text("astronaut\nchelsea\ncoffee\n")
    monkeypatch.setenv("VGGKIT_MAX_PIXELS", "200000")  # 600x600 is over it
    scan = open_scan(tmp_path)
    assert [str(s) for s, _ in scan.samples] == ["val-000000.tar:ok.jpg"]
    reasons = dict((str(name), reason) for name, reason in scan.skipped)
    assert "not an image PIL can read" in reasons["val-000000.tar:corrupt.jpg"]
    assert "no .cls label" in reasons["val-000000.tar:nolabel.jpg"]
    assert "not an integer" in reasons["val-000000.tar:badlabel.jpg"]
    assert "not one of the 3 classes" in reasons["val-000000.tar:outofrange.jpg"]
    assert "decompression bomb" in reasons["val-000000.tar:big.png"]
    assert "no image member" in reasons["val-000000.tar:noimage"]
    with pytest.warns(UserWarning, match=r"Skipped 6 file\(s\)"):
        result = evaluate(tiny(), tmp_path, protocol="center", workers=0, **FP32)
    assert result.n_images == 1
    truncated = tmp_path / "cut"
    truncated.mkdir()
    (truncated / "val-000000.tar").write_bytes(shard.read_bytes()[:3000])
    cut = open_scan(truncated)
    assert any("not a readable tar shard" in reason for _, reason in cut.skipped), cut.skipped


def test_evaluate_gives_the_folder_errors_and_rows_from_shards_and_tables(data, tmp_path):
    model = tiny()
    kwargs = dict(protocol=["center", "dense"], scales=(224,), workers=0, **FP32)
    folder = evaluate(model, data["folder"], predictions_csv=tmp_path / "folder.csv", **kwargs)
    assert 0 < folder["dense"].top1_error < 100 or folder["center"].top1_error > 0  # not a trivial model
    for name in ("wds", "parquet", "disk"):
        other = evaluate(model, data[name], predictions_csv=tmp_path / f"{name}.csv", **kwargs)
        for p in ("center", "dense"):
            assert (other[p].top1_error, other[p].top5_error) == (folder[p].top1_error, folder[p].top5_error)
            assert other[p].per_class_accuracy == folder[p].per_class_accuracy
        rows = [row[1:] for row in csv.reader(open(tmp_path / f"{name}.csv"))]
        assert rows == [row[1:] for row in csv.reader(open(tmp_path / "folder.csv"))]


def test_extract_gives_the_folder_rows_from_shards_and_tables(data):
    kwargs = dict(layer="pool5", scales=(64, 80), flip=True, weights=None, width=WIDTH, **FP32)
    folder = extract_features("vgg11", data["folder"], **kwargs)
    for name in ("wds", "parquet", "disk"):
        other = extract_features("vgg11", data[name], **kwargs)
        assert np.array_equal(other.features, folder.features) and np.array_equal(other.labels, folder.labels)
        assert other.class_names == folder.class_names and len(other.paths) == 7


def test_pack_cli_writes_verifies_and_refuses_bad_input_in_one_line(data, tmp_path, capsys):
    out = tmp_path / "packed"
    assert main(["pack", str(data["folder"]), str(out), "--format", "wds", "--no-progress"]) == 0
    assert "val 7" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]  # no temp folder left
    assert {"classes.txt", "pack.json", "val-000000.tar"} <= {p.name for p in out.iterdir()}
    with tarfile.open(out / "val-000000.tar") as tar:
        assert "astronaut_0.jpg" in tar.getnames() and "astronaut_2.png" in tar.getnames()  # the BMP as PNG
    assert main(["pack", "--verify", str(out)]) == 0
    (out / "val-000000.tar").write_bytes((out / "val-000000.tar").read_bytes()[:5000])
    assert main(["pack", "--verify", str(out)]) == 1
    capsys.readouterr()
    for argv, message in [([str(data["folder"]), str(out)], "already exists"),
                          ([str(data["wds"]), str(tmp_path / "x")], "is not a class-folder tree"),
                          ([str(data["folder"]), str(tmp_path / "y"), "--shard-size", "lots"], "is not a size"),
                          ([str(tmp_path / "missing"), str(tmp_path / "z")], "Data folder not found")]:
        assert main(["pack", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


TORCHRUN_SCRIPT = """
import sys
from vggkit.cli import main
model, data, out = sys.argv[1:4]
assert main(["evaluate", "--model", model, "--data", data, "--protocol", "center", "dense", "--scales", "224",
             "--batch-size", "3", "--workers", "0", "--precision", "fp32", "--device", "cpu", "--csv",
             out + "/pred.csv",
             "--no-progress"]) == 0
assert main(["extract", data, "--model", model, "--layer", "pool5", "--scales", "64", "--flip", "--precision",
             "fp32", "--device", "cpu", "-o", out + "/features.npz", "--no-progress"]) == 0
from vggkit.utils.distributed import rank_and_world, rank_indices
print(f"rank {rank_and_world()[0]} of {rank_and_world()[1]}: images {rank_indices(7)}", file=sys.stderr)
"""


def test_torchrun_splits_images_and_gives_one_process_results(data, tmp_path):
    model = tiny()
    checkpoint = vggkit.save_checkpoint(model, tmp_path / "model.pth", head={"type": "vgg"})
    single = tmp_path / "single"
    single.mkdir()
    script = tmp_path / "both.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script), str(checkpoint), str(data["wds"]), str(single)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(checkpoint), str(data["wds"]), str(ddp)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 of 2: images [0, 2, 4, 6]" in done.stderr and "rank 1 of 2: images [1, 3, 5]" in done.stderr
    one, two = (list(csv.reader(open(folder / "pred.csv"))) for folder in (single, ddp))
    assert len(two) == 1 + 2 * 7 and [r[:5] for r in two] == [r[:5] for r in one]  # every image once, in order
    assert all(abs(float(a) - float(b)) < 1e-5 for r, s in zip(one[1:], two[1:]) for a, b in zip(r[6::2], s[6::2]))
    a, b = np.load(single / "features.npz"), np.load(ddp / "features.npz")
    assert a["paths"].tolist() == b["paths"].tolist() and np.array_equal(a["labels"], b["labels"])
    np.testing.assert_allclose(a["features"], b["features"], atol=1e-6)
    assert sorted(p.name for p in ddp.iterdir()) == ["features.npz", "pred.csv"]  # rank 0 alone wrote


TRAIN = ["model.num_classes=3", "model.width=0.0625", "data.crop=32", "data.scale=36", "data.val_scale=36",
         "data.workers=0", "optim.batch_size=4", "schedule.epochs=2", "run.precision='fp32'", "run.device='cpu'",
         "run.max_batch_per_gpu=2"]


def test_train_reads_shards_as_the_folder_and_resumes_mid_epoch(tmp_path):
    from vggkit.training.loop import train

    rng = np.random.default_rng(3)
    for split, count in (("train", 4), ("val", 1)):
        for label, name in enumerate(("n01", "n02", "n03")):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (40, 44, 3))
                pixels[..., label] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "tree" / split / name / f"{i}.jpg")
    pack(tmp_path / "tree", tmp_path / "wds", "wds", shard_size="8KB", progress=False)
    assert len(list((tmp_path / "wds").glob("train-*.tar"))) > 1
    folder = train("A", tmp_path / "tree", tmp_path / "run_folder", overrides=TRAIN, progress=False)
    for name in ("wds",):  # parquet's rows go through the same map-style path (finetune's test reads parquet)
        other = train("A", tmp_path / name, tmp_path / f"run_{name}", overrides=TRAIN, progress=False)
        assert other.step_losses == folder.step_losses and len(folder.step_losses) == 6
        assert [r["val_loss"] for r in other.history] == [r["val_loss"] for r in folder.history]
    stopped = train("A", tmp_path / "wds", tmp_path / "split", overrides=TRAIN + ["data.workers=2"],
                    stop_after_steps=4, progress=False)
    resumed = train(None, tmp_path / "wds", tmp_path / "split", resume=True, progress=False)
    assert not stopped.completed and resumed.completed
    assert stopped.step_losses + resumed.step_losses == folder.step_losses


@pytest.mark.filterwarnings("ignore:Random weights")
def test_finetune_reads_a_hugging_face_dataset_as_the_folder(data, tmp_path):
    options = dict(num_classes=3, model="vgg11", weights=None, width=1 / 32, image_size=32, batch_size=4,
                   num_workers=0, progress=False, epochs=1, strategy="full", optimizer="sgd", seed=0)
    folder = vggkit.finetune(data["folder"], output_dir=tmp_path / "folder", **options)
    table = vggkit.finetune(data["parquet"], output_dir=tmp_path / "parquet", **options)
    for key in ("train_loss", "val_loss"):
        assert [r[key] for r in table.history] == [r[key] for r in folder.history], key


def test_predict_takes_shards_and_tables_as_their_samples(data):
    from vggkit.evaluation.predict import predict_paths

    model = tiny()
    folder = predict_paths(model, [data["folder"]], precision="fp32", device="cpu")
    for name in ("wds", "disk"):
        other = predict_paths(model, [data[name]], precision="fp32", device="cpu")
        assert len(other) == 7 and list(other.values()) == list(folder.values())
    assert next(iter(predict_paths(model, [data["wds"]], precision="fp32", device="cpu"))).startswith("val-000000.tar:")


def test_bench_row_reads_the_folder_shards_and_parquet():
    from vggkit.bench._common import Settings
    from vggkit.bench.sources import data_sources

    rows = data_sources(Settings.quick(), lambda message: None)
    assert len(rows) == 4 and [row.reference for row in rows] == [True, False, False, False]
    assert all(row.images_per_s > 0 and row.task.startswith("(l)") for row in rows)


def test_torchrun_training_from_shards_equals_one_process(tmp_path):
    from vggkit.training.loop import train

    rng = np.random.default_rng(4)
    for split, count in (("train", 4), ("val", 1)):
        for label, name in enumerate(("n01", "n02", "n03")):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (40, 44, 3))
                pixels[..., label] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "tree" / split / name / f"{i}.jpg")
    pack(tmp_path / "tree", tmp_path / "wds", "wds", shard_size="8KB", progress=False)
    overrides = [item for item in TRAIN if not item.startswith("run.max_batch")] + ["model.dropout=0",
                                                                                    "schedule.epochs=1"]
    single = train("A", tmp_path / "wds", tmp_path / "single", overrides=overrides, progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "vggkit.cli", "train", "--recipe", "A", "--data", str(tmp_path / "wds"), "--output",
               str(tmp_path / "ddp"), "--no-progress"] + [arg for item in overrides for arg in ("--set", item)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    import json
    import torch

    a = torch.load(tmp_path / "single" / "last.pt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "ddp" / "last.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    row = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("val_top1_error", "val_loss", "train_loss"):
        assert row[key] == pytest.approx(single.history[0][key], abs=1e-5)
