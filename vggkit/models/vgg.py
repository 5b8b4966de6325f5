"""The VGG module: named layers, a features/head split and the fully-convolutional form.

Every layer carries the paper's (and Caffe's) name, so the state dict reads
``features.conv3_3.weight`` and ``classifier.fc6.weight``. The order of the
modules inside ``features`` is torchvision's (conv, [bn], relu, ..., pool), which
is what makes the index-based torchvision and timm layouts map one to one.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..data.preprocess import IMAGENET, Preprocess
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


# torch.fx and torchvision's create_feature_extractor name a node after the module that made it, but
# strip a trailing ``_N`` from that name (they use ``_N`` to number repeated call sites), so a leaf
# module ``features.relu3_1`` became the node ``features.relu3`` and ``features.relu3_2`` became
# ``features.relu3_1``: a request for relu3_1 silently returned relu3_2. A module FX traces *through*
# records its ops as ``features.relu3_1.relu``, a name whose prefix up to a dot is kept intact, and
# create_feature_extractor matches a request against that prefix. So the paper-named conv, batch-norm
# and ReLU layers below are traced through (FX treats a module as a leaf when its ``__module__`` is
# torch.nn's); the layers without a trailing number (pool1, lrn1, fc6, relu6, drop6, ...) stay leaves.


def _traced_through(conv: nn.Conv2d) -> nn.Conv2d:
    """Mark a ``Conv2d`` (keeping its exact type) for FX to trace through; returns it.

    Not a subclass: ``runtime.fusion`` rewrites exactly ``nn.Conv2d``. Only the instance's
    ``__module__`` changes, which nothing but FX's leaf test (and dynamo's module bookkeeping) reads.
    """
    conv.__module__ = __name__
    return conv


class ReLU(nn.ReLU):
    """``nn.ReLU`` that FX traces through (see above) and that never runs in place in a traced graph.

    In eager mode it is ``nn.ReLU``, in place when asked. In a traced graph it is out of place, so a
    feature extractor returning both a conv's output and its ReLU's returns the conv's as it was.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x, inplace=self.inplace and not isinstance(x, torch.fx.Proxy))


def _batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    # A leaf function for FX: the stock forward checks ``x.dim()`` (control flow a proxy cannot take)
    # and would count the trace itself as a training batch in ``num_batches_tracked``.
    return nn.BatchNorm2d.forward(bn, x)


torch.fx.wrap("_batch_norm")


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that FX traces through, as one call of the stock forward (same train/eval semantics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _batch_norm(self, x)


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


def stage_ends(features: nn.Sequential) -> list[str]:
    """The modules whose outputs are timm's and smp's six VGG taps: the one just before each
    max-pool (each block's output at its own resolution, strides 1 ... 16) and the last pool."""
    names = list(features._modules)
    ends = [names[i - 1] for i, name in enumerate(names) if isinstance(features._modules[name], nn.MaxPool2d)]
    return ends + [names[-1]]


def take_indices(count: int, indices: int | list[int] | tuple[int, ...] | None = None) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``: None -> all of ``count``, an int n -> the last n, a sequence ->
    those (negative from the end). Returns (absolute indices, the largest)."""
    if indices is None:
        indices = count
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {count})")
        taken = list(range(count - indices, count))
    else:
        taken = [count + i if i < 0 else i for i in indices]
        bad = [i for i in taken if not 0 <= i < count]
        if bad or not taken:
            raise ValueError(f"feature index {bad[0] if bad else indices} is out of range (0 to {count - 1})")
    return taken, max(taken)


def timm_data_config(preprocess: Preprocess, num_classes: int) -> dict:
    """A ``Preprocess`` as timm's pretrained_cfg: RGB in [0, 1], ``(x - mean) / std``.

    Caffe's BGR 0-255 transform becomes per-RGB-channel mean/std on the 0-1 scale (mean/255 and
    std/255, reversed): exact up to float rounding. timm cannot express the channel order: its
    transform yields RGB, and such weights need ``x.flip(-3)`` after it (``channel_order`` says so).
    """
    order = slice(None, None, -1) if preprocess.channel_order == "BGR" else slice(None)
    scale = preprocess.pixel_scale
    crop_pct = preprocess.input_size / preprocess.resize_size
    # timm resizes to floor(input_size / crop_pct): step below a ratio that rounds up past the size.
    while math.floor(preprocess.input_size / crop_pct) < preprocess.resize_size:
        crop_pct = math.nextafter(crop_pct, 0.0)
    side = preprocess.input_size
    return {
        "input_size": (3, side, side), "min_input_size": (3, 32, 32), "fixed_input_size": False,
        "interpolation": "bilinear", "crop_pct": crop_pct, "crop_mode": "center",
        "mean": tuple(m / scale for m in preprocess.mean[order]),
        "std": tuple(s / scale for s in preprocess.std[order]),
        "num_classes": num_classes, "channel_order": preprocess.channel_order, "tag": preprocess.name,
        "notes": ("BGR weights: flip the channels of timm's transform output (x.flip(-3))"
                  if preprocess.channel_order == "BGR" else ""),
    }


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
                layers[f"conv{b}_{i}"] = _traced_through(nn.Conv2d(in_channels, channels, kernel,
                                                                    padding=kernel // 2))
                if self.spec.batch_norm:
                    layers[f"bn{b}_{i}"] = BatchNorm2d(channels)
                layers[f"relu{b}_{i}"] = ReLU(inplace=True)
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
                relu6=ReLU(inplace=True),
                drop6=nn.Dropout(dropout),
                fc7=nn.Linear(hidden, hidden),
                relu7=ReLU(inplace=True),
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

    # timm's model API: num_features, head_hidden_size, get_classifier, reset_classifier, pretrained_cfg,
    # forward_features, forward_intermediates, forward_head, so timm's tools take a vggkit model.

    @property
    def num_features(self) -> int:
        """Channels of ``forward_features``' output (pool5), as timm's VGG: 512 * width."""
        return self.feature_channels

    @property
    def head_hidden_size(self) -> int:
        """Width of ``forward_head(pre_logits=True)``: fc8's input (fc7's 4096 * width in the paper's head)."""
        linears = [m for name, m in self.classifier.named_children() if name != "fc8" and isinstance(m, nn.Linear)]
        return linears[-1].out_features if linears else self.feature_channels

    def get_classifier(self) -> nn.Module:
        """The last layer, fc8 (timm's ``head.fc``)."""
        return self.classifier.fc8

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh fc8 of ``num_classes`` outputs, N(0, 0.01) as the paper's; 0 -> identity (the model
        then returns fc7's features). Class names are dropped. ``global_pool`` must stay None: fc6
        reads pool5 average-pooled to 7x7, no global pool (``to_fully_conv(pool="avg")`` is timm's head).
        """
        if global_pool is not None:
            raise ValueError(f"global_pool={global_pool!r}: vggkit's VGG has no global pool to change (fc6 "
                             f"reads pool5 average-pooled to 7x7); leave it None.")
        check_num_classes("num_classes", num_classes, minimum=0)
        reference = next(self.parameters())  # the new layer follows the model's device and dtype
        if num_classes:
            fc8 = nn.Linear(self.head_hidden_size, num_classes, device=reference.device, dtype=reference.dtype)
            nn.init.normal_(fc8.weight, 0.0, 0.01)
            nn.init.zeros_(fc8.bias)
        else:
            fc8 = nn.Identity()
        self.classifier.fc8 = fc8
        self.num_classes = num_classes
        self.class_names = None
        self.weights_info = {**self.weights_info, "fc8": f"new {num_classes}-way layer" if num_classes else "none"}

    @property
    def pretrained_cfg(self) -> dict:
        """timm's pretrained_cfg from this model's own ``preprocess``, so ``timm.data.resolve_data_config(
        model=m)`` gives vggkit's transform (for Caffe weights, in RGB order: see ``timm_data_config``)."""
        cfg = timm_data_config(self.preprocess or IMAGENET, self.num_classes)  # IMAGENET: create_model's default
        cfg.update(architecture=self.name, source="vggkit", url="", pool_size=self.avgpool.output_size,
                   first_conv="features.conv1_1", classifier="classifier.fc8")
        if self.class_names:
            cfg["label_names"] = tuple(self.class_names)
        return cfg

    @property
    def default_cfg(self) -> dict:
        """timm's older name for ``pretrained_cfg``."""
        return self.pretrained_cfg

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> pool5 (N, 512*width, H/32, W/32)."""
        return self.features(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's contract, with timm's six VGG taps: indices 0-4 are the blocks' outputs just before
        each max-pool, (N, C_b, H/2^b, W/2^b) for b = 0..4 (after the ReLU; after lrn1 in A-LRN),
        index 5 is pool5 (``forward_features``' output).

        ``indices``: None -> all, n -> the last n, a list -> those (negative from the end).
        ``norm`` is accepted and unused (VGG has no final norm). ``stop_early`` stops after the
        deepest tap asked for, whose output is then the returned final tensor. Returns
        (final, [taps in forward order]) or, with ``intermediates_only``, the taps.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        ends = stage_ends(self.features)
        taken, deepest = take_indices(len(ends), indices)
        wanted = {ends[i] for i in taken}
        intermediates = []
        for name, module in self.features.named_children():
            x = module(x)
            if name in wanted:
                # Safe without a copy: each tap is followed by a max-pool, which is not in place.
                intermediates.append(x)
            if stop_early and name == ends[deepest]:
                break
        return intermediates if intermediates_only else (x, intermediates)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """pool5 (N, C, h, w) -> logits (N, num_classes), or fc7 (N, 4096) with ``pre_logits``."""
        x = torch.flatten(self.avgpool(x), 1)
        if pre_logits:
            return self.classifier[:-1](x)
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def return_nodes(self, layers: list[str] | tuple[str, ...]) -> dict[str, str]:
        """torchvision's ``create_feature_extractor`` nodes for vggkit layer names: node -> layer.

        ``create_feature_extractor(m, m.return_nodes(["conv3_3", "conv4_3_pre", "fc7"]))`` returns
        {"conv3_3": ..., "conv4_3_pre": ..., "fc7": ...}: ``convB_I`` after its ReLU (node
        ``features.reluB_I``), ``convB_I_pre`` before it (``features.convB_I``, or ``features.bnB_I``
        in ``_bn`` models), ``poolB``, ``lrn1``, ``fc6``/``fc7`` after their ReLU, ``fc8``.
        """
        check_layers(self.spec, list(layers))
        return {tap_module(layer, self.spec.batch_norm): layer for layer in layers}

    def to_fully_conv(self, pool: str | None = None, pad_fc6: bool = False) -> "FullyConvVGG":
        """The paper's dense form (section 3.2), sharing this model's parameters.

        fc6 becomes a 7x7 conv, fc7 and fc8 1x1 convs. Returns a module mapping
        (N, 3, H, W) to class score maps (N, classes, floor(H/32)-6, floor(W/32)-6),
        or to their spatial mean (N, classes) with ``pool="avg"``.
        """
        return FullyConvVGG(self, pool=pool, pad_fc6=pad_fc6).train(self.training)

    def extra_repr(self) -> str:
        return f"config={self.spec.config!r}, batch_norm={self.spec.batch_norm}, width={self.width}"


def _check_pool5(pool5: torch.Tensor, pad_fc6: bool) -> torch.Tensor:
    # A leaf function for FX: the size test is control flow on a shape, so in a traced graph it runs
    # here, on the real tensor; returning pool5 keeps it on the data path, safe from dead-code removal.
    if not pad_fc6 and min(pool5.shape[-2:]) < POOL5_GRID:
        raise ValueError(
            f"The fully-convolutional VGG needs an input of at least 224x224 px "
            f"(pool5 is {tuple(pool5.shape[-2:])}, fc6 is a 7x7 conv); "
            f"rescale the image or use to_fully_conv(pad_fc6=True)."
        )
    return pool5


torch.fx.wrap("_check_pool5")


class FullyConvVGG(nn.Module):
    """The fully-convolutional VGG of the paper's dense evaluation.

    fc6/fc7/fc8 run as convolutions on views of the Linear weights, so training
    or loading either module changes both. ``pad_fc6`` pads fc6 by 3 so the map
    keeps pool5's size (FCN-style use; any input >= 32 px). It traces with torch.fx:
    in ``create_feature_extractor`` the fc6 and fc7 maps (after their ReLU) are the nodes
    ``relu6`` and ``relu7``, the conv layers are named as in ``VGG``.
    """

    def __init__(self, vgg: VGG, pool: str | None = None, pad_fc6: bool = False) -> None:
        super().__init__()
        if pool not in (None, "avg"):
            raise ValueError(f"pool must be None or 'avg', got {pool!r}")
        if not all(isinstance(getattr(vgg.classifier, fc, None), nn.Linear) for fc in ("fc6", "fc7", "fc8")):
            raise ValueError("The dense form needs the paper's classifier (fc6, fc7, fc8 Linear layers); this model "
                             "has another head or none (reset_classifier(0)).")
        self.features = vgg.features
        self.fc6, self.fc7, self.fc8 = vgg.classifier.fc6, vgg.classifier.fc7, vgg.classifier.fc8
        # Parameterless, so the state dict is unchanged: they give the fc6/fc7 maps FX node names.
        self.relu6, self.relu7 = ReLU(), ReLU()
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
        columns = F.unfold(pool5, POOL5_GRID, padding=padding)  # (N, C*49, L), Linear's flatten order
        out = torch.matmul(self.fc6.weight, columns) + self.fc6.bias[:, None]
        # Sizes read one by one (no tuple unpacking), so that FX records them rather than iterating a proxy.
        side = 2 * padding - POOL5_GRID + 1
        return out.view(pool5.shape[0], -1, pool5.shape[-2] + side, pool5.shape[-1] + side)

    def fc_maps(self, pool5: torch.Tensor) -> dict[str, torch.Tensor]:
        """pool5 (N, C, h, w) -> {"fc6", "fc7", "fc8"} maps of (N, *, h-6, w-6) (h, w with ``pad_fc6``)."""
        pool5 = _check_pool5(pool5, self.pad_fc6)
        hidden = self.fc7.in_features
        fc6 = self.relu6(self.fc6_map(pool5))
        fc7 = self.relu7(F.conv2d(F.dropout(fc6, self.dropout, self.training),
                                  self.conv_weight(self.fc7, hidden, 1), self.fc7.bias))
        fc8 = F.conv2d(F.dropout(fc7, self.dropout, self.training),
                       self.conv_weight(self.fc8, hidden, 1), self.fc8.bias)
        return {"fc6": fc6, "fc7": fc7, "fc8": fc8}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.fc_maps(self.features(x))["fc8"]
        return scores.mean(dim=(2, 3)) if self.pool == "avg" else scores


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
