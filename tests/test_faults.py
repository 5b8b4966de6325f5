"""Faults a long run meets: a full disk and writes cut short. Every result is complete under its final
name or absent; a full disk is one ``DiskFullError`` line (the file, the space needed, the folder, the
fix); a finished training's weights survive a final save that does not fit; the disk feature cache
allocates before it maps, so it never dies of SIGBUS.

Most tests simulate the full disk (a write, ``torch.save`` or ``os.replace`` raising what a full disk
raises); the ``small_disk`` ones use a real 2 MB tmpfs, skipped where mounting is refused (not root)."""

import csv
import errno
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from image_folders import make_shapes
from matplotlib.figure import Figure
from PIL import Image

import vggkit
from vggkit.finetuning import feature_cache
from vggkit.finetuning.feature_cache import FeatureCache
from vggkit.utils import atomic
from vggkit.utils.atomic import FALLBACK_ENV, DiskFullError, atomic_save, atomic_write, write_or_keep

ROOT = Path(__file__).resolve().parent.parent
MB = 1024**2
REAL_SAVE = torch.save  # refuse_saves wraps this one, never an earlier test's stand-in
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 598784 vs 598680"
CLASSES = ("n00000001", "n00000002")
TINY_TRAIN = ["model.num_classes=2", "model.width=0.0625", "data.crop=32", "data.scale=36", "data.val_scale=36",
              "data.workers=0", "optim.batch_size=4", "schedule.epochs=2", "run.precision='fp32'",
              "run.device='cpu'"]


@pytest.fixture(autouse=True)
def fallbacks(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """VGGKIT_FALLBACK_DIR and the system temp folder, both inside tmp_path: no test writes to the real /tmp."""
    chosen, system = tmp_path / "fallback", tmp_path / "systemp"
    system.mkdir()
    monkeypatch.setenv(FALLBACK_ENV, str(chosen))
    monkeypatch.setattr(tempfile, "tempdir", str(system))
    return chosen, system


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB tmpfs at tmp_path/disk (needs root; skipped where mounting is refused)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> None:
    """Fill ``disk`` until ``leave`` bytes are free (to the page: tmpfs counts 4 KB pages)."""
    fd = os.open(disk / f"filler{len(list(disk.glob('filler*')))}", os.O_WRONLY | os.O_CREAT)
    try:
        while shutil.disk_usage(disk).free > leave:
            os.write(fd, bytes(min(64 * 1024, shutil.disk_usage(disk).free - leave)))
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def refuse_saves(monkeypatch, folder: Path, after: str | None = None, everywhere: bool = False) -> dict:
    """``torch.save`` into ``folder`` fails as on a full disk (half a file, then torch's position error):
    from the start, or once a file named ``after`` was written there; ``everywhere``: into any folder then."""
    real_save, state = REAL_SAVE, {"full": after is None, "refused": []}

    def save(obj, f, *args, **kwargs):
        target = Path(f) if isinstance(f, (str, os.PathLike)) else None
        if target is None or not (target.parent == folder or (everywhere and state["full"])):
            return real_save(obj, f, *args, **kwargs)
        name = atomic.TEMP_PATTERN.match(target.name)["name"]
        if state["full"]:
            target.write_bytes(b"PK\x03\x04" + bytes(4096))
            state["refused"].append(name)
            raise RuntimeError(TORCH_FULL)
        real_save(obj, f, *args, **kwargs)
        state["full"] = name == after

    monkeypatch.setattr(torch, "save", save)
    return state


def assert_disk_full_line(message: str, path: Path, fix: str = "choose another --output") -> None:
    assert "\n" not in message and message.startswith(f"Disk full: cannot write {path} (")
    assert "MB needed" in message and f"in {path.parent}); free " in message, message
    assert f"MB in {path.parent} or {fix}." in message, message


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("failure", ["ENOSPC", "EDQUOT", "torch-pos", "torch-write", "replace"])
def test_a_full_disk_during_a_write_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch, failure):
    target = tmp_path / "out" / "last.pt"
    target.parent.mkdir()
    target.write_bytes(b"the previous epoch")
    real_replace = os.replace

    def write(tmp: Path) -> None:
        tmp.write_bytes(bytes(3 * 1024**2 + 5))  # 3 MB reached the disk before it refused
        if failure in ("ENOSPC", "EDQUOT"):
            raise OSError(getattr(errno, failure), os.strerror(getattr(errno, failure)))
        if failure.startswith("torch"):
            raise RuntimeError(TORCH_FULL if failure == "torch-pos" else "[enforce fail at inline_container.cc:"
                               "445] . PytorchStreamWriter failed writing file data/0: file write failed")

    if failure == "replace":
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(DiskFullError) as caught:
        atomic_write(target, write)
    monkeypatch.setattr(os, "replace", real_replace)
    error = caught.value
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC and error.path == target
    assert_disk_full_line(str(error), target)
    assert "more than 4 MB needed" in str(error)  # unknown size: what was written when it failed, rounded up
    assert target.read_bytes() == b"the previous epoch" and files_in(tmp_path / "out") == ["last.pt"]


def test_other_write_errors_are_not_taken_for_a_full_disk(tmp_path):
    def denied(tmp: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(PermissionError):
        atomic_write(tmp_path / "a.txt", denied)
    with pytest.raises(RuntimeError, match="not a disk"):
        atomic_write(tmp_path / "a.txt", lambda tmp: (_ for _ in ()).throw(RuntimeError("not a disk problem")))
    assert files_in(tmp_path) == []


def test_a_file_larger_than_the_free_space_is_refused_before_a_byte_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda folder: types.SimpleNamespace(free=MB))
    saves = []
    monkeypatch.setattr(torch, "save", lambda *args: saves.append(args))
    weights = {"fc": torch.zeros(1024, 1024), "view": None}
    weights["view"] = weights["fc"][:10]  # a view shares its storage: counted once
    with pytest.raises(DiskFullError, match=r"\(4 MB needed, 1\.0 MB free in .*\); free 3 MB in "):
        atomic_save(weights, tmp_path / "model.pth")
    assert saves == [] and files_in(tmp_path) == []



def test_write_or_keep_falls_back_to_a_folder_with_room_or_says_the_result_is_in_memory(tmp_path, fallbacks,
                                                                                        monkeypatch):
    chosen, system = fallbacks
    output = tmp_path / "run"
    state = refuse_saves(monkeypatch, output)
    where, message = write_or_keep(output / "model.pth", lambda path: atomic_save({"w": torch.ones(3)}, path))
    assert where.parent.parent == chosen / "vggkit-unsaved" and where.name == "model.pth"
    assert torch.load(where, weights_only=True)["w"].sum() == 3 and state["refused"] == ["model.pth"]
    assert message.startswith(f"Disk full: cannot write {output / 'model.pth'} (")
    assert message.endswith(f"The trained weights were written to {where} instead.")

    # The chosen folder has no room (its free space says so): the system temp folder takes it.
    real_usage = shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda folder: real_usage(folder)._replace(free=0) if
                        chosen in Path(folder).parents or Path(folder) == chosen else real_usage(folder))
    where, _ = write_or_keep(output / "best.pt", lambda path: atomic_save({"w": torch.ones(3)}, path))
    assert system in where.parents

    refuse_saves(monkeypatch, output, everywhere=True)
    where, message = write_or_keep(output / "last.pt", lambda path: atomic_save({"w": torch.ones(3)}, path))
    assert where is None and "kept in memory only, as the returned result's model" in message
    assert f"set {FALLBACK_ENV} to a folder that has" in message and files_in(output) == []


# --------------------------------------------------------------------------- plots


def test_plots_are_whole_or_absent(tmp_path, monkeypatch):
    from vggkit.app.plots import plot_parameter_split
    from vggkit.utils.plots import plot_training_curves

    history = [{"epoch": 1, "train_loss": 0.9, "val_loss": 0.8}, {"epoch": 2, "train_loss": 0.5, "val_loss": 0.6}]
    plot_training_curves(history, tmp_path / "curves.png")
    plot_training_curves(history, tmp_path / "curves.pdf")  # the format comes from the final name, not the temp's
    plot_parameter_split({"A": (9_200_000, 123_600_000), "E": (20_000_000, 123_600_000)},
                         tmp_path / "app" / "split.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "curves.pdf").read_bytes()[:5] == b"%PDF-"
    assert (tmp_path / "app" / "split.png").read_bytes()[:4] == b"\x89PNG"
    assert files_in(tmp_path) == ["app/split.png", "curves.pdf", "curves.png"]

    real_savefig = Figure.savefig

    def full(figure, fname, **kwargs):
        real_savefig(figure, fname, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")  # the last block did not fit

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(DiskFullError) as caught:
        plot_training_curves(history, tmp_path / "new" / "curves.png")
    assert_disk_full_line(str(caught.value), tmp_path / "new" / "curves.png")
    assert files_in(tmp_path / "new") == []


# --------------------------------------------------------------------------- the disk feature cache


class Pool(torch.nn.Module):
    """A stand-in backbone: 8x8 average pooling, (N, 3, 32, 32) -> (N, 3, 4, 4)."""

    def __init__(self, fail_at: int = -1) -> None:
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("a corrupt batch")
        return torch.nn.functional.avg_pool2d(images, 8)


class Noise(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, k: int):
        return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(k)), k % 2


def test_the_disk_cache_is_allocated_in_full_before_it_is_mapped(tmp_path):
    cache = FeatureCache.build(Pool(), Noise(), batch_size=4, storage="disk", cache_dir=tmp_path, name="train",
                               progress=False)
    in_memory = FeatureCache.build(Pool(), Noise(), batch_size=4, storage="memory", progress=False)
    size = (tmp_path / "train.npy").stat()
    assert cache.storage == "disk" and size.st_blocks * 512 >= size.st_size >= 10 * 3 * 4 * 4 * 4
    assert np.array_equal(np.load(tmp_path / "train.npy"), in_memory.features.numpy())  # a valid .npy
    cache.close()
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("refused_by", ["free-space", "fallocate"])
def test_a_full_disk_sends_the_cache_to_memory_with_one_warning_or_fails_in_one_line(tmp_path, monkeypatch,
                                                                                     refused_by):
    allocations = []
    if refused_by == "free-space":
        monkeypatch.setattr(feature_cache, "free_bytes", lambda folder: 100)
        monkeypatch.setattr(os, "posix_fallocate", lambda *args: allocations.append(args))
    else:
        def fallocate(fd, offset, length):
            allocations.append(length)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "posix_fallocate", fallocate)
    folder = tmp_path / "out" / "feature_cache"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = FeatureCache.build(Pool(), Noise(), batch_size=4, storage="disk", cache_dir=folder, name="train",
                                   progress=False)
    assert [str(w.message).split(" (")[0] for w in caught] == [f"Disk full: cannot write {folder / 'train.npy'}"]
    assert "The train features (1 MB) are kept in memory instead." in str(caught[0].message)
    assert cache.storage == "memory" and files_in(tmp_path / "out") == []
    assert (allocations == []) == (refused_by == "free-space")  # the free-space check answers first
    expected = FeatureCache.build(Pool(), Noise(), batch_size=4, storage="memory", progress=False)
    assert torch.equal(cache.features, expected.features)

    with pytest.raises(DiskFullError) as error:  # larger than memory_limit: memory is no way out
        FeatureCache.build(Pool(), Noise(), batch_size=4, storage="auto", cache_dir=folder, name="train",
                           memory_limit=0, progress=False)
    assert_disk_full_line(str(error.value), folder / "train.npy", "choose another --output or use --cache memory")
    assert files_in(tmp_path / "out") == []


def test_a_cache_cut_short_is_not_left_on_the_disk(tmp_path):
    with pytest.raises(RuntimeError, match="a corrupt batch"):
        FeatureCache.build(Pool(fail_at=2), Noise(), batch_size=4, storage="disk", cache_dir=tmp_path, name="val",
                           progress=False)
    assert files_in(tmp_path) == []


# --------------------------------------------------------------------------- evaluate's predictions CSV


@pytest.fixture
def val_folder(tmp_path) -> Path:
    data = tmp_path / "val"
    for index, name in enumerate(("ants", "bees")):
        (data / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.random.default_rng(10 * index + i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
                            ).save(data / name / f"{i}.png")
    return data


def tiny_classifier() -> vggkit.VGG:
    model = vggkit.create_model("vgg11", width=1 / 32, num_classes=2)
    model.class_names = ["ants", "bees"]
    return model


def test_the_csv_is_written_row_by_row_under_a_partial_name_then_renamed(val_folder, tmp_path, monkeypatch):
    evaluate_module = importlib.import_module("vggkit.evaluation.evaluate")
    real_write, seen = evaluate_module.PredictionsCsv.write, []

    def write(self, *args):
        real_write(self, *args)
        seen.append((self.path.exists(), self.partial.read_text().count("\n")))

    monkeypatch.setattr(evaluate_module.PredictionsCsv, "write", write)
    csv_path = tmp_path / "preds.csv"
    result = vggkit.evaluate(tiny_classifier(), val_folder, protocol="center", batch_size=2, workers=0,
                             progress=False, predictions_csv=csv_path, precision="fp32", device="cpu")
    assert seen == [(False, 3), (False, 5), (False, 7)]  # rows on the disk as the pass goes, never the final name
    assert result.predictions_csv == csv_path and not (tmp_path / "preds.csv.partial").exists()
    assert len(list(csv.DictReader(open(csv_path)))) == 6

    # A pass that fails half-way: no file under the final name, its rows kept in the .partial file.
    calls = []

    def fail_second(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the device went away")
        real_write(self, *args)

    monkeypatch.setattr(evaluate_module.PredictionsCsv, "write", fail_second)
    with pytest.raises(RuntimeError, match="went away"):
        vggkit.evaluate(tiny_classifier(), val_folder, protocol="center", batch_size=2, workers=0, progress=False,
                        predictions_csv=tmp_path / "cut.csv", precision="fp32", device="cpu")
    assert not (tmp_path / "cut.csv").exists() and (tmp_path / "cut.csv.partial").read_text().count("\n") == 3


def test_a_full_disk_under_the_csv_is_one_line_from_the_cli(val_folder, tmp_path, monkeypatch, capsys):
    from vggkit.cli import main

    evaluate_module = importlib.import_module("vggkit.evaluation.evaluate")

    class FullFile:
        """A file on a disk with 300 bytes left: the write that crosses them fails with ENOSPC."""

        def __init__(self, file) -> None:
            self.file, self.budget = file, 300

        def write(self, text: str) -> int:
            self.budget -= len(text)
            if self.budget < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(text)

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(evaluate_module, "open", lambda *a, **k: FullFile(open(*a, **k)), raising=False)
    checkpoint = vggkit.save_checkpoint(tiny_classifier(), tmp_path / "model.pth", head={"type": "vgg"})
    csv_path = tmp_path / "preds.csv"
    assert main(["evaluate", "--model", str(checkpoint), "--data", str(val_folder), "--protocol", "center",
                 "--workers", "0", "--no-progress", "--batch-size", "2", "--csv", str(csv_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vggkit evaluate: error: Disk full: cannot write ")
    assert_disk_full_line(err.removeprefix("vggkit evaluate: error: ").strip(), csv_path, "choose another --csv path")
    assert not csv_path.exists()


# --------------------------------------------------------------------------- train


def write_split(root: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (40, 40, 3))
            pixels[..., label] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"img_{i}.JPEG", quality=95)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    write_split(root / "train", 4, seed=1)
    write_split(root / "val", 2, seed=2)
    return root


def test_a_full_disk_before_training_leaves_no_recipe_and_is_one_line_from_the_cli(imagenet, tmp_path,
                                                                                   monkeypatch, capsys):
    from vggkit.cli import main

    real_replace = os.replace
    run, cli_run = tmp_path / "run", tmp_path / "cli"
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
                        if Path(dst).parent in (run, cli_run) else real_replace(src, dst))
    with pytest.raises(DiskFullError) as caught:
        vggkit.train("A", imagenet, run, overrides=TINY_TRAIN, progress=False)
    assert_disk_full_line(str(caught.value), run / "recipe.toml")
    assert files_in(run) == []
    assert main(["train", "--recipe", "A", "--data", str(imagenet), "--output", str(cli_run), "--no-progress",
                 *[item for override in TINY_TRAIN for item in ("--set", override)]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"vggkit train: error: Disk full: cannot write {cli_run}/recipe")
    assert files_in(cli_run) == []


def test_a_final_save_that_does_not_fit_keeps_the_trained_weights(imagenet, tmp_path, fallbacks, monkeypatch):
    chosen, _ = fallbacks
    run = tmp_path / "run"
    state = refuse_saves(monkeypatch, run, after="last.pt")  # epoch 1 saved; the disk is full at epoch 2
    with pytest.warns(UserWarning, match="Disk full") as caught:
        result = vggkit.train("A", imagenet, run, overrides=TINY_TRAIN, progress=False)
    full = [str(w.message) for w in caught if "Disk full" in str(w.message)]
    assert "last.pt" in state["refused"] and len(full) == len(state["refused"])
    assert not result.completed and result.save_error == full[-1]
    assert result.checkpoint.parent.parent == chosen / "vggkit-unsaved" and result.checkpoint.name == "last.pt"
    assert result.save_error.endswith(f"The trained weights were written to {result.checkpoint} instead.")
    kept = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert kept["epoch"] == 2 and [row["epoch"] for row in kept["history"]] == [1, 2]
    for name, value in result.model.state_dict().items():
        assert torch.equal(kept["state_dict"][name], value), name
    # The run folder holds epoch 1, whole; its logs stop there too (a resume re-derives them).
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 1
    assert (run / "metrics.jsonl").read_text().count("\n") == 1
    assert not [name for name in files_in(run) if ".tmp" in name]


def test_when_nowhere_has_room_the_weights_stay_on_the_result(imagenet, tmp_path, monkeypatch):
    run = tmp_path / "run"
    refuse_saves(monkeypatch, run, after="last.pt", everywhere=True)
    with pytest.warns(UserWarning, match="kept in memory only"):
        result = vggkit.train("A", imagenet, run, overrides=TINY_TRAIN, progress=False)
    assert result.checkpoint is None and "as the returned result's model" in result.save_error
    epoch_1 = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["state_dict"]
    trained = result.model.state_dict()
    assert any(not torch.equal(trained[name], epoch_1[name]) for name in epoch_1)  # epoch 2's, in memory only


# --------------------------------------------------------------------------- finetune


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes") / "data", per_class=6, size=32)


FINETUNE = dict(model="vgg11", weights=None, width=1 / 16, image_size=32, epochs=1, batch_size=8, progress=False)


@pytest.mark.filterwarnings("ignore:Random weights")
def test_finetune_keeps_its_weights_when_model_pth_does_not_fit(shapes, tmp_path, fallbacks, monkeypatch):
    chosen, _ = fallbacks
    output = tmp_path / "out"
    refuse_saves(monkeypatch, output)
    with pytest.warns(UserWarning, match="Disk full") as caught:
        result = vggkit.finetune(shapes, 2, output_dir=output, **FINETUNE)
    full = [str(w.message) for w in caught if "Disk full" in str(w.message)]
    assert full == [result.save_error] and result.checkpoint.parent.parent == chosen / "vggkit-unsaved"
    assert_disk_full_line(result.save_error.split(" The trained")[0], output / "model.pth")
    assert result.plots == {} and files_in(output) == []  # nothing half-written, no plots on a full disk
    kept = vggkit.load(result.checkpoint)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(kept.eval()(images), result.model.eval()(images))

    refuse_saves(monkeypatch, output, everywhere=True)
    with pytest.warns(UserWarning, match="kept in memory only"):
        result = vggkit.finetune(shapes, 2, output_dir=output, **FINETUNE)
    assert result.checkpoint is None and result.model is not None and files_in(output) == []


def test_finetune_on_a_real_full_disk_is_warnings_and_exit_2_never_sigbus(shapes, small_disk, fallbacks,
                                                                          monkeypatch, capsys):
    from vggkit.cli import main

    chosen, _ = fallbacks
    fill(small_disk, leave=64 * 1024)
    # The failure the probe met: numpy's memory map of a sparse file on a full disk dies of SIGBUS.
    sparse = subprocess.run([sys.executable, "-c", "import numpy as np, sys; m = np.lib.format.open_memmap("
                             "sys.argv[1], mode='w+', dtype=np.float32, shape=(1 << 20,)); m[:] = 1",
                             str(small_disk / "sparse.npy")], capture_output=True)
    assert sparse.returncode == -7  # SIGBUS: the disk really is full
    (small_disk / "sparse.npy").unlink()
    # Allocating first fails cleanly on the same disk, even when the free-space check is not asked.
    with monkeypatch.context() as unchecked:
        unchecked.setattr(feature_cache, "free_bytes", lambda folder: None)
        with pytest.raises(DiskFullError, match="4 MB needed"):
            feature_cache.allocate_npy(small_disk / "cache" / "train.npy", (1 << 20,))
    assert files_in(small_disk / "cache") == []
    fill(small_disk, leave=4096)  # one page: the output folder's lock file, then not a page left

    output = small_disk / "out"
    code = main(["finetune", str(shapes), "--num-classes", "2", "--model", "vgg11", "--weights", "none",
                 "--strategy", "head", "--width", "0.0625", "--image-size", "32", "--epochs", "1", "--cache", "disk",
                 "--no-progress", "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    warned = [line for line in err.splitlines() if "Disk full" in line]
    assert [line.split(" (")[0] for line in warned] == [
        f"vggkit finetune: warning: Disk full: cannot write {output / 'feature_cache' / 'train.npy'}",
        f"vggkit finetune: warning: Disk full: cannot write {output / 'feature_cache' / 'val.npy'}",
        f"vggkit finetune: warning: Disk full: cannot write {output / 'model.pth'}"], err
    kept = Path(warned[-1].split("were written to ")[1].removesuffix(" instead."))
    assert chosen in kept.parents and vggkit.load(kept).num_classes == 2
    assert files_in(output) == []
