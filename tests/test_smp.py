"""vggkit's VGG as a segmentation_models_pytorch encoder: equal to smp's own VGG encoder on the same weights."""

import subprocess
import sys

import pytest
import torch

smp = pytest.importorskip("segmentation_models_pytorch")

import vggkit  # noqa: E402
from vggkit.models import smp_encoder  # noqa: E402

TINY = 1 / 16


@pytest.fixture(scope="module")
def names():
    return smp_encoder.register() + smp_encoder.register(prefix="vggkit16th_", width=TINY)


def _unets(name: str, **kwargs):
    """smp's Unet on its own VGG encoder and on vggkit's, with the same (random vggkit) weights."""
    vgg = vggkit.create_model(name, seed=0)
    theirs = smp.Unet(name, encoder_weights=None, **kwargs).eval()
    theirs.encoder.load_state_dict(vggkit.export_state_dict(vgg, "torchvision"))  # smp drops the classifier keys
    ours = smp.Unet("vggkit_" + name, encoder_weights=None, **kwargs).eval()
    ours.encoder.load_vgg(vgg)
    state = theirs.state_dict()
    missing, unexpected = ours.load_state_dict({k: v for k, v in state.items() if not k.startswith("encoder.")},
                                               strict=False)
    assert all(k.startswith("encoder.") for k in missing) and not unexpected  # decoder and head copied whole
    return ours, theirs


@pytest.mark.parametrize("name, kwargs", [("vgg16", {"classes": 2}),
                                          ("vgg11_bn", {"classes": 3, "encoder_depth": 3,
                                                        "decoder_channels": (64, 32, 16)})])
def test_unet_equals_smps_vgg_unet(names, name, kwargs):
    ours, theirs = _unets(name, **kwargs)
    assert ours.encoder.out_channels == theirs.encoder.out_channels
    assert type(ours.decoder.center) is type(theirs.decoder.center) is not torch.nn.Identity  # the VGG centre block
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = ours.encoder(x), theirs.encoder(x)
        assert len(got) == len(want) == kwargs.get("encoder_depth", 5) + 1
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        out = ours(x)
        assert out.shape == (2, kwargs["classes"], 64, 64) and torch.equal(out, theirs(x))


def test_every_vggkit_model_is_registered(names):
    assert {"vggkit_vgg11", "vggkit_vgg13_bn", "vggkit_vgg16", "vggkit_vgg19_bn", "vggkit_vgg16c",
            "vggkit_vgg11_lrn"} <= set(smp.encoders.get_encoder_names())
    assert len(names) == 2 * len(smp_encoder.MODEL_NAMES)
    x = torch.randn(1, 3, 64, 64)
    for name in ("vggkit16th_vgg11_lrn", "vggkit16th_vgg16c_bn", "vggkit16th_vgg19"):
        unet = smp.Unet(name, encoder_weights=None, classes=2).eval()
        assert unet.encoder.out_channels == [4, 8, 16, 32, 32, 32]
        with torch.no_grad():
            assert unet(x).shape == (1, 2, 64, 64)


def test_load_vgg_takes_any_vggkit_weights_and_their_preprocess(names, tmp_path):
    source = vggkit.create_model("vgg16", width=TINY)
    torch.save(vggkit.export_state_dict(source, "caffe"), tmp_path / "vgg16_caffe.pth")
    caffe = vggkit.create_model("vgg16", weights=tmp_path / "vgg16_caffe.pth", width=TINY)
    unet = smp.Unet("vggkit16th_vgg16", encoder_weights=None, classes=2)
    unet.encoder.load_vgg(caffe)
    assert unet.encoder.preprocess.name == "caffe"
    assert all(torch.equal(v, unet.encoder.features.state_dict()[k]) for k, v in source.features.state_dict().items())
    with pytest.raises(RuntimeError, match="size mismatch"):
        unet.encoder.load_vgg(vggkit.create_model("vgg16", width=1 / 8))
    with pytest.raises(KeyError, match="Wrong pretrained weights `imagenet`"):
        smp.Unet("vggkit16th_vgg16", encoder_weights="imagenet")  # smp's hub, not vggkit's weights


def test_other_input_channels_as_smp(names):
    vgg = vggkit.create_model("vgg11", width=TINY)
    unet = smp.Unet("vggkit16th_vgg11", encoder_weights=None, in_channels=1, classes=2).eval()
    unet.encoder.load_vgg(vgg)  # pretrained weights for one channel: smp sums the RGB filters
    assert torch.allclose(unet.encoder.features.conv1_1.weight, vgg.features.conv1_1.weight.sum(1, keepdim=True))
    with torch.no_grad():
        assert unet(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    with pytest.raises(ValueError, match="dilated"):
        smp.encoders.get_encoder("vggkit16th_vgg11", output_stride=16)  # as smp's VGG: max-pools, no dilation
    with pytest.raises(ValueError, match="must start with 'vgg'"):
        smp_encoder.register(prefix="kit_")


def test_vggkit_imports_without_smp():
    code = ("import sys; sys.modules['segmentation_models_pytorch'] = None\n"
            "import vggkit.models.smp_encoder as e\n"
            "try:\n    e.register()\nexcept ImportError as error:\n    print('refused:', error)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "refused: vggkit's smp encoders need segmentation-models-pytorch" in out.stdout, out.stderr[-500:]
