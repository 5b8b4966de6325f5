"""Named multi-layer features (FCN-style use) with ``feature_info``."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configs import PRE_ACTIVATION, activation_of, layer_names, tap_names
from .receptive_field import receptive_field
from .vgg import POOL5_GRID, VGG, check_layers, tap_module


@dataclass(frozen=True)
class FeatureInfo:
    """What a tapped layer gives: channels, stride and receptive field in input pixels."""

    name: str
    channels: int
    stride: int
    receptive_field: int


class VGGBackbone(nn.Module):
    """VGG features at named layers: (N, 3, H, W) -> OrderedDict name -> (N, C, H/stride, W/stride).

    Holds only the layers up to the deepest one asked for. ``fc6``/``fc7`` run as convs
    (7x7, 1x1) on pool5; with ``pad_fc6`` fc6 is padded by 3 so it keeps pool5's size
    and any input >= 32 px works.
    """

    def __init__(self, vgg: VGG, layers: list[str], frozen: bool = False, pad_fc6: bool = False) -> None:
        super().__init__()
        check_layers(vgg.spec, layers)
        if "fc8" in layers:
            raise ValueError("fc8 is the classifier, not a feature: use model.to_fully_conv() for class score maps.")
        order = tap_names(vgg.spec)
        self.layers = sorted(layers, key=order.index)
        self.spec = vgg.spec
        self.preprocess = vgg.preprocess
        self.pad_fc6 = pad_fc6
        bn = vgg.spec.batch_norm
        # Module name -> layer name, for the conv/pool taps inside `features`.
        self._taps = {tap_module(n, bn).split(".", 1)[1]: n for n in self.layers if not n.startswith("fc")}
        deepest = max(self.layers, key=order.index)
        names = [n for n, _ in vgg.features.named_children()]
        last = len(names) if deepest.startswith("fc") else names.index(tap_module(deepest, bn).split(".", 1)[1]) + 1
        self.features = nn.Sequential(OrderedDict(list(vgg.features.named_children())[:last]))
        for layer in self.layers:
            # A pre-activation tap keeps the ReLU's input, so that ReLU must not overwrite it.
            relu = "relu" + layer[len("conv"):-len(PRE_ACTIVATION)]
            if layer.endswith(PRE_ACTIVATION) and relu in self.features._modules:
                self.features._modules[relu] = TappedReLU()
        self.fc6 = self.fc7 = None
        wants_fc7 = "fc7" in self.layers
        if "fc6" in self.layers or wants_fc7:
            self.fc6 = _linear_as_conv(vgg.classifier.fc6, vgg.feature_channels, POOL5_GRID,
                                       padding=3 if pad_fc6 else 0)
        if wants_fc7:
            self.fc7 = _linear_as_conv(vgg.classifier.fc7, vgg.classifier.fc7.in_features, 1)
        rf = receptive_field(vgg.spec)
        channels = _channels(vgg)
        # A pre-activation tap has its conv's channels, stride and receptive field (the ReLU is pointwise).
        self.feature_info = OrderedDict(
            (n, FeatureInfo(n, channels[activation_of(n)], rf[activation_of(n)].stride,
                            rf[activation_of(n)].receptive_field)) for n in self.layers)
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, module in self.features.named_children():
            x = module(x)
            if name in self._taps:
                # Safe to keep without a copy: in-place ReLUs act on a conv's fresh output, and the
                # ReLU after a pre-activation tap is a TappedReLU (out of place).
                out[self._taps[name]] = x
        if self.fc6 is not None:
            x = F.relu(self.fc6(x))
            if "fc6" in self.layers:
                out["fc6"] = x
            if self.fc7 is not None:
                out["fc7"] = F.relu(self.fc7(x))
        return OrderedDict((n, out[n]) for n in self.layers)

    def channels(self) -> list[int]:
        return [info.channels for info in self.feature_info.values()]

    def strides(self) -> list[int]:
        return [info.stride for info in self.feature_info.values()]


class TappedReLU(nn.ReLU):
    """A ReLU whose input is read as a pre-activation tap: never in place, never fused into its conv."""

    keeps_input = True

    def __init__(self) -> None:
        super().__init__(inplace=False)


def _linear_as_conv(fc: nn.Linear, in_channels: int, kernel: int, padding: int = 0) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, fc.out_features, kernel, padding=padding, device=fc.weight.device)
    with torch.no_grad():
        conv.weight.copy_(fc.weight.view_as(conv.weight))
        conv.bias.copy_(fc.bias)
    return conv


def _channels(vgg: VGG) -> dict[str, int]:
    channels: dict[str, int] = {}
    current = 3
    for name, module in vgg.features.named_children():
        if isinstance(module, nn.Conv2d):
            current = module.out_channels
        channels[name] = current
    out = {n: channels[tap_module(n).split(".", 1)[1]] for n in layer_names(vgg.spec) if not n.startswith("fc")}
    out["fc6"] = out["fc7"] = vgg.classifier.fc6.out_features
    out["fc8"] = vgg.num_classes
    return out
