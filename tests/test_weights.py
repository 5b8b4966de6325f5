"""Weights in every layout load and give torchvision's and timm's own outputs.

No machine here can download weights: a torchvision or timm model with random
weights is saved to a file and loaded through vggkit's public path. Identical
outputs prove that the real release loads and reproduces its published accuracy.
"""

import pickle

import pytest
import timm
import torch
import torchvision

import vggkit
from vggkit.data.preprocess import CAFFE, IMAGENET
from vggkit.weights.checkpoint import WeightsError
from vggkit.weights.releases import WeightsUnavailableError
from vggkit.weights.layouts import detect_layout, export_state_dict

TORCHVISION_NAMES = ["vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]


def _randomise_bn(model):
    """Non-trivial running statistics, so that BN layers are really compared."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model


@pytest.fixture(scope="module")
def x64():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_torchvision_file_gives_torchvision_logits(name, tmp_path, x64):
    reference = _randomise_bn(getattr(torchvision.models, name)()).eval()
    torch.save(reference.state_dict(), tmp_path / f"{name}.pth")
    model = vggkit.create_model(name, weights=tmp_path / f"{name}.pth").eval()
    with torch.no_grad():
        assert (model(x64) - reference(x64)).abs().max() <= 1e-4
    assert model.preprocess == IMAGENET
    # ... and back: our weights in torchvision's layout load strictly into torchvision.
    again = getattr(torchvision.models, name)().eval()
    again.load_state_dict(export_state_dict(model, "torchvision"), strict=True)
    with torch.no_grad():
        assert torch.equal(again(x64), reference(x64))


@pytest.mark.parametrize("name", ["vgg11", "vgg16_bn"])
def test_timm_file_gives_timm_logits_both_ways(name, tmp_path, x64):
    reference = _randomise_bn(timm.create_model(name)).eval()
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    model = vggkit.create_model(name, weights=tmp_path / "timm.pth").eval()
    assert detect_layout(torch.load(tmp_path / "timm.pth", weights_only=True)) == "timm"
    with torch.no_grad():
        assert (model(x64) - reference(x64)).abs().max() <= 1e-4
    back = timm.create_model(name).eval()
    back.load_state_dict(export_state_dict(model, "timm"), strict=True)
    with torch.no_grad():
        assert (back(x64) - reference(x64)).abs().max() <= 1e-5


def test_safetensors_and_own_checkpoint_round_trip(tmp_path, x64):
    from safetensors.torch import save_file

    model = vggkit.create_model("vgg13_bn", width=1 / 8, num_classes=5).eval()
    model.class_names = list("abcde")
    save_file(export_state_dict(model, "vggkit"), tmp_path / "w.safetensors")
    vggkit.save_checkpoint(model, tmp_path / "ckpt.pth")
    from_safetensors = vggkit.create_model("vgg13_bn", weights=tmp_path / "w.safetensors", width=1 / 8,
                                           num_classes=5).eval()
    # A vggkit checkpoint knows its class count, width and class names.
    from_checkpoint = vggkit.create_model("vgg13_bn", weights=tmp_path / "ckpt.pth").eval()
    assert from_checkpoint.class_names == list("abcde") and from_checkpoint.width == 1 / 8
    with torch.no_grad():
        assert torch.equal(from_safetensors(x64), model(x64))
        assert torch.equal(from_checkpoint(x64), model(x64))


def test_checkpoint_names_its_model_when_no_name_is_given(tmp_path, x64):
    # As the README says of train's best.pt: loadable with create_model(weights=...).
    model = vggkit.create_model("vgg11_bn", width=1 / 8, num_classes=3).eval()
    vggkit.save_checkpoint(model, tmp_path / "best.pt")
    loaded = vggkit.create_model(weights=tmp_path / "best.pt").eval()
    assert loaded.name == "vgg11_bn" and loaded.num_classes == 3 and loaded.width == 1 / 8
    with torch.no_grad():
        assert torch.equal(loaded(x64), model(x64))
    # A name that disagrees with the checkpoint is still an error naming the right one; no file, no name: vgg16.
    with pytest.raises(WeightsError, match="vgg11_bn"):
        vggkit.create_model("vgg16", weights=tmp_path / "best.pt")
    assert vggkit.create_model(width=1 / 16).name == "vgg16"


def test_ddp_module_prefix_is_stripped(tmp_path, x64):
    model = vggkit.create_model("vgg11", width=1 / 8).eval()
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ddp.pth")
    with torch.no_grad():
        assert torch.equal(vggkit.create_model("vgg11", weights=tmp_path / "ddp.pth", width=1 / 8).eval()(x64),
                           model(x64))


def test_caffe_port_file_gets_caffe_preprocessing(tmp_path):
    reference = torchvision.models.vgg16()
    path = tmp_path / "vgg16-00b39a1b.pth"  # the name of the widely used Caffe port
    torch.save(reference.state_dict(), path)
    model = vggkit.create_model("vgg16", weights=path)
    assert model.preprocess == CAFFE and model.preprocess.channel_order == "BGR"
    # Caffe input: BGR, 0-255, Caffe mean subtracted, no std.
    rgb = torch.rand(3, 4, 4)
    expected = rgb.flip(0) * 255 - torch.tensor([103.939, 116.779, 123.68]).view(3, 1, 1)
    torch.testing.assert_close(model.preprocess.normalize(rgb), expected)
    torch.testing.assert_close(model.preprocess.denormalize(expected), rgb)


def test_caffe_layer_names_layout(tmp_path, x64):
    model = vggkit.create_model("vgg16", width=1 / 8).eval()
    caffe = export_state_dict(model, "caffe")
    assert "conv5_3.weight" in caffe and "fc6.weight" in caffe
    torch.save(caffe, tmp_path / "VGG_ILSVRC_16_layers.pth")
    loaded = vggkit.create_model("vgg16", weights=tmp_path / "VGG_ILSVRC_16_layers.pth", width=1 / 8).eval()
    assert loaded.preprocess == CAFFE
    with torch.no_grad():
        assert torch.equal(loaded(x64), model(x64))


def test_wrong_config_names_keys_and_the_likely_config(tmp_path):
    torch.save(torchvision.models.vgg16().state_dict(), tmp_path / "vgg16.pth")
    with pytest.raises(WeightsError) as error:
        vggkit.create_model("vgg19", weights=tmp_path / "vgg16.pth")
    message = str(error.value)
    assert "missing keys: features.16.weight" in message and "unexpected keys" in message
    assert "looks like 'vgg16', num_classes=1000" in message


def test_wrong_class_count_is_an_error_naming_the_count(tmp_path):
    torch.save(torchvision.models.vgg11(num_classes=10).state_dict(), tmp_path / "ten.pth")
    with pytest.raises(WeightsError, match=r"classifier\.6\.weight: file \(10, 4096\) vs model \(3, 4096\)"
                                           r"(.|\n)*num_classes=10"):
        vggkit.create_model("vgg11", weights=tmp_path / "ten.pth", num_classes=3)
    # Without num_classes the file's own count is used.
    assert vggkit.create_model("vgg11", weights=tmp_path / "ten.pth").num_classes == 10


def test_batch_norm_file_into_plain_model_suggests_bn(tmp_path):
    torch.save(torchvision.models.vgg11_bn().state_dict(), tmp_path / "bn.pth")
    with pytest.raises(WeightsError, match="looks like 'vgg11_bn'"):
        vggkit.create_model("vgg11", weights=tmp_path / "bn.pth")


def test_non_weight_files_are_clear_errors(tmp_path):
    (tmp_path / "notes.pth").write_text("these are not weights")
    with pytest.raises(WeightsError, match="notes.pth is not a PyTorch weight file"):
        vggkit.create_model("vgg11", weights=tmp_path / "notes.pth")
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="Not a VGG state dict"):
        vggkit.create_model("vgg11", weights=tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="Weight file not found"):
        vggkit.create_model("vgg11", weights=tmp_path / "missing.pth")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photo.pth", "JPEG")
    with pytest.raises(WeightsError, match=r"photo.pth is not a PyTorch weight file \(a JPEG image\)"):
        vggkit.create_model("vgg11", weights=tmp_path / "photo.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match="not a valid .safetensors"):
        vggkit.create_model("vgg11", weights=tmp_path / "bad.safetensors")


class Payload:
    """Arbitrary code in a pickle: what weights_only=True exists to refuse."""

    def __reduce__(self):
        return (print, ("this would have run",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "extra": Payload()}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(WeightsError, match="refuses to unpickle"):
        vggkit.create_model("vgg11", weights=path)


def test_offline_imagenet_names_file_cache_and_url(offline_hub):
    with pytest.raises(WeightsUnavailableError) as error:
        vggkit.create_model("vgg16", weights="imagenet", progress=False)
    message = str(error.value)
    assert "vgg16-397923af.pth" in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert str(offline_hub / "vgg16-397923af.pth") in message
    assert "Traceback" not in message and len(message.splitlines()) <= 5


def test_imagenet_file_placed_in_the_hub_cache_is_used_offline(offline_hub, x64):
    # Where the offline error message says to put the file, the release loads with no network.
    reference = torchvision.models.vgg11().eval()
    offline_hub.mkdir(parents=True)
    torch.save(reference.state_dict(), offline_hub / "vgg11-8a719046.pth")
    model = vggkit.create_model("vgg11", weights="imagenet", progress=False).eval()
    assert model.weights_info["acc@1"] == pytest.approx(69.02)  # torchvision's published figure
    with torch.no_grad():
        assert torch.equal(model(x64), reference(x64))
    two_way = vggkit.create_model("vgg11", weights="imagenet", num_classes=2, progress=False)
    assert two_way.classifier.fc8.out_features == 2
    assert torch.equal(two_way.classifier.fc7.weight, reference.classifier[3].weight)


def test_no_published_release_for_lrn_or_c():
    with pytest.raises(WeightsError, match="no published ImageNet release for vgg16c"):
        vggkit.create_model("C", weights="imagenet")


def test_offline_timm_is_a_clear_error():
    with pytest.raises(WeightsUnavailableError, match="vgg11.tv_in1k"):
        vggkit.create_model("vgg11", weights="timm")


def test_width_zero_is_refused_not_ignored():
    with pytest.raises(ValueError, match="width=0: must be a channel multiplier"):
        vggkit.create_model("vgg11", width=0)


def test_unknown_weights_word():
    with pytest.raises(ValueError, match="Unknown weights 'imagenet21k'"):
        vggkit.create_model("vgg11", weights="imagenet21k")
