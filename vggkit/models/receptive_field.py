"""Receptive fields: analytic for every named layer, and effective by gradients.

The analytic recursion (Araujo et al. 2019): a layer with kernel k, stride s and
padding p turns (rf, stride, padding) into
(rf + (k-1) * stride, stride * s, padding + p * stride), all in input pixels.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .configs import resolve


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field size, effective stride and effective padding of a unit, in input pixels."""

    receptive_field: int
    stride: int
    padding: int

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """The input window (top, left, bottom, right), exclusive end, of unit (row, col); may extend past the image."""
        top = row * self.stride - self.padding
        left = col * self.stride - self.padding
        return top, left, top + self.receptive_field, left + self.receptive_field


def _grow(rf: ReceptiveField, kernel: int, stride: int, padding: int) -> ReceptiveField:
    return ReceptiveField(rf.receptive_field + (kernel - 1) * rf.stride, rf.stride * stride,
                          rf.padding + padding * rf.stride)


def receptive_field(name: str) -> "OrderedDict[str, ReceptiveField]":
    """Every named layer of a configuration -> its ``ReceptiveField``; fc6-fc8 as the dense convs.

    >>> receptive_field("vgg16")["pool5"]
    ReceptiveField(receptive_field=212, stride=32, padding=90)
    """
    spec = resolve(name)
    rf = ReceptiveField(1, 1, 0)
    table: OrderedDict[str, ReceptiveField] = OrderedDict()
    for b, block in enumerate(spec.blocks, start=1):
        for i, (_, kernel) in enumerate(block, start=1):
            rf = _grow(rf, kernel, 1, kernel // 2)
            table[f"conv{b}_{i}"] = rf
        if b == 1 and spec.lrn:
            table["lrn1"] = rf  # LRN mixes channels, not positions
        rf = _grow(rf, 2, 2, 0)
        table[f"pool{b}"] = rf
    table["fc6"] = rf = _grow(rf, 7, 1, 0)
    table["fc7"] = table["fc8"] = rf
    return table


def stack_receptive_field(kernel: int, depth: int) -> int:
    """A stack of ``depth`` stride-1 convs of size ``kernel`` sees ``depth * (kernel - 1) + 1`` pixels."""
    return depth * (kernel - 1) + 1


def effective_receptive_field(module: nn.Module, image: torch.Tensor, position: tuple[int, int] | None = None,
                              channel: int | None = None) -> torch.Tensor:
    """The effective receptive field (Luo et al. 2016) of one unit of ``module``'s output.

    ``module`` maps (1, 3, H, W) to a tensor (1, C, h, w) (e.g. a backbone truncated at a
    layer); ``image`` is (3, H, W) or (1, 3, H, W). Returns |d unit / d input| summed over
    colour channels, (H, W), normalised to max 1. ``position`` is the unit's (row, col) in
    the output map (default: centre); ``channel`` None sums all channels.
    """
    x = (image if image.dim() == 4 else image.unsqueeze(0)).detach().clone().float().requires_grad_(True)
    was_training = module.training
    module.eval()
    try:
        with torch.enable_grad():
            out = module(x)
            if isinstance(out, dict):
                out = list(out.values())[-1]
            h, w = out.shape[-2:]
            row, col = position if position is not None else (h // 2, w // 2)
            if not (0 <= row < h and 0 <= col < w):
                raise ValueError(f"Unit position {(row, col)} is outside the {h}x{w} output map.")
            unit = out[0, :, row, col] if channel is None else out[0, channel, row, col]
            (grad,) = torch.autograd.grad(unit.sum(), x)
    finally:
        module.train(was_training)
    heat = grad[0].abs().sum(0)
    return heat / heat.max().clamp_min(1e-12)
