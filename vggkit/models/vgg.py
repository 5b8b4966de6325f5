"""The VGG module: named layers, a features/head split and the fully-convolutional form.

Every layer carries the paper's (and Caffe's) name, so the state dict reads
``features.conv3_3.weight`` and ``classifier.fc6.weight``. The order of the
modules inside ``features`` is torchvision's (conv, [bn], relu, ..., pool), which
is what makes the index-based torchvision and timm layouts map one to one.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.checks import check_num_classes, check_width
from .configs import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, PRE_ACTIVATION, ModelSpec, layer_names, resolve, tap_names


FC_HIDDEN = 4096


POOL5_GRID = 7  # fc6 sees a 7x7 window of pool5: the 224 px training crop over stride 32


def scaled(channels: int, width: float) -> int:
    """Channels after the ``width`` multiplier; at least one."""
    return max(1, int(round(channels * width)))


def alexnet_lrn() -> nn.LocalResponseNorm:
    """AlexNet's LRN (Krizhevsky et al. 2012, section 3.3), as used by config A-LRN.

    b = a / (k + alpha * sum_{5 neighbours} a^2) ** beta with k=2, alpha=1e-4, beta=0.75.
    PyTorch divides alpha by the window size, so it is given ``alpha * size``.
    """
    return nn.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA * LRN_SIZE, beta=LRN_BETA, k=LRN_K)


def tap_module(layer: str, batch_norm: bool = False) -> str:
    """The module whose output is the named layer: a conv layer is read after its ReLU, its
    ``_pre`` form at the ReLU's input (the conv, or its batch norm in ``_bn`` models)."""
    if layer.endswith(PRE_ACTIVATION):
        return "features." + ("bn" if batch_norm else "conv") + layer[len("conv") : -len(PRE_ACTIVATION)]
    if layer.startswith("conv"):
        return "features.relu" + layer[len("conv") :]
    if layer in ("fc6", "fc7"):
        return "classifier.relu" + layer[2:]
    if layer == "fc8":
        return "classifier.fc8"
    return "features." + layer


def check_layers(name: str | ModelSpec, layers: list[str]) -> None:
    """Raise ``ValueError`` listing the valid names if any of ``layers`` is unknown."""
    valid = tap_names(name)
    unknown = [layer for layer in layers if layer not in valid]
    if unknown:
        raise ValueError(
            f"Unknown layer name(s) {unknown} for {resolve(name).name}. Valid layers: {', '.join(valid)}."
        )


INITS = ("kaiming", "paper", "glorot")


def init_parameters(module: nn.Module, init: str = "kaiming", linear_like: tuple[nn.Conv2d, ...] = ()) -> None:
    """Initialise every conv, linear and batch-norm layer inside ``module``.

    ``"kaiming"``: He normal convs and N(0, 0.01) linears, as torchvision (trains from
    scratch); ``"paper"``: N(0, 0.01) everywhere, biases 0 (section 3.1, net A);
    ``"glorot"``: Glorot uniform, biases 0 (the paper's note on training without
    pre-initialisation). Convs in ``linear_like`` (fc6/fc7 held as convs) are
    initialised as the Linear layers they stand for.
    """
    if init not in INITS:
        raise ValueError(f"Unknown init {init!r}: use 'kaiming', 'paper' or 'glorot'.")
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            as_linear = isinstance(layer, nn.Linear) or any(layer is c for c in linear_like)
            weight = layer.weight.view(layer.weight.shape[0], -1) if as_linear else layer.weight
            with torch.no_grad():
                if init == "glorot":
                    nn.init.xavier_uniform_(weight)
                elif init == "kaiming" and not as_linear:
                    nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.normal_(weight, 0.0, 0.01)
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            layer.reset_parameters()  # weight 1, bias 0, and fresh running statistics


class VGG(nn.Module):
    """A VGG network of Table 1.

    Input (N, 3, H, W) with H, W >= 32; output logits (N, num_classes). An adaptive
    average pool to 7x7 before fc6 (as torchvision) lets any input size through
    the fully-connected form; at 224x224 it is the identity.
    """

    def __init__(
        self,
        name: str | ModelSpec = "vgg16",
        num_classes: int = 1000,
        dropout: float = 0.5,
        width: float = 1.0,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        self.spec = resolve(name)
        width = check_width("width", width)
        check_num_classes("num_classes", num_classes)
        self.num_classes = num_classes
        self.dropout = dropout
        self.width = width
        self.preprocess = None  # set by create_model to the weights' own Preprocess
        self.class_names: list[str] | None = None
        self.weights_info: dict = {"source": "random init"}

        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_channels = 3
        for b, block in enumerate(self.spec.blocks, start=1):
            for i, (channels, kernel) in enumerate(block, start=1):
                channels = scaled(channels, width)
                layers[f"conv{b}_{i}"] = nn.Conv2d(in_channels, channels, kernel, padding=kernel // 2)
                if self.spec.batch_norm:
                    layers[f"bn{b}_{i}"] = nn.BatchNorm2d(channels)
                layers[f"relu{b}_{i}"] = nn.ReLU(inplace=True)
                in_channels = channels
            if b == 1 and self.spec.lrn:
                layers["lrn1"] = alexnet_lrn()
            layers[f"pool{b}"] = nn.MaxPool2d(kernel_size=2, stride=2)
        self.features = nn.Sequential(layers)
        self.feature_channels = in_channels
        self.avgpool = nn.AdaptiveAvgPool2d((POOL5_GRID, POOL5_GRID))
        hidden = scaled(FC_HIDDEN, width)
        self.classifier = nn.Sequential(
            OrderedDict(
                fc6=nn.Linear(in_channels * POOL5_GRID * POOL5_GRID, hidden),
                relu6=nn.ReLU(inplace=True),
                drop6=nn.Dropout(dropout),
                fc7=nn.Linear(hidden, hidden),
                relu7=nn.ReLU(inplace=True),
                drop7=nn.Dropout(dropout),
                fc8=nn.Linear(hidden, num_classes),
            )
        )
        self.reset_parameters(init)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def layer_names(self) -> list[str]:
        return layer_names(self.spec)

    def reset_parameters(self, init: str = "kaiming") -> None:
        """Initialise all weights (see ``init_parameters``)."""
        init_parameters(self, init)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> pool5 (N, 512*width, H/32, W/32)."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """pool5 (N, C, h, w) -> logits (N, num_classes), or fc7 (N, 4096) with ``pre_logits``."""
        x = torch.flatten(self.avgpool(x), 1)
        if pre_logits:
            return self.classifier[:-1](x)
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def to_fully_conv(self, pool: str | None = None, pad_fc6: bool = False) -> "FullyConvVGG":
        """The paper's dense form (section 3.2), sharing this model's parameters.

        fc6 becomes a 7x7 conv, fc7 and fc8 1x1 convs. Returns a module mapping
        (N, 3, H, W) to class score maps (N, classes, floor(H/32)-6, floor(W/32)-6),
        or to their spatial mean (N, classes) with ``pool="avg"``.
        """
        return FullyConvVGG(self, pool=pool, pad_fc6=pad_fc6).train(self.training)

    def extra_repr(self) -> str:
        return f"config={self.spec.config!r}, batch_norm={self.spec.batch_norm}, width={self.width}"


class FullyConvVGG(nn.Module):
    """The fully-convolutional VGG of the paper's dense evaluation.

    fc6/fc7/fc8 run as convolutions on views of the Linear weights, so training
    or loading either module changes both. ``pad_fc6`` pads fc6 by 3 so the map
    keeps pool5's size (FCN-style use; any input >= 32 px).
    """

    def __init__(self, vgg: VGG, pool: str | None = None, pad_fc6: bool = False) -> None:
        super().__init__()
        if pool not in (None, "avg"):
            raise ValueError(f"pool must be None or 'avg', got {pool!r}")
        self.features = vgg.features
        self.fc6, self.fc7, self.fc8 = vgg.classifier.fc6, vgg.classifier.fc7, vgg.classifier.fc8
        self.feature_channels = vgg.feature_channels
        self.dropout = vgg.dropout
        self.pool = pool
        self.pad_fc6 = pad_fc6
        self.preprocess = vgg.preprocess
        self.class_names = vgg.class_names
        self.num_classes = vgg.num_classes
        self.spec = vgg.spec

    def conv_weight(self, fc: nn.Linear, in_channels: int, kernel: int) -> torch.Tensor:
        """A Linear weight (out, in*k*k) viewed as a conv weight (out, in, k, k)."""
        return fc.weight.view(fc.out_features, in_channels, kernel, kernel)

    def fc6_map(self, pool5: torch.Tensor) -> torch.Tensor:
        """fc6 as a 7x7 conv: pool5 (N, C, h, w) -> (N, 4096, h-6, w-6), before its ReLU.

        Computed as im2col + one GEMM with the Linear weight: on the CPU this runs
        at matmul speed, where a 7x7 conv over 512 channels of a small map does not.
        """
        padding = 3 if self.pad_fc6 else 0
        n, _, h, w = pool5.shape
        columns = F.unfold(pool5, POOL5_GRID, padding=padding)  # (N, C*49, L), Linear's flatten order
        out = torch.matmul(self.fc6.weight, columns) + self.fc6.bias[:, None]
        return out.view(n, -1, h + 2 * padding - POOL5_GRID + 1, w + 2 * padding - POOL5_GRID + 1)

    def fc_maps(self, pool5: torch.Tensor) -> dict[str, torch.Tensor]:
        """pool5 (N, C, h, w) -> {"fc6", "fc7", "fc8"} maps of (N, *, h-6, w-6) (h, w with ``pad_fc6``)."""
        if not self.pad_fc6 and min(pool5.shape[-2:]) < POOL5_GRID:
            raise ValueError(
                f"The fully-convolutional VGG needs an input of at least 224x224 px "
                f"(pool5 is {tuple(pool5.shape[-2:])}, fc6 is a 7x7 conv); "
                f"rescale the image or use to_fully_conv(pad_fc6=True)."
            )
        hidden = self.fc7.in_features
        fc6 = F.relu(self.fc6_map(pool5))
        fc7 = F.relu(F.conv2d(F.dropout(fc6, self.dropout, self.training),
                              self.conv_weight(self.fc7, hidden, 1), self.fc7.bias))
        fc8 = F.conv2d(F.dropout(fc7, self.dropout, self.training),
                       self.conv_weight(self.fc8, hidden, 1), self.fc8.bias)
        return {"fc6": fc6, "fc7": fc7, "fc8": fc8}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.fc_maps(self.features(x))["fc8"]
        return scores.mean(dim=(2, 3)) if self.pool == "avg" else scores


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
