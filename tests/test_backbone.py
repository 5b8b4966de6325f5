"""Named features: equal to torchvision's create_feature_extractor, with feature_info."""

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import vggkit
from vggkit.models.receptive_field import effective_receptive_field


def test_equals_create_feature_extractor_on_the_same_weights(tmp_path):
    reference = torchvision.models.vgg16().eval()
    torch.save(reference.state_dict(), tmp_path / "vgg16.pth")
    nodes = {"features.15": "conv3_3", "features.22": "conv4_3", "features.29": "conv5_3", "features.30": "pool5"}
    expected_extractor = create_feature_extractor(reference, return_nodes=nodes)
    fe = vggkit.backbone("vgg16", layers=["conv5_3", "conv3_3", "pool5", "conv4_3"], weights=tmp_path / "vgg16.pth")
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        expected, ours = expected_extractor(x), fe.eval()(x)
    assert list(ours) == ["conv3_3", "conv4_3", "conv5_3", "pool5"]  # forward order
    for name in ours:
        assert torch.equal(ours[name], expected[name]), name


def test_feature_info_and_shapes():
    fe = vggkit.backbone("vgg16", layers=["conv3_3", "conv4_3", "conv5_3"], width=1 / 8)
    info = fe.feature_info
    assert [(i.stride, i.receptive_field) for i in info.values()] == [(4, 40), (8, 92), (16, 196)]
    assert fe.channels() == [32, 64, 64]
    out = fe(torch.randn(2, 3, 64, 96))
    assert [tuple(v.shape) for v in out.values()] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 64, 4, 6)]


def test_runs_only_as_deep_as_needed():
    fe = vggkit.backbone("vgg19", layers=["conv2_2"], width=1 / 8)
    names = [n for n, _ in fe.features.named_children()]
    assert names[-1] == "relu2_2" and "conv3_1" not in names
    assert not hasattr(fe, "classifier") or fe.fc6 is None


def test_fc6_fc7_as_convs_and_padded_for_small_inputs():
    model = vggkit.create_model("vgg16", width=1 / 16).eval()
    fe = vggkit.VGGBackbone(model, ["fc7"]).eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        fc7 = fe(x)["fc7"]
        expected = model.to_fully_conv().fc_maps(model.features(x))["fc7"]
    assert fc7.shape == (1, 256, 2, 2) and (fc7 - expected).abs().max() <= 1e-5
    padded = vggkit.VGGBackbone(model, ["fc6", "fc7", "conv4_3"], pad_fc6=True)
    out = padded(torch.randn(1, 3, 64, 64))
    assert out["fc6"].shape[-2:] == (2, 2) and out["fc7"].shape[-2:] == (2, 2)
    assert padded.feature_info["fc7"].stride == 32 and padded.feature_info["fc7"].receptive_field == 404


def test_frozen_backbone_has_no_trainable_parameters():
    fe = vggkit.backbone("vgg11", layers=["conv4_2"], width=1 / 16, frozen=True)
    assert not any(p.requires_grad for p in fe.parameters())
    trainable = vggkit.backbone("vgg11", layers=["conv4_2"], width=1 / 16)
    assert all(p.requires_grad for p in trainable.parameters())


def test_unknown_layer_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['conv5_4'\] for vgg16.*conv5_3"):
        vggkit.backbone("vgg16", layers=["conv3_3", "conv5_4"])
    with pytest.raises(ValueError, match="fc8 is the classifier"):
        vggkit.backbone("vgg16", layers=["fc8"], width=1 / 16)


def test_effective_receptive_field_stays_inside_the_theoretical_one():
    fe = vggkit.backbone("vgg11", layers=["conv3_2"], width=1 / 8)
    rf = vggkit.receptive_field("vgg11")["conv3_2"]
    heat = effective_receptive_field(fe, torch.rand(3, 96, 96), position=(12, 12))
    top, left, bottom, right = rf.box(12, 12)
    rows, cols = torch.nonzero(heat > 0, as_tuple=True)
    assert heat.max() == 1
    assert rows.min() >= top and rows.max() < bottom and cols.min() >= left and cols.max() < right
    assert heat[top + rf.receptive_field // 2, left + rf.receptive_field // 2] > 0


def test_random_backbone_allocates_only_the_layers_it_keeps():
    fe = vggkit.backbone("vgg16", layers=["conv2_2"])
    # conv1_1, conv1_2, conv2_1, conv2_2 of Table 1's D: weights and biases, nothing else.
    assert vggkit.count_parameters(fe) == (3 * 64 * 9 + 64) + (64 * 64 * 9 + 64) + (64 * 128 * 9 + 128) + (
        128 * 128 * 9 + 128)
    assert not any(t.is_meta for t in fe.state_dict().values())


def test_random_backbone_is_initialised_like_the_full_model():
    fe = vggkit.backbone("vgg11_bn", layers=["conv3_1", "fc7"], width=1 / 8, pad_fc6=True)
    bn = fe.features.bn1_1
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    # He normal convs (fan_out) and N(0, 0.01) for fc6/fc7, which the full model holds as Linear layers.
    conv = fe.features.conv3_1
    assert abs(conv.weight.std().item() - (2 / (conv.out_channels * 9)) ** 0.5) < 0.01
    assert abs(fe.fc6.weight.std().item() - 0.01) < 1e-3 and torch.count_nonzero(fe.fc7.bias) == 0
    out = fe(torch.randn(2, 3, 64, 64))
    assert all(torch.isfinite(v).all() for v in out.values())
