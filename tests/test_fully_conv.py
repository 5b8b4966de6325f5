"""to_fully_conv: the paper's dense form shares the weights and gives the FC logits at 224."""

import pytest
import torch

import vggkit


@pytest.mark.parametrize("name", ["A", "A-LRN", "B", "C", "D", "E", "vgg16_bn"])
def test_1x1_map_at_224_equals_fc_logits(name):
    model = vggkit.create_model(name, width=1 / 16, num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits = model(x)
        score_map = model.to_fully_conv()(x)
        pooled = model.to_fully_conv(pool="avg")(x)
    assert score_map.shape == (2, 10, 1, 1)
    assert (score_map[:, :, 0, 0] - logits).abs().max() <= 1e-4
    assert (pooled - logits).abs().max() <= 1e-4


@pytest.mark.parametrize("side, expected", [(224, 1), (256, 2), (384, 6), (512, 10), (383, 5)])
def test_map_size_is_floor_q_over_32_minus_6(side, expected):
    dense = vggkit.create_model("vgg16", width=1 / 16, num_classes=5).eval().to_fully_conv()
    with torch.no_grad():
        assert dense(torch.randn(1, 3, side, side)).shape == (1, 5, expected, expected)
        assert dense(torch.randn(1, 3, side, 448)).shape[-2:] == (expected, 8)  # non-square image


def test_dense_shares_parameters_with_the_fc_model():
    model = vggkit.create_model("vgg11", width=1 / 16, num_classes=4).eval()
    dense = model.to_fully_conv()
    assert dense.fc6 is model.classifier.fc6 and dense.features is model.features
    with torch.no_grad():
        model.classifier.fc8.bias.add_(1.0)  # a change to one is a change to the other
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (dense(x)[:, :, 0, 0] - model(x)).abs().max() <= 1e-4
    # Gradients reach the Linear weights through the conv views.
    dense.train()
    dense(x).sum().backward()
    assert model.classifier.fc6.weight.grad is not None and model.classifier.fc6.weight.grad.abs().sum() > 0


def test_dense_averaged_map_matches_the_sliding_window():
    # Each position of the 384 map is the FC network on the corresponding 224 window (stride 32).
    model = vggkit.create_model("vgg11", width=1 / 16, num_classes=3).eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        score_map = model.to_fully_conv()(x)
        pool5 = model.forward_features(x)  # 8x8
        corner = model.forward_head(pool5[:, :, 1:8, 1:8])
    assert (score_map[:, :, 1, 1] - corner).abs().max() <= 1e-4


def test_small_input_is_a_clear_error_or_padded():
    dense = vggkit.create_model("vgg16", width=1 / 16).eval().to_fully_conv()
    with pytest.raises(ValueError, match="at least 224x224"):
        dense(torch.randn(1, 3, 96, 96))
    padded = vggkit.create_model("vgg16", width=1 / 16).eval().to_fully_conv(pad_fc6=True)
    with torch.no_grad():
        assert padded(torch.randn(1, 3, 96, 96)).shape == (1, 1000, 3, 3)


def test_mode_follows_the_model():
    model = vggkit.create_model("vgg11", width=1 / 16)
    assert model.to_fully_conv().training and not model.eval().to_fully_conv().training
    with pytest.raises(ValueError, match="pool must be"):
        model.to_fully_conv(pool="max")
