"""Checkpoint integrity: one reader for every load, refused files named in one line, metadata and
numbers validated, stale temp files and feature caches removed, and a run killed between any two of
its end-of-epoch writes resumed to exactly the files of an uninterrupted one."""

import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from image_folders import make_shapes

import vggkit
from vggkit.utils.atomic import atomic_save, remove_stale_temps
from vggkit.weights.checkpoint import read_checkpoint
from vggkit.weights.checkpoint import WeightsError
from vggkit.weights.factory import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = dict(num_classes=2, width=1 / 16)


def run_cli(*args, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python -m vggkit ARGS`` with this tree first on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "vggkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, one error line holding every needle; returns that line."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert "weights_only" not in done.stderr  # torch's hint to turn the safety off never leaks
    return errors[0]


class Payload:
    """Unpickling this would run code (it writes a marker file)."""

    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A vggkit checkpoint of a 2-class vgg11 at width 1/16, and an image to predict on."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = vggkit.create_model("vgg11", **TINY_MODEL)
    model.class_names = ["circle", "square"]
    save_checkpoint(model, root / "model.pth")
    make_shapes(root / "shapes", per_class=1)
    return root


def image_of(tiny: Path) -> Path:
    return tiny / "shapes" / "circle" / "circle_000.png"


# --------------------------------------------------------------------------- files that are not checkpoints


def test_fifo_as_weights_is_refused_at_once_not_waited_on(tiny, tmp_path):
    fifo = tmp_path / "fifo.pth"
    os.mkfifo(fifo)
    for load in (lambda: vggkit.create_model("vgg11", weights=fifo), lambda: vggkit.load(fifo),
                 lambda: read_checkpoint(fifo)):
        with pytest.raises(WeightsError, match=r"fifo.pth is a FIFO \(named pipe\), not a regular file"):
            load()
    # The CLI cases that hung for ever: predict's checkpoint and evaluate's --weights / --model.
    assert_one_line_error(run_cli("predict", fifo, image_of(tiny), timeout=60), "fifo.pth", "FIFO")
    assert_one_line_error(run_cli("evaluate", "--model", fifo, "--data", tiny / "shapes", timeout=60), "FIFO")
    assert_one_line_error(run_cli("evaluate", "--model", "vgg11", "--weights", fifo, "--data", tiny / "shapes",
                                  timeout=60), "FIFO")


def test_folder_symlink_loop_and_broken_link_are_named_for_what_they_are(tmp_path):
    (tmp_path / "run.pth").mkdir()
    (tmp_path / "loop.pth").symlink_to(tmp_path / "loop.pth")
    (tmp_path / "dangling.pth").symlink_to(tmp_path / "gone.pth")
    with pytest.raises(WeightsError, match="run.pth is a folder; give the checkpoint file in it"):
        vggkit.load(tmp_path / "run.pth")
    with pytest.raises(WeightsError, match="loop.pth cannot be opened: a symbolic link loop"):
        vggkit.create_model("vgg11", weights=tmp_path / "loop.pth")
    with pytest.raises(FileNotFoundError, match="dangling.pth is a broken symbolic link"):
        vggkit.load(tmp_path / "dangling.pth")


def test_code_carrying_checkpoint_is_refused_on_every_path_without_torch_hint(tiny, tmp_path):
    Payload.marker = str(tmp_path / "code_ran")
    evil = tmp_path / "evil.pth"
    model = vggkit.create_model("vgg11", **TINY_MODEL)
    torch.save({"format": "vggkit", "model_name": "vgg11", "num_classes": 2, "state_dict": model.state_dict(),
                "extra": Payload()}, evil)
    net_b = vggkit.create_model("vgg13", **TINY_MODEL)
    for load in (lambda: vggkit.create_model(weights=evil), lambda: vggkit.load(evil),
                 lambda: vggkit.predict(evil, [image_of(tiny)]), lambda: vggkit.init_from(evil, net_b),
                 lambda: vggkit.weights.factory.checkpoint_metadata(evil)):
        with pytest.raises(WeightsError) as error:
            load()
        message = str(error.value)
        assert "evil.pth" in message and "refuses to unpickle" in message and "other than tensors (" in message
        assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    # train --resume on a run whose last.pt carries code: one line, no code run.
    run = tmp_path / "run"
    run.mkdir()
    evil.rename(run / "last.pt")
    assert_one_line_error(run_cli("train", "--resume", "--data", tmp_path / "nodata", "--output", run),
                          "last.pt", "refuses to unpickle")
    assert not Path(Payload.marker).exists()


def test_train_resume_on_a_bad_last_pt_is_one_clear_line(tiny, tmp_path):
    good = (tiny / "model.pth").read_bytes()
    cases = {  # what last.pt holds -> what the line says
        "empty": (b"", "is not a PyTorch weight file (an empty file)"),
        "truncated": (good[: len(good) // 2], "is truncated or corrupt"),
        "finetuned": (good, "without 'recipe'"),  # a model checkpoint (best.pt, model.pth): no training state
    }
    for name, (content, says) in cases.items():
        run = tmp_path / name
        run.mkdir()
        (run / "last.pt").write_bytes(content)
        line = assert_one_line_error(run_cli("train", "--resume", "--data", tmp_path / "nodata", "--output", run),
                                     says)
        assert str(run / "last.pt") in line, line


def test_truncated_checkpoint_is_named_on_load(tiny, tmp_path):
    data = (tiny / "model.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsError, match=r"cut.pth is truncated or corrupt \(.*zip archive"):
        vggkit.load(tmp_path / "cut.pth")


# --------------------------------------------------------------------------- numbers and metadata


def test_nan_or_inf_weights_are_an_error_naming_the_first_bad_tensor(tiny, tmp_path):
    payload = torch.load(tiny / "model.pth", weights_only=True)
    payload["state_dict"]["features.conv2_1.weight"][0, 0, 0, 0] = float("nan")
    payload["state_dict"]["classifier.fc7.bias"][3] = float("inf")
    torch.save(payload, tmp_path / "nan.pth")
    for load in (lambda: vggkit.load(tmp_path / "nan.pth"), lambda: vggkit.create_model(weights=tmp_path / "nan.pth")):
        with pytest.raises(WeightsError, match=r"nan.pth: tensor 'features.conv2_1.weight' holds 1 NaN or infinite"):
            load()
    # The CLI printed "nan circle / nan square" and exited 0.
    done = run_cli("predict", tmp_path / "nan.pth", image_of(tiny))
    assert_one_line_error(done, "nan.pth", "features.conv2_1.weight")
    assert "nan" not in done.stdout


BAD_FIELDS = [  # (field, value, what the message names)
    ("preprocess", None, "'preprocess' is None"),
    ("preprocess", {"input_size": -5}, "'preprocess.input_size' is -5"),
    ("preprocess", {"mean": [0.5, 0.5]}, "'preprocess.mean'"),
    ("preprocess", {"std": [0.0, 1.0, 1.0]}, "'preprocess.std' holds a zero"),
    ("preprocess", {"channel_order": "GBR"}, "'preprocess.channel_order'"),
    ("preprocess", {"colour": 1}, "unknown field(s) colour"),
    ("class_names", ["circle"], "'class_names' holds 1 names for num_classes=2"),
    ("class_names", "circle", "'class_names' is not a list"),
    ("num_classes", -3, "'num_classes' is -3"),
    ("model_name", "vgg99", "'model_name' is 'vgg99'"),
    ("model_name", None, "'model_name' is None"),
    ("width", float("inf"), "'width' is inf"),
    ("dropout", 1.5, "'dropout' is 1.5"),
    ("head", {"type": "bogus"}, "'head' is"),
    ("head", {"type": "mlp", "hidden": 0}, "'head.hidden' is 0"),
    ("state_dict", [1, 2], "'state_dict' is a list"),
]


@pytest.mark.parametrize("field, value, names", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_every_metadata_field_is_validated_with_one_message(tiny, tmp_path, field, value, names):
    payload = torch.load(tiny / "model.pth", weights_only=True)
    payload[field] = value
    path = tmp_path / "odd.pth"
    torch.save(payload, path)
    for load in (vggkit.load, lambda p: vggkit.create_model(weights=p)):
        with pytest.raises(WeightsError) as error:
            load(path)
        message = str(error.value)
        assert message.startswith(f"{path}: checkpoint field") and names in message, message
        assert len(message.splitlines()) == 1


def test_fewer_class_names_than_classes_is_one_line_in_predict(tiny, tmp_path):
    payload = torch.load(tiny / "model.pth", weights_only=True)
    payload["class_names"] = ["circle"]  # gave an IndexError in predict
    torch.save(payload, tmp_path / "names.pth")
    assert_one_line_error(run_cli("predict", tmp_path / "names.pth", image_of(tiny)), "names.pth", "class_names")


# --------------------------------------------------------------------------- leftovers of killed runs


def test_stale_temp_files_are_removed_at_the_next_write_but_live_ones_kept(tmp_path):
    dead = tmp_path / ".last.pt.tmp999999999"  # no such process
    live = tmp_path / f".last.pt.tmp{os.getppid()}"  # a process that is still writing
    other = tmp_path / ".best.pt.tmp999999999"
    for path in (dead, live, other):
        path.write_bytes(b"PK\x03\x04 half a checkpoint")
    atomic_save({"x": torch.ones(1)}, tmp_path / "last.pt")
    assert not dead.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in remove_stale_temps(tmp_path)) == [other.name]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["x"].item() == 1


def test_feature_cache_left_by_a_killed_finetune_is_removed_at_the_next_run(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=6, size=32)
    stale = tmp_path / "out" / "feature_cache" / "train.npy"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\x93NUMPY" + b"\0" * 4096)  # a memory map of a run killed while caching
    with pytest.warns(UserWarning, match="head"):  # a frozen random backbone: said to stay at chance
        result = vggkit.finetune(data, 2, model="vgg11", weights=None, width=1 / 16, image_size=32, epochs=1,
                                 batch_size=8, progress=False, output_dir=tmp_path / "out", strategy="head")
    assert result.cache_storage == "memory" and not stale.exists()


# --------------------------------------------------------------------------- non-finite fine-tuning


def test_finetune_diverging_from_the_start_stops_with_one_line_and_writes_nothing(tmp_path):
    data = make_shapes(tmp_path / "shapes", per_class=6, size=32)
    done = run_cli("finetune", data, "--num-classes", "2", "--model", "vgg11", "--weights", "none", "--width",
                   "0.0625", "--image-size", "32", "--epochs", "2", "--lr", "1e30", "--no-progress", "--output",
                   tmp_path / "out")
    assert_one_line_error(done, "is nan", "nothing was written", "Lower the learning rate")
    assert not (tmp_path / "out" / "model.pth").exists()


def test_finetune_stops_on_a_non_finite_loss_keeping_the_last_good_epoch(tmp_path, monkeypatch):
    finetune_module = importlib.import_module("vggkit.finetuning.finetune")

    data = make_shapes(tmp_path / "shapes", per_class=6, size=32)
    run_epoch, calls = finetune_module.run_epoch, []

    def poisoned(batches, forward, device, optimizer=None, *args, **kwargs):
        # From the second training epoch on, the learning rate becomes NaN: its first update breaks the weights.
        if optimizer is not None:
            calls.append(1)
            if len(calls) == 2:
                for group in optimizer.param_groups:
                    group["lr"] = float("nan")
        return run_epoch(batches, forward, device, optimizer, *args, **kwargs)

    monkeypatch.setattr(finetune_module, "run_epoch", poisoned)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = vggkit.finetune(data, 2, model="vgg11", weights=None, width=1 / 16, image_size=32, epochs=4,
                                 batch_size=4, patience=10, progress=False, output_dir=tmp_path / "out")
    messages = [str(w.message) for w in caught if "training stopped" in str(w.message)]
    assert len(messages) == 1 and "epoch 2/4 train" in messages[0] and "best epoch before it (1)" in messages[0]
    assert result.best_epoch == 1 and len(result.history) == 1
    saved = vggkit.load(result.checkpoint)  # loading checks every tensor is finite
    assert all(torch.isfinite(t).all() for t in saved.state_dict().values() if t.is_floating_point())


# --------------------------------------------------------------------------- a kill between any two writes

KILL_HARNESS = r"""
import json, os, sys
from pathlib import Path
import importlib
train_module = importlib.import_module("vggkit.training.loop")

data, output, kill_at, mode, log = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
overrides = json.loads(sys.argv[6])
writes = []

def hooked(name, write):
    def wrapper(*args, **kwargs):
        target = {"save_checkpoint": lambda: Path(args[1]).name, "write_metrics": lambda: "metrics.jsonl",
                  "write_curves": lambda: "curves.png"}[name]()
        if len(writes) == kill_at and mode == "mid":  # killed half-way through torch.save
            (output / f".{target}.tmp{os.getpid()}").write_bytes(b"PK\x03\x04 half")
            os._exit(9)
        result = write(*args, **kwargs)
        writes.append(target)
        Path(log).write_text(json.dumps(writes))
        if len(writes) - 1 == kill_at and mode == "after":
            os._exit(9)  # a SIGKILL: no cleanup, no finally
        return result
    return wrapper

for name in ("save_checkpoint", "write_metrics", "write_curves"):
    setattr(train_module, name, hooked(name, getattr(train_module, name)))
train_module.train("A", data, output, overrides=overrides, progress=False)
"""

TIMING = ("seconds", "images_per_s", "warmup_seconds", "images_per_s_with_warmup")


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _run_files(run: Path) -> dict:
    """What a user relies on in a run folder, without wall-clock timings."""
    last = torch.load(run / "last.pt", weights_only=True)
    best = torch.load(run / "best.pt", weights_only=True)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"names": sorted(p.name for p in run.iterdir()), "metrics": _untimed(metrics),
            "last_history": _untimed(last["history"]), "last_weights": last["state_dict"],
            "last_position": (last["epoch"], last["step"], last["global_step"]),
            "best_epoch": best["epoch"], "best_weights": best["state_dict"],
            "curves": (run / "curves.png").stat().st_size > 0}


def _same(a: dict, b: dict) -> None:
    for key in a:
        if key.endswith("weights"):
            assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
        else:
            assert a[key] == b[key], (key, a[key], b[key])


def test_a_kill_between_any_two_end_of_epoch_writes_resumes_to_the_uninterrupted_files(tmp_path):
    from test_train import write_split

    data = tmp_path / "data"
    write_split(data / "train", 8, seed=1)
    write_split(data / "val", 3, seed=2)
    overrides = ["model.num_classes=3", "model.width=0.0625", "data.crop=32", "data.scale=36",
                 "data.val_scale=36", "data.workers=0", "optim.batch_size=8", "schedule.epochs=2",
                 "run.precision='fp32'", "run.device='cpu'", "init.method=glorot", "model.dropout=0",
                 "optim.lr=0.05"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}

    def harness(output: Path, kill_at: int, mode: str) -> list[str]:
        log = output.with_suffix(".writes.json")
        done = subprocess.run([sys.executable, "-c", KILL_HARNESS, data, output, str(kill_at), mode, log,
                               json.dumps(overrides)], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == (0 if kill_at < 0 else 9), done.stderr[-2000:]
        return json.loads(log.read_text())

    reference = tmp_path / "whole"
    writes = harness(reference, -1, "none")
    # best.pt goes before last.pt, the logs after it; curves.png once at the end of this short run.
    assert writes[:3] == ["best.pt", "last.pt", "metrics.jsonl"] and writes[-1] == "curves.png", writes
    expected = _run_files(reference)
    assert "best.pt" in writes[3:], writes  # epoch 2 improves, so a kill can fall between best.pt and last.pt
    # A kill after each kind of write once (so between each pair: best|last, last|metrics, metrics|best,
    # metrics|curves), and one half-way through writing epoch 2's last.pt. (A kill before the first
    # last.pt leaves nothing to resume: the run starts again.)
    first_after = {}
    for k in range(1, len(writes) - 1):
        first_after.setdefault(writes[k], k)
    cases = sorted({*first_after.values(), len(writes) - 2})
    cases = [(k, "after") for k in cases] + [(writes.index("last.pt", 2), "mid")]
    for kill_at, mode in cases:
        run = tmp_path / f"killed_{kill_at}_{mode}"
        harness(run, kill_at, mode)
        if mode == "mid":
            assert any(p.name.startswith(".last.pt.tmp") for p in run.iterdir())
        done = run_cli("train", "--resume", "--data", data, "--output", run, "--no-progress", timeout=300)
        assert done.returncode == 0, (kill_at, mode, done.stderr[-2000:])
        _same(expected, _run_files(run))
