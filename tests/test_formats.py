"""Lightning ``.ckpt`` files and vggkit checkpoints as real safetensors load by create_model(weights=path).

A Lightning checkpoint is written in Lightning's own layout with torch.save (Lightning is not needed);
safetensors files are written by save_checkpoint and by safetensors itself.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vggkit
from vggkit.data.preprocess import CAFFE, IMAGENET
from vggkit.models.heads import attach_head
from vggkit.weights.checkpoint import WeightsError
from vggkit.weights.layouts import export_state_dict


@pytest.fixture(scope="module")
def x64():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _lightning_checkpoint(state: dict, prefix: str, path, **outside) -> None:
    """What Trainer.save_checkpoint writes for a LightningModule keeping the network in ``self.<prefix>``."""
    torch.save({
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
        "state_dict": {**{prefix + key: value for key, value in state.items()}, **outside},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
            "best_model_score": torch.tensor(0.42), "best_model_path": "/runs/epoch=3.ckpt"}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.9, "params": [0, 1]}]}],
        "lr_schedulers": [{"step_size": 30, "gamma": 0.1, "base_lrs": [0.01], "last_epoch": 4}],
        "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.01, "num_classes": 7, "arch": "vgg11"},
    }, path)


@pytest.mark.parametrize("prefix, layout", [("model.", "vggkit"), ("net.", "torchvision")])
def test_lightning_checkpoint_loads_with_its_prefix_stripped(prefix, layout, tmp_path, x64):
    model = vggkit.create_model("vgg11", width=1 / 8, num_classes=7).eval()
    # A loss with class weights lives beside the network in the LightningModule: not the network's.
    _lightning_checkpoint(export_state_dict(model, layout), prefix, tmp_path / "last.ckpt",
                          **{"criterion.weight": torch.ones(7)})
    loaded = vggkit.create_model("vgg11", weights=tmp_path / "last.ckpt", width=1 / 8).eval()
    assert loaded.num_classes == 7 and loaded.preprocess == IMAGENET  # the class count from fc8's shape
    assert loaded.weights_info["lightning"] == {"prefix": prefix, "epoch": 3, "global_step": 120,
                                                "pytorch-lightning_version": "2.4.0"}
    with torch.no_grad():
        assert torch.equal(loaded(x64), model(x64))
    assert vggkit.weights.factory.checkpoint_metadata(tmp_path / "last.ckpt")["num_classes"] == 7


def test_lightning_prefix_is_kept_unless_every_vgg_key_has_it(tmp_path):
    state = export_state_dict(vggkit.create_model("vgg11", width=1 / 8), "vggkit")
    keys = list(state)
    # Half the network under model., half at the top level: not one network under a prefix, so nothing is guessed.
    mixed = {("model." + key if i % 2 else key): value for i, (key, value) in enumerate(state.items())}
    torch.save({"state_dict": mixed, "epoch": 0, "pytorch-lightning_version": "2.4.0"}, tmp_path / "mixed.ckpt")
    with pytest.raises(WeightsError, match=rf"(?s)missing keys: {keys[1]}.*unexpected keys: model\."):
        vggkit.create_model("vgg11", weights=tmp_path / "mixed.ckpt", width=1 / 8)


@pytest.fixture
def small_model():
    """vgg11 at width 0.25 with a 3-class 'mlp' head, class names and Caffe preprocessing, in eval mode."""
    model = vggkit.create_model("vgg11", width=0.25, num_classes=3)
    attach_head(model, "mlp", 3, hidden=16, dropout=0.2)
    model.class_names = ["cat", "coffee", "rocket"]
    model.preprocess = CAFFE
    return model.eval()


def test_safetensors_checkpoint_is_real_safetensors_and_round_trips(small_model, tmp_path, x64):
    path = vggkit.save_checkpoint(small_model, tmp_path / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # written atomically, no temp left
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert json.loads(header["format"]) == "vggkit" and json.loads(header["width"]) == 0.25
    assert json.loads(header["head"]) == {"type": "mlp", "hidden": 16, "dropout": 0.2}
    assert set(load_file(path)) == set(small_model.state_dict())
    for loaded in (vggkit.create_model(weights=path).eval(), vggkit.load(path)):
        assert (loaded.name, loaded.width, loaded.num_classes) == ("vgg11", 0.25, 3)
        assert loaded.head_config["type"] == "mlp" and loaded.class_names == ["cat", "coffee", "rocket"]
        assert loaded.preprocess == CAFFE
        with torch.no_grad():
            assert torch.equal(loaded(x64), small_model(x64))


def test_safetensors_refuses_metadata_it_cannot_hold_and_keeps_the_old_file(small_model, tmp_path):
    path = vggkit.save_checkpoint(small_model, tmp_path / "model.safetensors")
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"model.safetensors: 'optimizer' \(dict\) is not plain data.*\.pth"):
        vggkit.save_checkpoint(small_model, path, optimizer={"state": {0: {"momentum_buffer": torch.zeros(2)}}})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    # Plain extra data travels as JSON too.
    vggkit.save_checkpoint(small_model, path, metrics={"accuracy": 0.75})
    assert vggkit.create_model(weights=path).weights_info["metrics"] == {"accuracy": 0.75}


@pytest.mark.parametrize("header", [None, {"format": "pt"}])  # no metadata; Hugging Face's own marker
def test_plain_safetensors_without_vggkit_metadata_still_load(header, tmp_path, x64):
    model = vggkit.create_model("vgg11", width=1 / 8, num_classes=5).eval()
    save_file(export_state_dict(model, "torchvision"), tmp_path / "plain.safetensors", metadata=header)
    loaded = vggkit.create_model("vgg11", weights=tmp_path / "plain.safetensors", width=1 / 8).eval()
    assert loaded.num_classes == 5 and loaded.preprocess == IMAGENET
    with torch.no_grad():
        assert torch.equal(loaded(x64), model(x64))


@pytest.mark.parametrize("field, text, problem", [
    ("num_classes", "three", r"is not JSON \('three'\)"),
    ("preprocess", '{"mean": [1, 2', r"is not JSON"),
    ("width", "-1", r"is -1, not a positive channel multiplier"),
    ("head", '{"type": "transformer"}', r"is \{'type': 'transformer'\}, not a head"),
    ("class_names", '["cat"]', r"holds 1 names for num_classes=3"),
])
def test_bad_safetensors_metadata_is_one_error_naming_field_and_file(field, text, problem, small_model, tmp_path):
    good = vggkit.save_checkpoint(small_model, tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as f:
        header = {**f.metadata(), field: text}
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(good), bad, metadata=header)
    for load in (lambda: vggkit.create_model(weights=bad), lambda: vggkit.load(bad)):
        with pytest.raises(WeightsError, match=rf"bad.safetensors: checkpoint field '{field}' {problem}"):
            load()
