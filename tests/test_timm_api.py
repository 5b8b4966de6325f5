"""timm's model API on vggkit's VGG, each part against timm's own vgg16 on the same weights."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")
from timm.data import create_transform, resolve_data_config  # noqa: E402

import vggkit  # noqa: E402
from vggkit.models.backbone import VGGBackbone  # noqa: E402

TINY = 1 / 16


@pytest.fixture(scope="module")
def pair():
    """vggkit's vgg16 and timm's, full width (timm's has no width), with vggkit's weights exported to timm."""
    ours = vggkit.create_model("vgg16", seed=0).eval()
    theirs = timm.create_model("vgg16", pretrained=False).eval()
    theirs.load_state_dict(vggkit.export_state_dict(ours, "timm"))
    return ours, theirs


def _image(width: int = 300, height: int = 260) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_num_features_and_classifier_match_timm(pair):
    ours, theirs = pair
    assert (ours.num_features, ours.head_hidden_size) == (theirs.num_features, theirs.head_hidden_size) == (512, 4096)
    assert ours.get_classifier() is ours.classifier.fc8
    assert torch.equal(ours.get_classifier().weight, theirs.get_classifier().weight)
    tiny = vggkit.create_model("vgg16", width=TINY)
    assert (tiny.num_features, tiny.head_hidden_size) == (32, 256)


def test_forward_intermediates_equal_timm(pair):
    ours, theirs = pair
    if not hasattr(theirs, "forward_intermediates"):
        pytest.skip("this timm's VGG has no forward_intermediates; the backbone test below still checks ours")
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        for kwargs in ({}, {"indices": 2}, {"indices": [0, -1]}, {"indices": [3, 1], "stop_early": True}):
            final, taps = ours.forward_intermediates(x, **kwargs)
            want_final, want_taps = theirs.forward_intermediates(x, **kwargs)
            assert torch.equal(final, want_final), kwargs
            assert len(taps) == len(want_taps) and all(torch.equal(a, b) for a, b in zip(taps, want_taps)), kwargs
        only = ours.forward_intermediates(x, indices=1, intermediates_only=True)
        assert torch.equal(only[0], theirs.forward_features(x)) and torch.equal(only[0], ours.forward_features(x))
    assert [t.shape[1:] for t in taps] == [(128, 32, 16), (512, 8, 4)]  # the last call: indices [3, 1], forward order
    with pytest.raises(ValueError, match="NCHW"):
        ours.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="out of range"):
        ours.forward_intermediates(x, indices=[6])


@pytest.mark.parametrize("name, taps", [
    ("vgg16_bn", ["conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3", "pool5"]),
    ("vgg11_lrn", ["lrn1", "conv2_1", "conv3_2", "conv4_2", "conv5_2", "pool5"]),  # lrn1 comes just before pool1
])
def test_forward_intermediates_are_the_backbone_taps(name, taps):
    model = vggkit.create_model(name, width=TINY).eval()
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        got = model.forward_intermediates(x, intermediates_only=True)
        want = VGGBackbone(model, taps).eval()(x)
    assert [g.shape[-1] for g in got] == [64, 32, 16, 8, 4, 2]
    for tap, tensor in zip(taps, got):
        assert torch.equal(tensor, want[tap]), tap


def test_forward_head_equals_timm(pair):
    ours, theirs = pair
    x = torch.randn(2, 3, 64, 64)  # pool5 2x2: both average-pool it up to 7x7 (timm's ConvMlp, our avgpool)
    with torch.no_grad():
        pool5 = ours.forward_features(x)
        assert torch.equal(pool5, theirs.forward_features(x))
        for pre_logits in (False, True):
            ours_out, theirs_out = ours.forward_head(pool5, pre_logits), theirs.forward_head(pool5, pre_logits)
            assert ours_out.shape == theirs_out.shape
            # fc6 is a Linear on the flattened 7x7 here and a 7x7 conv there: the same sum in another order.
            assert (ours_out - theirs_out).abs().max() <= 1e-5, pre_logits


def test_reset_classifier_as_timm(pair):
    ours, theirs = copy.deepcopy(pair[0]), copy.deepcopy(pair[1])
    x = torch.randn(1, 3, 32, 32)
    ours.class_names = [f"c{i}" for i in range(1000)]
    for model in (ours, theirs):
        model.reset_classifier(10)
    assert ours.get_classifier().weight.shape == theirs.get_classifier().weight.shape == (10, 4096)
    assert ours.num_classes == theirs.num_classes == 10 and ours.class_names is None
    assert ours.pretrained_cfg["num_classes"] == 10
    with torch.no_grad():
        assert ours(x).shape == theirs(x).shape == (1, 10)
    for model in (ours, theirs):
        model.reset_classifier(0)
    assert isinstance(ours.get_classifier(), torch.nn.Identity) and isinstance(theirs.get_classifier(), torch.nn.Identity)
    with torch.no_grad():
        features, want = ours(x), theirs(x)
    assert features.shape == want.shape == (1, 4096) and (features - want).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="no global pool"):
        ours.reset_classifier(5, global_pool="avg")
    with pytest.raises(ValueError, match="paper's classifier"):
        ours.to_fully_conv()


def test_reset_classifier_keeps_device_and_dtype():
    model = vggkit.create_model("vgg11", width=TINY).to(torch.float64)
    model.reset_classifier(3)
    assert model.get_classifier().weight.dtype == torch.float64
    assert model.get_classifier().weight.std() < 0.02 and not model.get_classifier().bias.any()


def test_resolve_data_config_gives_vggkit_imagenet_preprocess(pair):
    ours, theirs = pair
    config = resolve_data_config(model=ours)
    assert config == resolve_data_config(model=theirs)  # torchvision's weights: timm's own config
    image = _image()
    assert torch.equal(create_transform(**config)(image), ours.preprocess(image))
    assert ours.default_cfg == ours.pretrained_cfg and ours.pretrained_cfg["architecture"] == "vgg16"


def test_resolve_data_config_gives_caffe_preprocess_up_to_the_channel_order(tmp_path):
    source = vggkit.create_model("vgg16", width=TINY)
    torch.save(vggkit.export_state_dict(source, "caffe"), tmp_path / "vgg16_caffe.pth")
    model = vggkit.create_model("vgg16", weights=tmp_path / "vgg16_caffe.pth", width=TINY)
    assert model.preprocess.name == "caffe"
    config = resolve_data_config(model=model)
    assert config["mean"] == pytest.approx((123.68 / 255, 116.779 / 255, 103.939 / 255))
    assert config["std"] == pytest.approx((1 / 255,) * 3)
    assert model.pretrained_cfg["channel_order"] == "BGR"
    image = _image(240, 320)
    timm_input = create_transform(**config)(image).flip(0)  # timm gives RGB; Caffe's weights read BGR
    want = model.preprocess(image)
    assert timm_input.shape == want.shape == (3, 224, 224)
    assert (timm_input - want).abs().max() <= 1e-4  # 0-255 values, float32 rounding of x/255 - m/255


def test_crop_pct_gives_vggkit_resize_size():
    model = vggkit.create_model("vgg11", width=TINY)
    # timm resizes to floor(224 / (224 / 400)) = 399 unless crop_pct is nudged below 224 / 400.
    model.preprocess = vggkit.Preprocess(input_size=224, resize_size=400)
    config = resolve_data_config(model=model)
    assert config["crop_pct"] < 224 / 400
    image = _image(500, 460)
    assert torch.equal(create_transform(**config)(image), model.preprocess(image))
