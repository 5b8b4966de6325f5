"""Section 2.3 of the paper: a stack of 3x3 convs against one large conv of the same reach.

n stacked 3x3 convs (stride 1) see 2n+1 pixels, as one (2n+1)x(2n+1) conv does, with
9nC^2 instead of (2n+1)^2 C^2 weights (27C^2 vs 49C^2 for n=3) and n ReLUs instead of
one. This module gives both the analytic costs and the same numbers measured on real
PyTorch modules.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..runtime.engine import optimize
from .receptive_field import stack_receptive_field
from .vgg import count_parameters


def conv_stack(channels: int, kernel: int, depth: int) -> nn.Sequential:
    """``depth`` x (Conv2d(channels, channels, kernel, stride 1, 'same' padding) + ReLU): (N, C, H, W) -> same shape."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, kernel, padding=kernel // 2), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class StackDesign:
    """One way to reach a receptive field: ``depth`` convs of ``kernel`` x ``kernel``, C channels in and out."""

    kernel: int
    depth: int
    channels: int

    @property
    def label(self) -> str:
        return f"{self.depth} x conv{self.kernel}x{self.kernel}"

    @property
    def receptive_field(self) -> int:
        return stack_receptive_field(self.kernel, self.depth)

    @property
    def weights(self) -> int:
        """Convolution weights, biases excluded: depth * kernel^2 * C^2 (the paper's count)."""
        return self.depth * self.kernel**2 * self.channels**2

    @property
    def weights_formula(self) -> str:
        per_layer = self.kernel**2
        if self.depth == 1:
            return f"{per_layer}C²"
        return f"{self.depth}·{per_layer}C² = {self.depth * per_layer}C²"

    @property
    def parameters(self) -> int:
        """Weights plus one bias per output channel and layer: what ``count_parameters`` finds."""
        return self.weights + self.depth * self.channels

    def multiply_adds(self, size: int) -> int:
        """Multiply-adds on a (C, size, size) input; 'same' padding keeps every map size x size."""
        return self.weights * size * size

    @property
    def nonlinearities(self) -> int:
        return self.depth

    def module(self) -> nn.Sequential:
        return conv_stack(self.channels, self.kernel, self.depth)


def compared_designs(channels: int, depth: int) -> tuple[StackDesign, StackDesign]:
    """The paper's pair: ``depth`` stacked 3x3 convs and the single conv of the same receptive field."""
    if channels < 1 or depth < 1:
        raise ValueError(f"channels and depth must be >= 1, got channels={channels}, depth={depth}.")
    stack = StackDesign(kernel=3, depth=depth, channels=channels)
    single = StackDesign(kernel=stack.receptive_field, depth=1, channels=channels)
    return stack, single


def stack_cost_rows(channels: int, depth: int, size: int) -> list[dict]:
    """The analytic comparison, one dict per design: receptive field, weights, multiply-adds, non-linearities."""
    rows = []
    for design in compared_designs(channels, depth):
        rows.append({
            "design": design.label,
            "receptive field (px)": design.receptive_field,
            "weights": f"{design.weights_formula} = {design.weights:,}",
            f"multiply-adds at {size}x{size}": f"{design.multiply_adds(size):,}",
            "non-linearities (ReLU)": design.nonlinearities,
        })
    return rows


def measured_receptive_field(module: nn.Module, channels: int) -> int:
    """The receptive field of ``module``'s centre output unit, found by back-propagation.

    Weights are made positive and the input is all ones on a copy, so every ReLU passes
    and no gradient cancels: the gradient is non-zero exactly on the receptive field.
    """
    probe = copy.deepcopy(module).float().eval()
    with torch.no_grad():
        for parameter in probe.parameters():
            parameter.abs_().add_(1e-3)
    kernel_reach = sum(m.kernel_size[0] - 1 for m in probe.modules() if isinstance(m, nn.Conv2d))
    size = 2 * kernel_reach + 1  # the whole receptive field of the centre fits inside
    x = torch.ones(1, channels, size, size, requires_grad=True)
    out = probe(x)
    centre = out.shape[-1] // 2
    (grad,) = torch.autograd.grad(out[0, :, centre, centre].sum(), x)
    seen_columns = grad[0].abs().sum(dim=(0, 1)) > 0
    return int(seen_columns.sum())


def time_forward(module: nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    """Median seconds of one inference forward of ``module`` on ``x`` (after one warm-up run)."""
    module(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_designs(channels: int, depth: int, size: int, repeats: int = 5) -> list[dict]:
    """Both designs built as PyTorch modules: parameters counted, receptive field measured, forward timed.

    Timing runs through ``vggkit.runtime.engine.optimize`` (this machine's inference setting) on a
    (1, C, size, size) input; it is a measurement on this machine, not a constant.
    """
    x = torch.randn(1, channels, size, size)
    rows = []
    for design in compared_designs(channels, depth):
        module = design.module()
        fast = optimize(module, backend="torch")
        seconds = time_forward(fast, x, repeats)
        rows.append({
            "module": design.label,
            "parameters (counted)": f"{count_parameters(module):,}",
            "receptive field (measured, px)": measured_receptive_field(module, channels),
            f"forward at {size}x{size} (ms)": round(seconds * 1e3, 2),
            "runtime": fast.runtime.describe(),
        })
    return rows
