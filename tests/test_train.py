"""ImageNet training on tiny generated data: learning, exact resume, DDP equivalence, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vggkit
from vggkit.cli import main
from vggkit.data.transforms import TrainTransform
from vggkit.training.recipe import Recipe, list_recipes
from vggkit.training.loop import PRE_INIT_LAYERS, init_from, plateau_scheduler, split_batch, train
from vggkit.training.step import NonFiniteLossError
from vggkit.data.pipeline import EncodedImages, EpochSampler, GpuAugment, ShardSampler, collate_encoded
from vggkit.weights.factory import save_checkpoint

CLASSES = ("n00000001", "n00000002", "n00000003")
# 3 classes x 8 train images, 3 x 3 val (an odd count: padding would be double counted on 2 ranks).
TINY = ["model.num_classes=3", "model.width=0.0625", "data.crop=32", "data.scale=36", "data.val_scale=36",
        "data.workers=0", "optim.batch_size=8", "schedule.epochs=2", "run.precision='fp32'", "run.device='cpu'"]


def write_split(root: Path, per_class: int, seed: int, classes=CLASSES) -> None:
    """Images of 40 px whose dominant colour channel is the class."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (40, 40, 3))
            pixels[..., label % 3] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img_{i}.JPEG", format="JPEG", quality=95)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    write_split(root / "train", 8, seed=1)
    write_split(root / "val", 3, seed=2)
    return root


def weights_of(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_a_few_steps_reduce_the_loss_and_write_the_run(imagenet, tmp_path):
    # Glorot init (the paper's note) learns fastest at this size: 2 epochs of 6 steps.
    overrides = TINY + ["model.width=0.125", "init.method=glorot", "model.dropout=0", "optim.lr=0.05",
                        "optim.batch_size=4"]
    result = train("A", imagenet, tmp_path / "run", overrides=overrides, progress=False)
    losses = [row["train_loss"] for row in result.history]
    assert result.completed and len(losses) == 2
    assert losses[-1] < losses[0] - 0.2 and result.history[-1]["val_loss"] < 0.9 < np.log(3), result.history
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "val_loss", "val_top1_error", "val_top5_error", "lr", "images_per_s"):
        assert all(np.isfinite(r[key]) for r in rows), key
    # Three classes: top-5 always holds the label; no gap to Table 3's ImageNet errors (not comparable).
    assert rows[0]["val_top5_error"] == 0.0 and "top1_gap" not in rows[0]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert Recipe.load(tmp_path / "run" / "recipe.toml") == Recipe.load("A", overrides)
    best = vggkit.create_model("A", weights=tmp_path / "run" / "best.pt")
    assert best.num_classes == 3 and best.width == 0.125 and best.class_names == list(CLASSES)


def test_run_killed_mid_epoch_resumes_bit_exact(imagenet, tmp_path):
    # Dropout on, gradient accumulation on, 2 epochs of 3 steps: everything that draws random numbers.
    overrides = TINY + ["run.max_batch_per_gpu=4"]
    whole = train("A", imagenet, tmp_path / "whole", overrides=overrides, progress=False)
    stopped = train("A", imagenet, tmp_path / "split", overrides=overrides + ["data.workers=2"],
                    stop_after_steps=4, progress=False)
    state = torch.load(tmp_path / "split" / "last.pt", map_location="cpu", weights_only=True)
    assert not stopped.completed and (state["epoch"], state["step"], state["global_step"]) == (1, 1, 4)
    resumed = train(None, imagenet, tmp_path / "split", resume=True, progress=False)
    assert resumed.completed
    a, b = weights_of(tmp_path / "whole" / "last.pt"), weights_of(tmp_path / "split" / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    assert stopped.step_losses + resumed.step_losses == whole.step_losses and len(whole.step_losses) == 6
    assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 2


def test_sync_free_steps_give_the_same_losses_and_weights(imagenet, tmp_path, capsys):
    # loss_every=1 reads the loss back after every step (a host synchronisation each); 4 lets the
    # device run ahead. The arithmetic must not change: bit-identical losses and weights.
    overrides = TINY + ["run.max_batch_per_gpu=4"]
    synced = train("A", imagenet, tmp_path / "synced", overrides=overrides + ["run.loss_every=1"], progress=False)
    free = train("A", imagenet, tmp_path / "free", overrides=overrides + ["run.loss_every=4"], progress=False)
    assert len(free.step_losses) == 6 and free.step_losses == synced.step_losses
    assert all(np.isfinite(free.step_losses))
    a, b = weights_of(tmp_path / "synced" / "last.pt"), weights_of(tmp_path / "free" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # 3 steps per epoch: the first is warm-up, timed apart; images/s counts the other two.
    for row in free.history:
        assert row["warmup_steps"] == 1 and 0 < row["warmup_seconds"] < row["seconds"]
        assert row["images_per_s"] > 0 and row["images_per_s_with_warmup"] > 0
    assert "images/s (steady; the first 1 steps took" in capsys.readouterr().err


def test_torchrun_two_processes_equal_one_process(imagenet, tmp_path):
    overrides = TINY + ["model.dropout=0", "schedule.epochs=1"]
    single = train("A", imagenet, tmp_path / "single", overrides=overrides, progress=False)
    # 2 processes x 2 accumulation steps x micro-batch 2 = the same global batch of 8.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "vggkit.cli", "train", "--recipe", "A", "--data", str(imagenet), "--output",
               str(tmp_path / "ddp"), "--max-batch-per-gpu", "2", "--no-progress"]
    command += [arg for item in overrides for arg in ("--set", item)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stderr and "batch 8 = 2 x 2 x 2" in done.stderr
    a, b = weights_of(tmp_path / "single" / "last.pt"), weights_of(tmp_path / "ddp" / "last.pt")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    ddp_row = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[0])
    # Validation over 9 images sharded 5 + 4: each counted once, so the errors are the single process's.
    for key in ("val_top1_error", "val_top5_error", "val_loss", "train_loss"):
        assert ddp_row[key] == pytest.approx(single.history[0][key], abs=1e-5)


@pytest.mark.parametrize("checkpoint_every", [1, 0])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(imagenet, tmp_path, monkeypatch,
                                                                   checkpoint_every):
    calls, cross_entropy = [], torch.nn.functional.cross_entropy

    def poisoned(logits, labels, **kwargs):
        calls.append(1)
        loss = cross_entropy(logits, labels, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    overrides = TINY + [f"run.checkpoint_every={checkpoint_every}"]
    if not checkpoint_every:  # read back at the epoch's end only: still before any checkpoint
        with pytest.raises(NonFiniteLossError, match=r"Loss is nan at epoch 1, step 3.*No checkpoint was written"):
            train("A", imagenet, tmp_path / "run", overrides=overrides, progress=False)
        assert not (tmp_path / "run" / "last.pt").exists()
        return
    with pytest.raises(NonFiniteLossError, match=r"Loss is nan at epoch 1, step 3.*last good checkpoint is .*last\.pt"):
        train("A", imagenet, tmp_path / "run", overrides=overrides, progress=False)
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())


@pytest.mark.parametrize("name", ["B", "C", "D", "E"])
def test_init_from_copies_exactly_the_papers_layers(name, tmp_path):
    net_a = vggkit.create_model("A", width=0.0625, num_classes=10, init="paper")
    save_checkpoint(net_a, tmp_path / "a.pt")
    deep = vggkit.create_model(name, width=0.0625, num_classes=10, init="glorot")
    before = {k: v.clone() for k, v in deep.state_dict().items()}
    init_from(tmp_path / "a.pt", deep)
    source = net_a.state_dict()
    copied = set()
    for key, value in deep.state_dict().items():
        layer = key.split(".")[1]
        if layer in PRE_INIT_LAYERS:
            assert torch.equal(value, source[key]), key
            copied.add(layer)
        else:
            assert torch.equal(value, before[key]), key
    assert copied == set(PRE_INIT_LAYERS)


def test_init_from_refuses_what_does_not_fit():
    deep = vggkit.create_model("D", width=0.0625, num_classes=10)
    with pytest.raises(ValueError, match=r"conv1_1\.weight of net A is \(8, 3, 3, 3\) but \(4, 3, 3, 3\)"):
        init_from(vggkit.create_model("A", width=0.125, num_classes=10), deep)
    with pytest.raises(ValueError, match="expects a trained net A .* got config B"):
        init_from(vggkit.create_model("B", width=0.0625, num_classes=10), deep)


def test_epoch_sampler_global_batches_match_one_process():
    batch, size = 8, 30
    single = EpochSampler(size, 1, 0, seed=3, length=24)
    ranks = [EpochSampler(size, 2, r, seed=3, length=12) for r in range(2)]
    for sampler in (single, *ranks):
        sampler.set_epoch(5)
    order = [i for i, _ in single]
    shards = [[i for i, _ in r] for r in ranks]
    for k in range(3):
        together = shards[0][4 * k:4 * k + 4] + shards[1][4 * k:4 * k + 4]
        assert sorted(together) == sorted(order[batch * k:batch * k + batch])
    single.set_epoch(5, start=16)
    assert [key for key in single] == [(i, 5) for i in order[16:]]
    single.set_epoch(6)
    assert [i for i, _ in single] != order


def test_shard_sampler_covers_every_sample_once():
    shards = [list(ShardSampler(9, 4, r)) for r in range(4)]
    assert sorted(sum(shards, [])) == list(range(9))


def test_gpu_decode_path_matches_the_cpu_transform(imagenet):
    samples = [(str(p), 0) for p in sorted((imagenet / "train" / CLASSES[0]).iterdir())[:3]]
    Image.open(samples[0][0]).save(imagenet.parent / "as.png")  # a non-JPEG goes through PIL
    samples.append((str(imagenet.parent / "as.png"), 1))
    dataset = EncodedImages(samples, seed=0)
    batch = collate_encoded([dataset[(i, 0)] for i in range(len(samples))])
    data, labels, seeds, paths = batch
    assert [d.dim() for d in data] == [1, 1, 1, 3] and labels.tolist() == [0, 0, 0, 1]
    # Scale = crop = image side, no flip or colour shift: both paths must give the normalised image.
    exact = TrainTransform(scale=40, crop=40, flip=False, pca_std=0)
    on_device, same_labels = GpuAugment(exact, "cpu")(*batch)
    reference = torch.stack([exact(vggkit.data.images.load_image(path)) for path, _ in samples])
    assert on_device.shape == (4, 3, 40, 40) and torch.equal(same_labels, labels)
    torch.testing.assert_close(on_device, reference, atol=1e-5, rtol=0)
    jitter = GpuAugment(TrainTransform(scale=(36, 60), crop=32), "cpu")
    (first, _), (again, _) = jitter(*batch), jitter(*batch)
    assert first.shape == (4, 3, 32, 32) and torch.equal(first, again)


def test_gpu_decode_replaces_a_corrupt_jpeg_with_its_label(imagenet, tmp_path):
    good = sorted((imagenet / "train" / CLASSES[1]).iterdir())[0]
    corrupt = tmp_path / "corrupt.JPEG"
    corrupt.write_bytes(good.read_bytes()[:300])  # a JPEG header, then nothing
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in (corrupt, good)]
    augment = GpuAugment(TrainTransform(scale=36, crop=32), "cpu")
    with pytest.warns(UserWarning, match=r"Skipping unreadable image .*corrupt\.JPEG"):
        images, labels = augment(data, torch.tensor([0, 1]), torch.tensor([5, 6]), [str(corrupt), str(good)])
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [1, 1] and torch.equal(images[0], images[1])


def test_gpu_decode_option_trains(imagenet, tmp_path):
    result = train("A", imagenet, tmp_path / "run", overrides=TINY + ["data.gpu_decode=true", "schedule.max_steps=2"],
                   progress=False)
    assert result.completed and len(result.history) == 1 and result.history[0]["step"] == 2


def test_split_batch():
    assert split_batch(256, 8) == (32, 32, 1)
    assert split_batch(256, 8, 8) == (32, 8, 4)
    assert split_batch(256, 1, 64) == (256, 64, 4)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        split_batch(256, 3)
    with pytest.raises(ValueError, match="per-process batch 32 is not a multiple of run.max_batch_per_gpu=12"):
        split_batch(256, 8, 12)


# --------------------------------------------------------------------------- bad input


def test_missing_data_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="Data folder not found"):
        train("A", tmp_path / "nowhere", tmp_path / "run", overrides=TINY)
    (tmp_path / "data" / "train" / "n1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"data/val not found\. Expected the ImageFolder layout"):
        train("A", tmp_path / "data", tmp_path / "run", overrides=TINY)


def test_val_classes_must_equal_train_classes(imagenet, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train").symlink_to(imagenet / "train")
    write_split(tmp_path / "data" / "val", 1, seed=3, classes=CLASSES[:2] + ("n09999999",))
    with pytest.raises(ValueError, match=r"only in val: \['n09999999'\], only in train: \['n00000003'\]"):
        train("A", tmp_path / "data", tmp_path / "run", overrides=TINY)


def test_unwritable_output_folder(imagenet, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"Cannot write to the output folder .*file/run"):
        train("A", imagenet, tmp_path / "file" / "run", overrides=TINY)


def test_class_count_mismatch_and_existing_run(imagenet, tmp_path):
    with pytest.raises(ValueError, match=r"holds 3 classes but .* model\.num_classes is 1000; pass --set"):
        train("A", imagenet, tmp_path / "run", overrides=TINY + ["model.num_classes=1000"])
    with pytest.raises(FileNotFoundError, match="Nothing to resume"):
        train(None, imagenet, tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="Give a recipe"):
        train(None, imagenet, tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"already holds a run \(last\.pt\)\. Pass --resume"):
        train("A", imagenet, tmp_path / "run", overrides=TINY)


def test_missing_net_a_checkpoint_names_the_key(imagenet, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"init\.from_a: checkpoint runs/imagenet/A/best\.pt not found"):
        train("D-256", imagenet, tmp_path / "run", overrides=TINY)


def test_corrupt_training_image_is_skipped_with_a_warning(imagenet, tmp_path):
    data = tmp_path / "data"
    write_split(data / "train", 8, seed=1)
    (data / "val").symlink_to(imagenet / "val")
    # A valid header with the pixel data cut off: the scan's header check passes it, decoding fails.
    bad = data / "train" / CLASSES[0] / "img_3.JPEG"
    whole = bad.read_bytes()
    bad.write_bytes(whole[: whole.index(b"\xff\xda") + 40])  # 40 bytes past the start of scan
    with pytest.warns(UserWarning, match=r"Skipping unreadable image .*img_3\.JPEG"):
        result = train("A", data, tmp_path / "run", overrides=TINY + ["schedule.epochs=1"], progress=False)
    assert result.completed


def test_cli_reports_bad_input_and_lists_recipes(tmp_path, capsys):
    assert main(["train", "--recipe", "A", "--data", str(tmp_path / "none"), "--output", str(tmp_path / "r")]) == 2
    assert "vggkit train: error: Data folder not found" in capsys.readouterr().err
    assert main(["train", "--list-recipes"]) == 0
    assert capsys.readouterr().out.split() == list_recipes() and len(list_recipes()) == 12


def test_plateau_schedule_drops_the_lr_at_most_three_times():
    recipe = Recipe.load("A", ["schedule.patience=2"])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recipe.optim.lr)
    scheduler = plateau_scheduler(optimizer, recipe)
    lrs = []
    for accuracy in [10, 20, 30] + [30.05] * 30:  # +0.05 pp is below the 0.1 pp threshold: a plateau
        scheduler.step(accuracy)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:3] == [0.01] * 3
    drops = [i for i in range(1, len(lrs)) if lrs[i] < lrs[i - 1]]
    assert drops == [5, 8, 11]  # after patience + 1 epochs without improvement, three times, then never
    assert lrs[-1] == pytest.approx(1e-5)


def test_bf16_autocast_path_trains_on_cpu(imagenet, tmp_path):
    result = train("A", imagenet, tmp_path / "run", progress=False,
                   overrides=TINY + ["run.precision='bf16'", "run.channels_last=false", "schedule.max_steps=1"])
    assert result.completed and np.isfinite(result.history[0]["train_loss"])
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast: fp32 master weights


def test_pipeline_throughput_measures_the_training_transform(imagenet):
    from vggkit.data.pipeline import pipeline_images_per_second

    samples = [(str(p), 0) for p in sorted((imagenet / "train" / CLASSES[0]).iterdir())]
    assert pipeline_images_per_second(samples, scale=(36, 48), crop=32, count=10) > 0
    with pytest.raises(ValueError, match="at least one"):
        pipeline_images_per_second([])
    with pytest.raises(ValueError, match="smaller than the 224 px crop"):
        pipeline_images_per_second(samples, scale=200)


def test_recipes_initialise_from_their_predecessors(tmp_path):
    from vggkit.training.loop import build_model

    tiny = ["model.num_classes=3", "model.width=0.0625"]
    net_a = vggkit.create_model("A", num_classes=3, width=0.0625, init="paper")
    save_checkpoint(net_a, tmp_path / "a.pt")
    net_b = build_model(Recipe.load("B", tiny + [f"init.from_a='{tmp_path / 'a.pt'}'"]))
    assert torch.equal(net_b.features.conv3_2.weight, net_a.features.conv3_2.weight)
    assert torch.equal(net_b.classifier.fc8.weight, net_a.classifier.fc8.weight)
    net_d = vggkit.create_model("D", num_classes=3, width=0.0625)
    save_checkpoint(net_d, tmp_path / "d256.pt")
    net_d384 = build_model(Recipe.load("D-384", tiny + [f"init.weights='{tmp_path / 'd256.pt'}'"]))
    assert all(torch.equal(a, b) for a, b in zip(net_d384.state_dict().values(), net_d.state_dict().values()))


def test_compile_auto_compiles_long_cuda_runs_only():
    from vggkit.training.loop import compile_step

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    paper = Recipe.load("D-256")  # 74 epochs of ImageNet: hours
    assert paper.run.compile == "auto" and compile_step(paper, cuda, steps_per_epoch=5004)
    assert not compile_step(paper, cpu, steps_per_epoch=5004)  # eager on CPUs
    assert not compile_step(Recipe.load("D-256", ["schedule.max_steps=20"]), cuda, steps_per_epoch=5004)
    assert compile_step(Recipe.load("D-256", ["run.compile=true"]), cpu, 1)
    assert not compile_step(Recipe.load("D-256", ["run.compile=false"]), cuda, 5004)
    with pytest.raises(ValueError, match=r"run\.compile: 'yes' is not true, false or \"auto\""):
        Recipe.load("A", ["run.compile='yes'"])
    with pytest.raises(ValueError, match=r"run\.loss_every: must be positive"):
        Recipe.load("A", ["run.loss_every=0"])
