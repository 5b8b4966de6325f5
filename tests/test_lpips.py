"""vggkit.LPIPS equals the lpips package's distance on the same VGG16 weights, with its real lin weights."""

import importlib.util
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import vggkit
from vggkit.features.lpips_distance import packaged_lin_weights
from vggkit.weights.checkpoint import WeightsError
from vggkit.weights.releases import WeightsUnavailableError

lpips = pytest.importorskip("lpips", reason="the lpips package (pip install 'vggkit[lpips]') is the reference")


def _photo(array: np.ndarray, size: int = 112) -> torch.Tensor:
    rgb = torch.from_numpy(np.asarray(array)).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(rgb, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@pytest.fixture(scope="module")
def same_trunk(tmp_path_factory):
    """The lpips package's model with a random VGG16 trunk (built offline), and that trunk as a torchvision file."""
    torch.manual_seed(0)
    with warnings.catch_warnings():  # lpips asks torchvision with its deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        reference = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()
    state = torchvision.models.vgg16().state_dict()
    for i in range(1, 6):  # lpips keeps torchvision's feature indices inside its five slices
        state.update({f"features.{k}": v for k, v in getattr(reference.net, f"slice{i}").state_dict().items()})
    path = tmp_path_factory.mktemp("lpips") / "vgg16_torchvision_layout.pth"
    torch.save(state, path)
    return reference, path


@pytest.fixture(scope="module")
def photos():
    from skimage import data

    first = torch.cat([_photo(data.astronaut()), _photo(data.chelsea())])
    second = torch.cat([_photo(data.coffee()), _photo(data.rocket())])
    return first, second


def test_equals_the_lpips_package_on_photographs(same_trunk, photos):
    reference, path = same_trunk
    ours = vggkit.LPIPS(weights=path)
    first, second = photos
    with torch.no_grad():
        expected = reference(first, second, normalize=True).flatten()
        distance = ours(first, second)
        # The package's convention: images in [-1, 1].
        in_minus_one_to_one = vggkit.LPIPS(weights=path, value_range=(-1, 1))(2 * first - 1, 2 * second - 1)
        same = ours(first, first)
    assert distance.shape == (2,) and (distance - expected).abs().max() <= 1e-5
    assert (in_minus_one_to_one - expected).abs().max() <= 1e-5
    assert distance.min() > 0.01 and same.abs().max() <= 1e-6


def test_spatial_map_equals_the_lpips_package(same_trunk, photos):
    reference, path = same_trunk
    reference.spatial = True
    try:
        first, second = photos
        with torch.no_grad():
            expected = reference(first, second, normalize=True)
            ours = vggkit.LPIPS(weights=path, spatial=True)(first, second)
    finally:
        reference.spatial = False
    assert ours.shape == (2, 1, 112, 112) and (ours - expected).abs().max() <= 1e-5


def test_gradients_reach_the_input_and_nothing_trains(same_trunk):
    _, path = same_trunk
    metric = vggkit.LPIPS(weights=path).train()
    assert not any(p.requires_grad for p in metric.parameters()) and not metric.backbone.training
    image = torch.rand(1, 3, 48, 48, requires_grad=True)
    metric(image, torch.rand(1, 3, 48, 48)).sum().backward()
    assert image.grad.abs().sum() > 0


def test_lin_weights_come_from_the_package_or_a_file(tmp_path, monkeypatch):
    assert packaged_lin_weights().name == "vgg.pth"
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(WeightsError, match="notes.pth is not a PyTorch weight file"):
        vggkit.LPIPS(weights=None, lin_weights=tmp_path / "notes.pth")
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"partial.pth is not LPIPS VGG lin weights: expected one "
                                           r"lin1.model.\*.weight of shape \(1, 128, 1, 1\)"):
        vggkit.LPIPS(weights=None, lin_weights=tmp_path / "partial.pth")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lpips" else real(name, *a))
    with pytest.raises(WeightsUnavailableError, match=r'pip install "vggkit\[lpips\]".*or pass lin_weights='):
        vggkit.LPIPS(weights=None)
