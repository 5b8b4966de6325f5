"""vggkit's VGG as a segmentation_models_pytorch encoder.

One line registers every vggkit VGG with smp (which stays optional: this module imports without it)::

    vggkit.models.smp_encoder.register()
    unet = smp.Unet("vggkit_vgg16", encoder_weights=None, classes=2)
    unet.encoder.load_vgg(vggkit.create_model("vgg16", weights="imagenet"))  # any vggkit weight source

``encoder_weights`` must be None: smp fetches any other value from the Hugging Face hub, where vggkit's
weights are not; ``load_vgg`` copies them from a vggkit model instead (and keeps its ``preprocess``).
The encoder gives smp's own VGG features (the tensor before each max-pool, and pool5), and the names
begin with "vgg", which is what makes smp's Unet and Unet++ add their VGG centre block.
"""

from __future__ import annotations

import torch
from torch import nn

from .configs import ALIASES, resolve
from .vgg import VGG, init_parameters, scaled, stage_ends

MODEL_NAMES = tuple(name for alias in ALIASES for name in (alias, alias + "_bn"))


class VGGEncoder(nn.Module):
    """A vggkit VGG's conv layers with smp's encoder contract.

    (N, C, H, W) -> ``depth + 1`` features, as smp's VGG encoder: the tensors just before pool1 ...
    pool5, (N, 64w, H, W) ... (N, 512w, H/16, W/16), then pool5 (N, 512w, H/32, W/32) (w = width).
    State-dict keys are vggkit's (``features.conv1_1.weight``), weights random (``init``) until
    ``load_vgg``.
    """

    _is_torch_scriptable = False  # the paper-named layers trace with torch.fx; TorchScript is not supported
    _is_torch_exportable = True
    _is_torch_compilable = True

    def __init__(self, name: str = "vgg16", depth: int = 5, output_stride: int = 32, width: float = 1.0,
                 init: str = "kaiming") -> None:
        super().__init__()
        if not 1 <= depth <= 5:
            raise ValueError(f"{type(self).__name__} depth should be in range [1, 5], got {depth}")
        spec = resolve(name)
        with torch.device("meta"):  # only the conv layers are kept: skip allocating fc6 (102M weights at width 1)
            vgg = VGG(spec, width=width, init=init)
        self.features = vgg.features.to_empty(device="cpu")
        init_parameters(self.features, init)
        self.spec, self.width, self.preprocess = spec, width, None
        self._taps = stage_ends(self.features)
        self._depth, self._in_channels, self._output_stride = depth, 3, output_stride
        channels = [scaled(block[-1][0], width) for block in spec.blocks]
        self._out_channels = channels + [channels[-1]]

    @property
    def out_channels(self) -> list[int]:
        """Channels of each returned feature."""
        return self._out_channels[: self._depth + 1]

    @property
    def output_stride(self) -> int:
        return min(self._output_stride, 2 ** self._depth)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for name, module in self.features.named_children():
            x = module(x)
            if name in self._taps:
                features.append(x)  # the next layer is a max-pool (not in place) or there is none
                if len(features) > self._depth:
                    break
        return features

    def load_vgg(self, vgg: VGG) -> "VGGEncoder":
        """Copy ``vgg``'s conv weights (same configuration and width; from any vggkit weight source) and
        its ``preprocess``; a first conv already set to other input channels is adapted as smp does."""
        in_channels = self.features.conv1_1.in_channels
        if in_channels != 3:
            first = self.features.conv1_1
            first.in_channels = 3
            first.weight = nn.Parameter(torch.empty_like(vgg.features.conv1_1.weight, device=first.weight.device))
        self.features.load_state_dict(vgg.features.state_dict())
        if in_channels != 3:
            self.set_in_channels(in_channels, pretrained=True)
        self.preprocess = vgg.preprocess
        return self

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        """smp's first-conv patch for ``in_channels`` inputs (called by smp with ``in_channels``)."""
        if in_channels == 3:
            return
        from segmentation_models_pytorch.encoders._utils import patch_first_conv

        self._in_channels = in_channels
        patch_first_conv(model=self, new_in_channels=in_channels, pretrained=pretrained)

    def make_dilated(self, *args, **kwargs) -> None:
        raise ValueError("'VGG' models do not support dilated mode due to Max Pooling operations for downsampling!")


def register(prefix: str = "vggkit_", width: float = 1.0) -> list[str]:
    """Add ``prefix + name`` for every vggkit model (vgg11 ... vgg19, ``_bn``, vgg11_lrn, vgg16c) to smp's
    encoders; returns the names. ``width`` scales every layer (tiny encoders for tests)."""
    if not prefix.startswith("vgg"):
        raise ValueError(f"prefix {prefix!r} must start with 'vgg': smp's Unet and Unet++ add their VGG centre "
                         f"block only to encoders whose name does.")
    try:
        from segmentation_models_pytorch.encoders import encoders
    except ImportError as error:
        raise ImportError("vggkit's smp encoders need segmentation-models-pytorch: "
                          "pip install segmentation-models-pytorch") from error
    names = [prefix + name for name in MODEL_NAMES]
    for name, model in zip(names, MODEL_NAMES):
        encoders[name] = {"encoder": VGGEncoder, "pretrained_settings": {}, "params": {"name": model, "width": width}}
    return names
