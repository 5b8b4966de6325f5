"""Perceptual features: taps before the ReLU, PerceptualLoss, StyleLoss and the BasicSR reference."""

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import vggkit
from vggkit.bench.perceptual import BasicSRVGGFeatureExtractor, basicsr_perceptual_loss
from vggkit.features.perceptual import gatys_style_distance
from vggkit.runtime.engine import optimize
from vggkit.weights.layouts import export_state_dict

TINY = 1 / 16


def _out_of_place(model: torch.nn.Module) -> torch.nn.Module:
    # torchvision's in-place ReLUs overwrite a conv node's output when a later node is also returned.
    for module in model.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    return model


@pytest.mark.parametrize("name, nodes", [
    ("vgg19", {"features.2": "conv1_2_pre", "features.3": "conv1_2", "features.21": "conv4_2_pre",
               "features.34": "conv5_4_pre", "features.35": "conv5_4"}),
    # With batch norm the pre-activation tap is the ReLU's input: the batch norm's output.
    ("vgg11_bn", {"features.1": "conv1_1_pre", "features.2": "conv1_1", "features.26": "conv5_2_pre"}),
])
def test_pre_activation_taps_equal_create_feature_extractor(tmp_path, name, nodes):
    reference = getattr(torchvision.models, name)().eval()
    torch.save(reference.state_dict(), tmp_path / "vgg.pth")
    expected = create_feature_extractor(_out_of_place(reference), return_nodes=nodes)
    fe = vggkit.backbone(name, layers=list(nodes.values())[::-1], weights=tmp_path / "vgg.pth").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want, ours = expected(x), fe(x)
    assert list(ours) == list(nodes.values())  # forward order: conv5_4_pre before conv5_4
    for layer in ours:
        assert torch.equal(ours[layer], want[layer]), layer
    assert any((ours[layer] < 0).any() for layer in ours if layer.endswith("_pre"))


def test_pre_taps_survive_the_fused_inference_copy():
    fe = vggkit.backbone("vgg16_bn", layers=["conv2_1_pre", "conv2_1", "conv3_3_pre"], width=TINY).eval()
    fast = optimize(fe, precision="fp32", device="cpu")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain, fused = fe(x), fast(x)
    for layer in plain:
        assert (plain[layer] - fused[layer]).abs().max() <= 1e-4, layer
    assert fused["conv3_3_pre"].min() < 0 and fused["conv2_1_pre"].min() < 0 <= fused["conv2_1"].min()


def test_pre_tap_feature_info_and_depth():
    fe = vggkit.backbone("vgg19", layers=["conv5_4_pre", "conv3_3_pre"], width=TINY)
    assert fe.feature_info["conv5_4_pre"] == fe.feature_info["conv5_4_pre"].__class__("conv5_4_pre", 32, 16, 252)
    assert fe.feature_info["conv3_3_pre"].stride == 4
    names = [n for n, _ in fe.features.named_children()]
    assert names[-1] == "conv5_4" and "relu5_4" not in names  # stops before the ReLU it does not need
    assert not fe.features.relu3_3.inplace


def test_unknown_tap_lists_the_valid_ones_including_pre_forms():
    with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['conv5_4_pre'\] for vgg16.*conv5_3_pre, conv5_3"):
        vggkit.backbone("vgg16", layers=["conv5_4_pre"])
    with pytest.raises(ValueError, match="Unknown layer name.*pool5_pre"):
        vggkit.backbone("vgg16", layers=["pool5_pre"], width=TINY)


def test_extract_features_reads_a_pre_activation_tap():
    model = vggkit.create_model("vgg16", width=TINY)
    image = (torch.rand(40, 48, 3) * 255).byte().numpy()
    kwargs = dict(scales=(32,), pool=None, precision="fp32", device="cpu", progress=False)
    pre = vggkit.extract_features(model, [image], layer="conv3_3_pre", **kwargs).features
    post = vggkit.extract_features(model, [image], layer="conv3_3", **kwargs).features
    assert pre.shape == post.shape == (1, 16, 8, 8)
    assert pre.min() < 0 and (abs(post - pre.clip(min=0)) <= 1e-5).all()


# --------------------------------------------------------------------------- losses


def test_esrgan_preset_equals_basicsr_on_the_same_weights(tmp_path):
    reference = torchvision.models.vgg19()
    torch.save(reference.state_dict(), tmp_path / "vgg19.pth")
    loss = vggkit.PerceptualLoss("esrgan", weights=tmp_path / "vgg19.pth")
    assert loss.layer_weights == {"conv5_4_pre": 1.0} and loss.criterion == "l1"
    restored, target = torch.rand(2, 3, 48, 48, requires_grad=True), torch.rand(2, 3, 48, 48)
    ours = loss(restored, target)
    (grad_ours,) = torch.autograd.grad(ours, restored)
    theirs = basicsr_perceptual_loss(BasicSRVGGFeatureExtractor(reference), restored, target)
    (grad_theirs,) = torch.autograd.grad(theirs, restored)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=0)
    assert torch.allclose(grad_ours, grad_theirs, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("criterion", ["l1", "l2", "cosine"])
def test_perceptual_loss_is_differentiable_to_the_input(criterion):
    loss = vggkit.PerceptualLoss({"conv1_2_pre": 1.0, "conv3_1": 0.5, "conv5_4_pre": 0.25}, weights=None,
                                 criterion=criterion, width=TINY).double()
    target = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    image = torch.rand(1, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: loss(x, target), (image,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_style_loss_is_differentiable_to_the_input():
    loss = vggkit.StyleLoss(weights=None, width=TINY).double()
    style = torch.rand(1, 3, 24, 24, dtype=torch.float64)
    image = torch.rand(1, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: loss(x, style), (image,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_the_backbone_is_never_updated():
    loss = vggkit.PerceptualLoss("gatys", model="vgg19_bn", weights=None, width=TINY).train()
    assert not loss.backbone.training and not any(p.requires_grad for p in loss.parameters())
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    generator = torch.nn.Conv2d(3, 3, 3, padding=1)
    optimizer = torch.optim.SGD([*generator.parameters(), *loss.parameters()], lr=1.0)
    for _ in range(2):
        value = loss(torch.sigmoid(generator(torch.rand(2, 3, 32, 32))), torch.rand(2, 3, 32, 32))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert generator.weight.grad.abs().sum() > 0
    for key, value in loss.state_dict().items():  # weights and batch-norm statistics alike
        assert torch.equal(value, before[key]), key


def test_losses_run_only_as_deep_as_their_deepest_layer():
    content = vggkit.PerceptualLoss("esrgan", weights=None, width=TINY)
    names = [n for n, _ in content.backbone.features.named_children()]
    assert names[-1] == "conv5_4" and "relu5_4" not in names
    style = vggkit.StyleLoss(weights=None, width=TINY)
    names = [n for n, _ in style.backbone.features.named_children()]
    assert names[-1] == "relu5_1" and "conv5_2" not in names
    srgan = vggkit.PerceptualLoss("srgan", weights=None, width=TINY)
    assert srgan.criterion == "l2" and srgan.layer_weights == {"conv5_4": pytest.approx(1 / 12.75 ** 2)}
    assert [n for n, _ in srgan.backbone.features.named_children()][-1] == "relu5_4"


def test_weights_own_normalisation_is_applied_inside_caffe_bgr_included(tmp_path):
    model = vggkit.create_model("vgg19", width=TINY)
    torch.save(export_state_dict(model, "caffe"), tmp_path / "caffe_layout.pth")
    loss = vggkit.PerceptualLoss({"conv2_2": 1.0}, weights=tmp_path / "caffe_layout.pth", width=TINY,
                                 criterion="l2")
    assert loss.backbone.preprocess.name == "caffe"
    image, target = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    mean = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    tap = vggkit.VGGBackbone(model, ["conv2_2"]).eval()
    with torch.no_grad():
        by_hand = torch.nn.functional.mse_loss(tap(image.flip(1) * 255 - mean)["conv2_2"],
                                               tap(target.flip(1) * 255 - mean)["conv2_2"])
        assert torch.allclose(loss(image, target), by_hand, rtol=1e-5)


def test_targets_broadcast_and_precomputed_targets_give_the_same_loss():
    loss = vggkit.PerceptualLoss("gatys", weights=None, width=TINY)
    images, content, style = torch.rand(3, 3, 32, 32), torch.rand(1, 3, 32, 32), torch.rand(1, 3, 48, 40)
    with torch.no_grad():
        direct = loss(images, content, style=style)
        cached = loss(images, loss.targets(content), style=loss.targets(style))
        assert torch.equal(direct, cached) and direct > 0
        assert loss(content, content, style=content) == 0
        assert loss(images, content) != direct  # the style term follows the style image


def test_gatys_style_distance_normalisation():
    # One channel, two positions of value 1 against zeros: G = 2, A = 0, E = 2^2 / (4 * 1^2 * 2^2).
    assert gatys_style_distance(torch.ones(1, 1, 1, 2), torch.zeros(1, 1, 1, 2)).item() == pytest.approx(0.25)
    features = torch.rand(2, 4, 6, 5)
    shuffled = features.flatten(2)[:, :, torch.randperm(30)].view(2, 4, 6, 5)
    assert gatys_style_distance(features, shuffled).item() == pytest.approx(0, abs=1e-10)  # Grams ignore layout
    # A style map twice the size with the same statistics is the same style.
    assert gatys_style_distance(features, torch.cat([features, features], dim=3)).item() == pytest.approx(0, abs=1e-9)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="Unknown perceptual preset 'esrgn'; choose from esrgan, srgan, gatys"):
        vggkit.PerceptualLoss("esrgn", weights=None)
    with pytest.raises(ValueError, match="Unknown criterion 'l3'; choose from l1, l2, cosine"):
        vggkit.PerceptualLoss("esrgan", criterion="l3", weights=None, width=TINY)
    with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['conv5_5'\] for vgg19"):
        vggkit.StyleLoss(["conv5_5"], weights=None, width=TINY)
    loss = vggkit.PerceptualLoss("esrgan", weights=None, width=TINY)
    with pytest.raises(ValueError, match=r"Expected RGB images of shape \(N, 3, H, W\) in \[0, 1\], got \(3, 32, 32\)"):
        loss(torch.rand(3, 32, 32), torch.rand(3, 32, 32))


def test_bench_row_counts_two_forwards_and_one_backward_to_conv5_4():
    from vggkit.bench._common import gflops
    from vggkit.bench.perceptual import step_gflop
    from vggkit.models.vgg import VGG

    forward = gflops(lambda: vggkit.VGGBackbone(VGG("vgg19"), ["conv5_4_pre"]), (1, 3, 256, 256))
    assert forward == pytest.approx(50.96, abs=0.01)
    # The backward needs input gradients only (frozen weights): about one more forward's worth.
    assert step_gflop() == pytest.approx(3 * forward, rel=0.01)
