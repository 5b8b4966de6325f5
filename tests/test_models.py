"""The six configurations of Table 1: structure, names, parameter counts, shapes."""

import pytest
import torch
from torch import nn

import vggkit
from vggkit.models.configs import PAPER_CONFIGS, layer_names

ALL_NAMES = [f"{c}{bn}" for c in ("vgg11", "vgg11_lrn", "vgg13", "vgg16c", "vgg16", "vgg19") for bn in ("", "_bn")]


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_parameter_counts_equal_table_2(config):
    assert vggkit.count_parameters(vggkit.create_model(config)) == vggkit.PAPER_PARAMETERS[config]


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_batch_norm_variant_adds_two_parameters_per_conv(config):
    plain, bn = vggkit.create_model(config, width=0.25), vggkit.create_model(config + "_bn", width=0.25)
    conv_channels = sum(m.out_channels for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert vggkit.count_parameters(bn) - vggkit.count_parameters(plain) == 2 * conv_channels


@pytest.mark.parametrize(
    "config, convs, one_by_one",
    [("A", 8, 0), ("A-LRN", 8, 0), ("B", 10, 0), ("C", 13, 3), ("D", 13, 0), ("E", 16, 0)],
)
def test_table_1_structure(config, convs, one_by_one):
    model = vggkit.create_model(config, width=1 / 16)
    conv_layers = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(conv_layers) == convs  # + 3 FC layers = the depth in the column's title
    assert sum(m.kernel_size == (1, 1) and m.padding == (0, 0) for m in conv_layers) == one_by_one
    assert all(m.padding == (1, 1) for m in conv_layers if m.kernel_size == (3, 3))
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 5 and all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    assert [m.p for m in model.classifier if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    assert isinstance(model.features[2], nn.LocalResponseNorm) == (config == "A-LRN")


def test_full_size_channels_follow_64_to_512():
    model = vggkit.create_model("vgg19")
    assert [model.features.get_submodule(f"conv{b}_1").out_channels for b in range(1, 6)] == [64, 128, 256, 512, 512]
    assert model.classifier.fc6.in_features == 512 * 7 * 7 and model.classifier.fc7.out_features == 4096


def test_config_c_ends_blocks_3_to_5_with_its_1x1_conv():
    model = vggkit.create_model("C", width=1 / 16)
    for block in (3, 4, 5):
        assert model.features.get_submodule(f"conv{block}_3").kernel_size == (1, 1)
    assert model.features.conv2_2.kernel_size == (3, 3)


def test_lrn_is_alexnets():
    lrn = vggkit.create_model("A-LRN", width=1 / 8).features.lrn1
    x = torch.rand(1, 9, 4, 4) * 30
    square = x.pow(2)
    # b_i = a_i / (k + alpha * sum_{|j-i|<=2} a_j^2)^beta, k=2, alpha=1e-4, beta=0.75 (AlexNet, section 3.3)
    window = torch.stack([square[:, max(0, i - 2): i + 3].sum(1) for i in range(9)], 1)
    expected = x / (2 + 1e-4 * window) ** 0.75
    torch.testing.assert_close(lrn(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_names_layers_and_output_shapes(name):
    model = vggkit.create_model(name, width=1 / 16, num_classes=7).eval()
    assert model.num_classes == 7
    expected_layers = layer_names(name)
    assert expected_layers[-3:] == ["fc6", "fc7", "fc8"] and expected_layers[0] == "conv1_1"
    keys = model.state_dict().keys()
    assert "features.conv1_1.weight" in keys and "classifier.fc6.weight" in keys and "classifier.fc8.bias" in keys
    assert ("features.bn1_1.running_mean" in keys) == name.endswith("_bn")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pool5 = model.forward_features(x)
        assert pool5.shape == (2, model.feature_channels, 2, 2)
        assert model.forward_head(pool5).shape == (2, 7)
        assert model.forward_head(pool5, pre_logits=True).shape == (2, 256)
        torch.testing.assert_close(model(x), model.forward_head(pool5))


def test_layer_names_of_each_config():
    assert layer_names("A")[:4] == ["conv1_1", "pool1", "conv2_1", "pool2"]
    assert layer_names("A-LRN")[:3] == ["conv1_1", "lrn1", "pool1"]
    assert "conv5_4" in layer_names("E") and "conv5_4" not in layer_names("D")
    assert sum(n.startswith("conv") for n in layer_names("D")) == 13


@pytest.mark.parametrize("spelling, expected", [
    ("D", "vgg16"), ("vgg16", "vgg16"), ("VGG16_BN", "vgg16_bn"), ("a-lrn", "vgg11_lrn"), ("A_LRN", "vgg11_lrn"),
    ("vgg11_lrn", "vgg11_lrn"), ("c", "vgg16c"), ("E_bn", "vgg19_bn"), ("vgg13", "vgg13"),
])
def test_names_are_case_insensitive_aliases(spelling, expected):
    assert vggkit.resolve(spelling).name == expected


def test_list_models_starts_with_the_paper_letters():
    names = vggkit.list_models()
    assert names[:6] == ["A", "A-LRN", "B", "C", "D", "E"]
    assert {"vgg11", "vgg16c", "vgg19_bn", "vgg11_lrn"} <= set(names)


def test_unknown_model_suggests_the_closest():
    with pytest.raises(ValueError, match=r"Unknown VGG model 'vgg61'.*Did you mean.*'vgg16'"):
        vggkit.create_model("vgg61")


def test_width_and_dropout_are_arguments():
    model = vggkit.create_model("vgg16", width=0.5, dropout=0.2, num_classes=3)
    assert model.features.conv1_1.out_channels == 32 and model.classifier.fc6.out_features == 2048
    assert model.classifier.drop6.p == 0.2


@pytest.mark.parametrize("init", ["kaiming", "paper", "glorot"])
def test_inits_zero_the_biases(init):
    model = vggkit.create_model("A", width=1 / 16, init=init)
    assert all(torch.count_nonzero(m.bias) == 0 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    if init == "paper":  # section 3.1: N(0, 1e-2)
        assert abs(model.features.conv2_1.weight.std().item() - 0.01) < 1e-3
