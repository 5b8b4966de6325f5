"""Perceptual uses of VGG features: content (feature) losses and Gatys et al.'s style loss.

Both losses run a frozen ``backbone()`` that holds only the layers up to the deepest
tap, take RGB images in [0, 1] and apply the weights' own normalisation inside
(ImageNet mean/std, or BGR 0-255 minus the Caffe mean for the original release).
Gradients flow to the input; the backbone never trains.

Presets (``PerceptualLoss("esrgan")``):

- ``"esrgan"``: VGG19 ``conv5_4`` before its ReLU, L1 (Wang et al. 2018; BasicSR's default).
- ``"srgan"``: VGG19 ``conv5_4`` after its ReLU ("VGG54"), mean squared error on feature
  maps rescaled by 1/12.75 (Ledig et al. 2017).
- ``"gatys"``: content at VGG19 ``conv4_2`` (mean squared error) and style as Gram matrices
  at ``conv1_1 ... conv5_1``, weighted 1/5 each, style weight 1e3 (alpha/beta = 1e-3,
  Gatys et al. 2016).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models.backbone import VGGBackbone
from ..weights.factory import backbone

CRITERIA = ("l1", "l2", "cosine")


GATYS_STYLE = {"conv1_1": 0.2, "conv2_1": 0.2, "conv3_1": 0.2, "conv4_1": 0.2, "conv5_1": 0.2}


Layers = str | Sequence[str] | Mapping[str, float]


Target = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Preset:
    """A published configuration: network, content layers with weights, criterion, style layers."""

    model: str
    layers: dict[str, float]
    criterion: str
    style_layers: dict[str, float] = field(default_factory=dict)
    style_weight: float = 0.0


PRESETS = {
    "esrgan": Preset("vgg19", {"conv5_4_pre": 1.0}, "l1"),
    "srgan": Preset("vgg19", {"conv5_4": 1 / 12.75 ** 2}, "l2"),
    "gatys": Preset("vgg19", {"conv4_2": 1.0}, "l2", dict(GATYS_STYLE), 1e3),
}


def _layer_weights(layers: Layers, what: str) -> dict[str, float]:
    """A layer list (equal weights 1) or mapping -> {layer: weight}; one name is a list of one."""
    if isinstance(layers, str):
        layers = [layers]
    weights = dict(layers) if isinstance(layers, Mapping) else dict.fromkeys(layers, 1.0)
    if not weights and what == "layers":
        raise ValueError("layers is empty: name at least one layer, e.g. {'conv5_4_pre': 1.0}.")
    return {str(k): float(v) for k, v in weights.items()}


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Unnormalised Gram matrices: (N, C, H, W) -> (N, C, C), G_ij = sum over positions of F_i F_j."""
    flat = features.flatten(2)
    return flat @ flat.transpose(1, 2)


def gatys_style_distance(features: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Gatys et al.'s E_l = sum (G - A)^2 / (4 N^2 M^2) per image, averaged over the batch.

    ``features`` (N, C, H, W) of the image; ``style`` (1 or N, C, H', W') of the style image.
    N_l = C channels, M_l = H*W positions of the image's map (the style map may differ in size;
    its Gram is rescaled to the image's number of positions so that sizes may differ).
    """
    channels, positions = features.shape[1], features.shape[2] * features.shape[3]
    gram = gram_matrix(features)
    target = gram_matrix(style) * (positions / (style.shape[2] * style.shape[3]))
    return ((gram - target) ** 2).sum(dim=(1, 2)).mean() / (4 * channels ** 2 * positions ** 2)


def feature_distance(features: torch.Tensor, target: torch.Tensor, criterion: str) -> torch.Tensor:
    """Mean L1, mean squared or mean (1 - cosine over channels) distance; (N, C, H, W) each -> scalar."""
    target = target.expand_as(features)
    if criterion == "l1":
        return F.l1_loss(features, target)
    if criterion == "l2":
        return F.mse_loss(features, target)
    return (1 - F.cosine_similarity(features, target, dim=1)).mean()


class FrozenFeatures(nn.Module):
    """A frozen backbone with the weights' normalisation in front: RGB [0, 1] (N, 3, H, W) -> {tap: map}.

    Stays in eval mode whatever ``train()`` says (batch-norm statistics never move) and
    holds no trainable parameter; gradients still flow to the input.
    """

    def __init__(self, model: str, taps: Sequence[str], weights: str | os.PathLike | None,
                 width: float | None = None, normalize_input: bool = True) -> None:
        super().__init__()
        self.backbone: VGGBackbone = backbone(model, layers=list(dict.fromkeys(taps)), weights=weights,
                                              width=width, frozen=True)
        self.normalize_input = normalize_input

    def train(self, mode: bool = True) -> "FrozenFeatures":
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, rgb: torch.Tensor) -> dict[str, torch.Tensor]:
        """RGB (N, 3, H, W) -> {tap: (N, C, h, w)}, through the weights' normalisation."""
        if rgb.dim() != 4 or rgb.shape[1] != 3:
            raise ValueError(f"Expected RGB images of shape (N, 3, H, W) in [0, 1], got {tuple(rgb.shape)}.")
        x = self.backbone.preprocess.normalize(rgb) if self.normalize_input else rgb
        return self.backbone(x)

    forward = features

    @torch.no_grad()
    def targets(self, rgb: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of a fixed target image, computed once: pass the dict where a target image goes."""
        return {name: value.detach() for name, value in self.features(rgb).items()}

    def _target_features(self, target: Target) -> Mapping[str, torch.Tensor]:
        return target if isinstance(target, Mapping) else self.targets(target)


class PerceptualLoss(FrozenFeatures):
    """Weighted feature distances between an image and a target at chosen VGG layers.

    ``PerceptualLoss("esrgan")`` or ``PerceptualLoss({"conv3_4": 0.5, "conv5_4_pre": 1.0},
    model="vgg19", criterion="l1")``. Any argument given overrides the preset's.
    ``forward(input, target, style=None)``: input (N, 3, H, W) RGB in [0, 1]; target (1 or N,
    3, H, W) or its ``targets()``; style (1 or N, 3, H', W') for the style term (defaults to
    the target) -> scalar loss. The target is a constant: no gradient flows to it.
    """

    def __init__(self, layers: Layers = "esrgan", model: str | None = None,
                 weights: str | os.PathLike | None = "imagenet", criterion: str | None = None,
                 style_layers: Layers | None = None, style_weight: float | None = None,
                 width: float | None = None, normalize_input: bool = True) -> None:
        if isinstance(layers, str) and layers.lower() in PRESETS:
            preset = PRESETS[layers.lower()]
        elif isinstance(layers, str) and not layers.startswith(("conv", "pool", "fc", "lrn")):
            raise ValueError(f"Unknown perceptual preset {layers!r}; choose from {', '.join(PRESETS)} "
                             f"or give layers, e.g. {{'conv5_4_pre': 1.0}}.")
        else:
            preset = Preset("vgg19", _layer_weights(layers, "layers"), "l1")
        criterion = (criterion or preset.criterion).lower()
        if criterion not in CRITERIA:
            raise ValueError(f"Unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}.")
        content = preset.layers
        style = _layer_weights(style_layers, "style_layers") if style_layers is not None else preset.style_layers
        super().__init__(model or preset.model, [*content, *style], weights, width, normalize_input)
        self.layer_weights, self.style_layer_weights = content, style
        self.criterion = criterion
        if style_weight is None:  # style layers added to a content-only preset weigh 1 unless told
            style_weight = preset.style_weight if preset.style_layers or not style else 1.0
        self.style_weight = float(style_weight)

    def forward(self, input: torch.Tensor, target: Target, style: Target | None = None) -> torch.Tensor:
        features = self.features(input)
        wanted = self._target_features(target)
        loss = sum(w * feature_distance(features[n], wanted[n], self.criterion)
                   for n, w in self.layer_weights.items())
        if self.style_layer_weights:
            styled = wanted if style is None else self._target_features(style)
            loss = loss + self.style_weight * sum(w * gatys_style_distance(features[n], styled[n])
                                                  for n, w in self.style_layer_weights.items())
        return loss


class StyleLoss(FrozenFeatures):
    """Gatys et al.'s style loss: Gram-matrix distances at VGG layers, E_l = sum (G - A)^2 / (4 N^2 M^2).

    ``forward(input, style)``: input (N, 3, H, W) RGB in [0, 1]; style (1 or N, 3, H', W')
    or its ``targets()`` -> scalar sum over layers of weight x E_l. Defaults: VGG19
    ``conv1_1 ... conv5_1``, 1/5 each.
    """

    def __init__(self, layers: Layers | None = None, model: str = "vgg19",
                 weights: str | os.PathLike | None = "imagenet", width: float | None = None,
                 normalize_input: bool = True) -> None:
        weights_by_layer = dict(GATYS_STYLE) if layers is None else _layer_weights(layers, "layers")
        super().__init__(model, list(weights_by_layer), weights, width, normalize_input)
        self.layer_weights = weights_by_layer

    def forward(self, input: torch.Tensor, style: Target) -> torch.Tensor:
        features = self.features(input)
        wanted = self._target_features(style)
        return sum(w * gatys_style_distance(features[n], wanted[n]) for n, w in self.layer_weights.items())
