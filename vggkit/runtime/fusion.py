"""Inference-only rewrites of a module copy for the CPU: batch norm folded into its conv, and conv + ReLU
run as one oneDNN call on weights packed once.

In eager PyTorch every CPU convolution reorders its weights into oneDNN's blocked
layout on each call and runs the ReLU as a second pass over memory; with the
weights packed ahead of time for the input's shape and the ReLU as a post-op,
those costs go (the same rewrite ``torch.compile``'s freezing makes, without
the compile time). The rewrites keep every module's name, so layer taps by name
(``features.relu3_3``) still read the same tensors.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

PACKED_SHAPES = 4  # packed weights kept per conv: one per recent input shape


def onednn_available() -> bool:
    """True where this PyTorch build has oneDNN's fused convolution op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class PackedConv2d(nn.Conv2d):
    """A float32 CPU ``Conv2d`` (optionally with the ReLU after it) as one oneDNN call on pre-packed weights.

    (N, C, H, W) -> (N, C', H', W'), the same as the conv (and ReLU) it replaces.
    Weights are packed on the first call with each input shape and kept for the
    last ``PACKED_SHAPES`` shapes. Anything else (another device or dtype, autograd)
    runs the ordinary convolution.
    """

    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        self.weight, self.bias = conv.weight, conv.bias
        self.relu = relu
        self._packed: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()

    def __getstate__(self) -> dict:
        # Packed oneDNN tensors have no storage to copy or save; a copy packs its own on first use.
        state = dict(self.__dict__)
        state["_packed"] = OrderedDict()
        return state

    def _packed_weight(self, shape: tuple[int, ...]) -> torch.Tensor:
        packed = self._packed.pop(shape, None)
        if packed is None:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self.weight.detach().to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation),
                self.groups, list(shape))
            while len(self._packed) >= PACKED_SHAPES:
                self._packed.popitem(last=False)
        self._packed[shape] = packed  # most recent last
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = (x.device.type == "cpu" and x.dtype == torch.float32 == self.weight.dtype and x.dim() == 4
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)))
        if not fast:
            out = super().forward(x)
            return torch.relu(out) if self.relu else out
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed_weight(tuple(x.shape)), None if self.bias is None else self.bias.detach(),
            list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "relu" if self.relu else "none", [], "")

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")


def _fusable(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def fuse_for_cpu(model: nn.Module) -> nn.Module:
    """Rewrite an eval-mode copy in place: in every ``nn.Sequential``, conv [+ batch norm] [+ ReLU]
    becomes one ``PackedConv2d`` under the conv's name; the batch norm and ReLU slots
    become ``nn.Identity`` under their own names. Returns ``model``.
    """
    if not onednn_available():
        return model
    for sequential in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = [name for name, _ in sequential.named_children()]
        for i, name in enumerate(names):
            conv = sequential._modules[name]
            if not _fusable(conv):
                continue
            follow = names[i + 1:i + 3]
            if follow and isinstance(sequential._modules[follow[0]], nn.BatchNorm2d):
                conv = fuse_conv_bn_eval(conv, sequential._modules[follow[0]])
                sequential._modules[follow[0]] = nn.Identity()
                follow = follow[1:]
            # A ReLU whose input is a pre-activation tap (backbone.TappedReLU) stays a separate module.
            relu = (bool(follow) and isinstance(sequential._modules[follow[0]], nn.ReLU)
                    and not getattr(sequential._modules[follow[0]], "keeps_input", False))
            if relu:
                sequential._modules[follow[0]] = nn.Identity()
            sequential._modules[name] = PackedConv2d(conv, relu)
    return model
