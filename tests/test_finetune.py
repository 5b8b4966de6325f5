"""Fine-tuning: accuracy from scratch on generated and real images, heads, strategies,
the feature cache, checkpoints that reload and predict exactly, and the CLI."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from image_folders import make_photo_crops, make_stripes

import vggkit
from vggkit.cli import main
from vggkit.data.folders import prepare_splits, stratified_split
from vggkit.models.heads import attach_head, block_starts, freeze, frozen_prefix, parameter_groups
from vggkit.evaluation.predict import predict_proba

SMALL = dict(weights=None, width=1 / 16, image_size=64, batch_size=16, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_photo_crops(tmp_path_factory.mktemp("photos"), per_class=40)


@pytest.fixture(scope="module")
def stripes(tmp_path_factory) -> Path:
    return make_stripes(tmp_path_factory.mktemp("stripes"), per_class=60)


@pytest.fixture(scope="module")
def photo_run(photos, tmp_path_factory):
    """vgg11_bn trained end to end from random weights on crops of two scikit-image photographs."""
    torch.manual_seed(0)
    return vggkit.finetune(photos, num_classes=2, model="vgg11_bn", strategy="full", optimizer="adamw", lr=1e-3,
                           backbone_lr_scale=1.0, epochs=8, patience=3, output_dir=tmp_path_factory.mktemp("run"),
                           **SMALL)


def test_full_finetune_from_scratch_on_photo_crops_reaches_95_percent(photo_run):
    assert photo_run.metrics["split"] == "val"
    assert photo_run.metrics["accuracy"] >= 0.95
    assert max(row["val_acc"] for row in photo_run.history) == photo_run.metrics["accuracy"]
    assert photo_run.class_names == ["chelsea", "coffee"] == photo_run.model.class_names
    assert next(photo_run.model.parameters()).dtype == torch.float32


def test_full_finetune_from_scratch_on_rendered_stripes_reaches_95_percent(stripes, tmp_path):
    result = vggkit.finetune(stripes, 2, model="vgg11_bn", head="linear", strategy="full", optimizer="adamw",
                             lr=1e-3, backbone_lr_scale=1.0, epochs=10, patience=4, output_dir=tmp_path, **SMALL)
    assert result.metrics["accuracy"] >= 0.95
    # A 60/class folder split 80/20 per class: 12 validation images of each class.
    assert result.metrics["support"] == {"horizontal": 12, "vertical": 12}
    matrix = np.array(result.metrics["confusion_matrix"])
    assert matrix.sum() == 24 and np.trace(matrix) / 24 == result.metrics["accuracy"]
    # The linear head's checkpoint rebuilds through vggkit.load and predicts what the model predicts.
    images = sorted(str(p) for p in (stripes / "vertical").glob("*.png"))[:6]
    assert torch.equal(predict_proba(result.model, images), predict_proba(vggkit.load(result.checkpoint), images))


def test_result_history_checkpoint_and_plots(photo_run):
    rows = photo_run.history
    assert [row["epoch"] for row in rows] == list(range(1, len(rows) + 1))
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"} <= set(rows[0])
    assert all(row["seconds"] > 0 for row in rows)
    for path in photo_run.plots.values():
        assert path.parent == photo_run.checkpoint.parent and path.stat().st_size > 1000
    saved = torch.load(photo_run.checkpoint, weights_only=True)
    assert saved["format"] == "vggkit" and saved["class_names"] == ["chelsea", "coffee"]
    assert saved["head"] == {"type": "vgg"} and saved["model_name"] == "vgg11_bn"
    assert saved["preprocess"]["input_size"] == 64 and saved["finetune"]["strategy"] == "full"
    assert saved["history"] == rows
    assert not list(photo_run.checkpoint.parent.glob(".*tmp*"))  # written atomically


def test_reloaded_checkpoint_predicts_exactly_what_the_model_predicts(photo_run, photos):
    images = sorted(str(p) for p in photos.rglob("*.jpg"))[::7]
    reloaded = vggkit.load(photo_run.checkpoint)
    assert reloaded.class_names == photo_run.model.class_names
    assert reloaded.preprocess == photo_run.model.preprocess
    assert torch.equal(predict_proba(photo_run.model, images), predict_proba(reloaded, images))
    in_memory = vggkit.predict(photo_run.model, images, top_k=2)
    assert vggkit.predict(photo_run.checkpoint, images, top_k=2) == in_memory
    assert all(abs(sum(p for _, p in top) - 1) < 1e-5 for top in in_memory)
    truth = [Path(image).parent.name for image in images]
    assert np.mean([top[0][0] == t for top, t in zip(in_memory, truth)]) >= 0.9


def test_cli_predict_prints_top_k_names_with_probabilities(photo_run, photos, capsys):
    images = [str(photos / "chelsea" / "chelsea_000.jpg"), str(photos / "coffee" / "coffee_000.jpg")]
    assert main(["predict", str(photo_run.checkpoint), *images, "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = vggkit.predict(photo_run.checkpoint, images, top_k=2)
    assert lines[0] == images[0] and lines[3] == images[1]
    for line, (name, probability) in zip(lines[1:3] + lines[4:6], expected[0] + expected[1]):
        assert line.split() == [f"{probability:.4f}", name]


def test_cached_and_recomputed_head_training_agree(photo_run, stripes, tmp_path):
    """Head-only transfer from the photo model to stripes: the cache changes the cost, not the result."""
    options = dict(SMALL, weights=photo_run.checkpoint, model="vgg11_bn", strategy="head", optimizer="adamw",
                   epochs=3, patience=10, seed=3)
    recomputed = vggkit.finetune(stripes, 2, cache_features=False, output_dir=tmp_path / "plain", **options)
    assert recomputed.cache_storage is None
    for storage in ("memory", "disk"):
        cached = vggkit.finetune(stripes, 2, cache_features=storage, output_dir=tmp_path / storage, **options)
        assert cached.cache_storage == storage
        assert [r["val_acc"] for r in cached.history] == [r["val_acc"] for r in recomputed.history]
        np.testing.assert_allclose([r["train_loss"] for r in cached.history],
                                   [r["train_loss"] for r in recomputed.history], rtol=1e-4)
        assert cached.metrics["accuracy"] == recomputed.metrics["accuracy"] > 0.6
    assert not (tmp_path / "disk" / "feature_cache" / "train.npy").exists()  # a disk cache is removed
    # The frozen backbone is exactly the photo model's.
    source = vggkit.load(photo_run.checkpoint)
    assert torch.equal(cached.model.features.conv1_1.weight.cpu(), source.features.conv1_1.weight)


def test_partial_strategy_trains_only_the_last_blocks(photo_run, photos, tmp_path):
    result = vggkit.finetune(photos, 2, **dict(SMALL, weights=photo_run.checkpoint), model="vgg11_bn",
                             strategy="partial", unfreeze_blocks=1, epochs=1, lr=0.05, output_dir=tmp_path)
    before, after = vggkit.load(photo_run.checkpoint).state_dict(), result.model.cpu().state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        trains = key.startswith(("features.conv5", "features.bn5", "classifier.fc6", "classifier.fc7"))
        if key.endswith("num_batches_tracked") or key.startswith("classifier.fc8"):
            continue
        assert changed == trains, key


def test_heads_strategies_and_parameter_groups():
    model = vggkit.create_model("vgg16", width=1 / 16, num_classes=1000)
    fc7 = model.classifier.fc7.weight.clone()
    attach_head(model, "vgg", 3)
    assert torch.equal(model.classifier.fc7.weight, fc7) and model.classifier.fc8.out_features == 3
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    for head, names in (("linear", ["drop", "fc8"]), ("mlp", ["fc_hidden", "relu_hidden", "drop", "fc8"])):
        attach_head(model, head, 5, hidden=24)
        assert [n for n, _ in model.classifier.named_children()] == names
        assert model(torch.zeros(2, 3, 40, 72)).shape == (2, 5)
    assert block_starts(model) == [0, 5, 10, 17, 24]  # vgg16: conv, relu pairs and a pool per block
    assert frozen_prefix(model, "head") == len(model.features) and frozen_prefix(model, "full") == 0
    assert frozen_prefix(model, "partial", unfreeze_blocks=2) == 17
    freeze(model, 17)
    assert not model.features.conv3_3.weight.requires_grad
    assert model.features.conv4_1.weight.requires_grad and model.features.conv5_3.weight.requires_grad
    groups = parameter_groups(model, 17, lr=0.1, backbone_lr_scale=0.1)
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 0.1), ("backbone", pytest.approx(0.01))]
    assert sum(p.numel() for p in groups[1]["params"]) == sum(
        p.numel() for n, p in model.features.named_parameters() if n.startswith(("conv4", "conv5")))
    with pytest.raises(ValueError, match="unfreeze_blocks must be 1..5"):
        frozen_prefix(model, "partial", unfreeze_blocks=6)
    with pytest.raises(ValueError, match="Unknown head 'resnet'"):
        attach_head(model, "resnet", 2)


def test_split_is_stratified_and_fixed_by_seed():
    samples = [(f"a{i}", 0) for i in range(10)] + [(f"b{i}", 1) for i in range(5)] + [("c0", 2)]
    train, val = stratified_split(samples, 3, 0.2, seed=0)
    assert sorted(train + val) == sorted(samples)
    assert [sum(1 for _, y in val if y == c) for c in range(3)] == [2, 1, 0]
    assert stratified_split(samples, 3, 0.2, seed=0) == (train, val) != stratified_split(samples, 3, 0.2, seed=1)


def test_train_val_test_folders_and_class_mismatch(photos, tmp_path):
    root = tmp_path / "data"
    for split, picks in (("train", slice(0, 20)), ("val", slice(20, 30)), ("test", slice(30, 40))):
        for name in ("chelsea", "coffee"):
            (root / split / name).mkdir(parents=True)
            for path in sorted((photos / name).glob("*.jpg"))[picks]:
                (root / split / name / path.name).symlink_to(path)
    splits = prepare_splits(root, 2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 20, 20)
    with pytest.raises(ValueError, match=r"num_classes=3, but .* holds 2 class folder\(s\): chelsea, coffee"):
        prepare_splits(root, 3)
    (root / "val" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) \['dog'\] that .* lacks"):
        prepare_splits(root, 2)


def test_default_imagenet_weights_fail_offline_with_the_clear_message(photos, tmp_path, offline_hub):
    with pytest.raises(vggkit.WeightsUnavailableError, match=r"Could not download vgg16-397923af\.pth"):
        vggkit.finetune(photos, 2, output_dir=tmp_path, progress=False)


def test_cli_finetune(photos, tmp_path, capsys):
    code = main(["finetune", str(photos), "--num-classes", "2", "--weights", "none", "--model", "vgg11",
                 "--width", "0.0625", "--image-size", "32", "--epochs", "1", "--output", str(tmp_path),
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and f"checkpoint: {tmp_path / 'model.pth'}" in out and "val accuracy" in out
    assert main(["finetune", str(photos), "--num-classes", "5", "--weights", "none"]) == 2
    assert "holds 2 class folder(s): chelsea, coffee" in capsys.readouterr().err


def test_load_refuses_a_plain_state_dict_with_the_fix(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(vggkit.create_model("vgg11", width=1 / 16).state_dict(), path)
    with pytest.raises(ValueError, match=r"plain state dict, not a vggkit checkpoint.*create_model\('vgg16', weights="):
        vggkit.load(path)


def test_unusable_output_and_weights_are_errors_before_training(photos, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(importlib.import_module("vggkit.finetuning.finetune"), "build_model", no_training)
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    with pytest.raises(ValueError, match=r"The output folder .*file\.txt is a file; choose a folder"):
        vggkit.finetune(photos, 2, output_dir=not_a_folder, **SMALL)
    with pytest.raises(ValueError, match=r"Cannot write to the output folder .*; choose a writable folder"):
        vggkit.finetune(photos, 2, output_dir=not_a_folder / "run", **SMALL)


def test_misspelt_weights_and_files_that_are_not_checkpoints(photos, tmp_path, capsys):
    options = dict(SMALL, weights="imagnet")
    with pytest.raises(ValueError, match=r"Unknown weights 'imagnet'\. Did you mean 'imagenet'\?"):
        vggkit.finetune(photos, 2, output_dir=tmp_path, **options)
    image = next((photos / "chelsea").iterdir())
    with pytest.raises(ValueError, match=r"\.jpg is not a PyTorch weight file \(a JPEG image\)"):
        vggkit.finetune(photos, 2, output_dir=tmp_path, **dict(SMALL, weights=str(image)))
    assert main(["finetune", str(photos), "--weights", str(tmp_path / "missing.pth"), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"vggkit finetune: error: Weight file not found: {tmp_path / 'missing.pth'}"


def test_cli_predict_reads_folders_and_rejects_what_is_not_a_checkpoint(photo_run, photos, tmp_path, capsys):
    assert main(["predict", str(photo_run.checkpoint), str(photos / "coffee"), "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count(str(photos / "coffee")) == len(list((photos / "coffee").iterdir()))
    image = str(next((photos / "chelsea").iterdir()))
    for checkpoint, message in [(tmp_path / "missing.pth", "Checkpoint not found: "),
                                ("vgg16", "Checkpoint not found: vgg16 (a file such as the model.pth"),
                                (image, "is not a PyTorch weight file (a JPEG image)"),
                                (photos, "is a folder; give the checkpoint file")]:
        assert main(["predict", str(checkpoint), image]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vggkit predict: error: ") and message in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["predict", str(photo_run.checkpoint), image, "-k", "0"])
    assert "--top-k: 0: must be at least 1" in capsys.readouterr().err
