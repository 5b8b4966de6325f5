"""torch.fx and torchvision's create_feature_extractor on vggkit models: the paper's names give exactly
those layers (FX strips a trailing ``_N`` from a leaf module's node name), and the dense form traces."""

import pytest
import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import vggkit
from vggkit.models.backbone import VGGBackbone
from vggkit.models.configs import tap_names

TINY = 1 / 16


def _hooked(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every module's output in an eager forward, copied at once (later in-place ReLUs overwrite it)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, inputs, output):
            seen[name] = output.clone()  # and return None: a returned tensor would replace the output
        return hook

    handles = [module.register_forward_hook(keep(name))
               for name, module in model.named_modules() if name and not list(module.children())]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("name", ["vgg11", "vgg16_bn"])
def test_every_module_path_is_its_own_layer(name):
    model = vggkit.create_model(name, width=TINY, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 48)
    want = _hooked(model, x)
    # All at once: the paper-named conv, bn and relu nodes stay apart, and no ReLU overwrites its input.
    fe = create_feature_extractor(model, return_nodes=list(want))
    with torch.no_grad():
        got = fe(x)
    assert list(got) == list(want)
    for path in want:
        assert torch.equal(got[path], want[path]), path
    assert (got["features.conv3_1"] < 0).any()  # the conv's output, not its ReLU's


@pytest.mark.parametrize("name", ["vgg11", "vgg16_bn"])
def test_vggkit_layer_names_equal_the_backbone_and_the_head(name):
    model = vggkit.create_model(name, width=TINY, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 32)
    taps = tap_names(model.spec)
    fe = create_feature_extractor(model, return_nodes=model.return_nodes(taps))
    conv_taps = [t for t in taps if not t.startswith("fc")]
    with torch.no_grad():
        got, backbone = fe(x), VGGBackbone(model, conv_taps).eval()(x)  # the same modules and weights
        pool5 = model.forward_features(x)
        fc6 = model.classifier[:2](torch.flatten(model.avgpool(pool5), 1))
        fc7 = model.classifier[2:5](fc6)
    assert sorted(got) == sorted(taps)
    for tap in conv_taps:
        assert torch.equal(got[tap], backbone[tap]), tap
    for tap, value in {"fc6": fc6, "fc7": fc7, "fc8": model(x)}.items():
        assert torch.equal(got[tap], value), tap


def test_the_names_fx_used_to_give_are_refused():
    model = vggkit.create_model("vgg11", width=TINY).eval()
    _, nodes = get_graph_node_names(model)
    assert "features.relu3_1.relu" in nodes and "features.relu3_2.relu" in nodes
    assert "features.relu3" not in nodes  # what FX used to call relu3_1 (and relu3_1 was relu3_2's output)
    with pytest.raises(ValueError, match="node: 'features.relu3' is not present"):
        create_feature_extractor(model, return_nodes=["features.relu3"])
    with pytest.raises(ValueError, match="Unknown layer name"):
        model.return_nodes(["conv3_3"])  # vgg11 has no conv3_3


def test_batch_norm_trains_through_the_extractor_as_in_the_model():
    model = vggkit.create_model("vgg11_bn", width=TINY).train()
    copy = vggkit.create_model("vgg11_bn", width=TINY).train()
    copy.load_state_dict(model.state_dict())
    fe = create_feature_extractor(model, return_nodes={"features.relu2_1": "out"})
    assert int(model.features.bn1_1.num_batches_tracked) == 0  # tracing is not a training step
    x = torch.randn(4, 3, 32, 32)
    out = fe(x)["out"]
    assert torch.equal(out, copy.features[:7](x))  # conv1_1 ... relu2_1
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(model.features.bn2_1, key), getattr(copy.features.bn2_1, key)), key


@pytest.mark.parametrize("pad_fc6, side", [(False, 256), (True, 96)])
def test_dense_form_traces_and_matches(pad_fc6, side):
    model = vggkit.create_model("vgg11", width=TINY, num_classes=5).eval()
    dense = model.to_fully_conv(pad_fc6=pad_fc6)
    x = torch.randn(2, 3, side, side + 32)
    traced = torch.fx.symbolic_trace(dense)
    fe = create_feature_extractor(dense, {"features.relu5_2": "conv5_2", "relu6": "fc6", "relu7": "fc7"})
    with torch.no_grad():
        maps = dense.fc_maps(dense.features(x))
        assert torch.equal(traced(x), dense(x))
        got = fe(x)
        backbone = VGGBackbone(model, ["conv5_2"]).eval()(x)
    assert torch.equal(got["conv5_2"], backbone["conv5_2"])
    assert torch.equal(got["fc6"], maps["fc6"]) and torch.equal(got["fc7"], maps["fc7"])
    assert maps["fc8"].shape[-2:] == ((side // 32, side // 32 + 1) if pad_fc6 else (side // 32 - 6, side // 32 - 5))


def test_traced_dense_form_keeps_its_size_check_and_state_dict():
    model = vggkit.create_model("vgg16", width=TINY).eval()
    dense = model.to_fully_conv()
    assert list(dense.state_dict()) == ["features." + k for k in model.features.state_dict()] + [
        f"{fc}.{p}" for fc in ("fc6", "fc7", "fc8") for p in ("weight", "bias")]
    traced = torch.fx.symbolic_trace(dense)
    with pytest.raises(ValueError, match="at least 224x224"):
        traced(torch.randn(1, 3, 96, 96))
