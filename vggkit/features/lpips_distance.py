"""LPIPS (Zhang et al. 2018), version 0.1 with the VGG16 trunk, on vggkit's backbone.

The distance of ``lpips.LPIPS(net="vgg", version="0.1")``: VGG16 features after the
ReLUs of conv1_2, conv2_2, conv3_3, conv4_3 and conv5_3, each unit-normalised over
channels, squared differences weighted per channel by the learned 1x1 "lin" layers,
averaged over positions and summed over layers. The lin weights are the package's
(``pip install "vggkit[lpips]"``) or a file with the same keys.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..weights.checkpoint import WeightsError
from ..weights.factory import read_weights_file, unwrap_checkpoint
from ..weights.releases import WeightsUnavailableError
from .perceptual import FrozenFeatures

LPIPS_TAPS = ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3")


# The lpips package's ScalingLayer: [-1, 1] input -> ImageNet mean/std normalisation.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)


LPIPS_SCALE = (0.458, 0.448, 0.450)


EPS = 1e-10  # lpips.normalize_tensor's


def packaged_lin_weights() -> Path:
    """The lin weights inside the installed ``lpips`` package: ``lpips/weights/v0.1/vgg.pth``."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailableError(
            'LPIPS needs its calibration ("lin") weights: pip install "vggkit[lpips]" (the lpips package '
            "carries them), or pass lin_weights= a copy of lpips/weights/v0.1/vgg.pth.")
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"
    if not path.is_file():
        raise WeightsUnavailableError(f"The installed lpips package has no {path}; reinstall it "
                                      f'(pip install --force-reinstall "vggkit[lpips]") or pass lin_weights=.')
    return path


def read_lin_weights(path: str | os.PathLike, channels: list[int]) -> list[torch.Tensor]:
    """The five lin layers' weights (1, C, 1, 1) from an lpips weight file (keys ``lin{k}.model.*.weight``)."""
    state, _ = unwrap_checkpoint(read_weights_file(path))
    found = []
    for k, c in enumerate(channels):
        keys = [key for key in state if key.startswith(f"lin{k}.") and key.endswith(".weight")]
        if len(keys) != 1 or tuple(state[keys[0]].shape) != (1, c, 1, 1):
            raise WeightsError(f"{path} is not LPIPS VGG lin weights: expected one lin{k}.model.*.weight of shape "
                               f"(1, {c}, 1, 1), found {keys or 'none'}. Use lpips/weights/v0.1/vgg.pth.")
        found.append(state[keys[0]].float())
    return found


class LPIPS(FrozenFeatures):
    """LPIPS v0.1 (VGG): ``(img0, img1)`` (N, 3, H, W) each -> distance (N,), or (N, 1, H, W) with ``spatial``.

    Images are RGB in [0, 1] (``value_range=(-1, 1)`` for the lpips package's convention).
    ``weights``: the VGG16 trunk (``"imagenet"``, as LPIPS was calibrated, or a file path);
    ``lin_weights``: None (the installed lpips package's) or a path to ``vgg.pth``.
    """

    def __init__(self, weights: str | os.PathLike | None = "imagenet", lin_weights: str | os.PathLike | None = None,
                 spatial: bool = False, value_range: tuple[float, float] = (0.0, 1.0)) -> None:
        if tuple(value_range) not in ((0.0, 1.0), (-1.0, 1.0)):
            raise ValueError(f"value_range must be (0, 1) or (-1, 1), got {value_range}.")
        lin_path = packaged_lin_weights() if lin_weights is None else Path(lin_weights)
        super().__init__("vgg16", LPIPS_TAPS, weights, normalize_input=False)
        channels = self.backbone.channels()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        with torch.no_grad():
            for lin, weight in zip(self.lins, read_lin_weights(lin_path, channels)):
                lin.weight.copy_(weight)
        self.lins.requires_grad_(False)
        self.spatial = spatial
        self.value_range = tuple(float(v) for v in value_range)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def _features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.value_range == (0.0, 1.0):
            image = 2 * image - 1
        return self.features((image - self.shift) / self.scale)

    def forward(self, img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
        f0, f1 = self._features(img0), self._features(img1)
        total = 0
        for name, lin in zip(LPIPS_TAPS, self.lins):
            a = f0[name] / (torch.sqrt(torch.sum(f0[name] ** 2, dim=1, keepdim=True)) + EPS)
            b = f1[name] / (torch.sqrt(torch.sum(f1[name] ** 2, dim=1, keepdim=True)) + EPS)
            weighted = lin((a - b) ** 2)
            if self.spatial:
                total = total + F.interpolate(weighted, size=img0.shape[2:], mode="bilinear", align_corners=False)
            else:
                total = total + weighted.mean([2, 3], keepdim=True)
        return total if self.spatial else total.flatten()
