"""The input transform that travels with a set of weights.

torchvision and timm releases expect RGB in [0, 1] normalised by the ImageNet
mean/std; the original Caffe release expects BGR in 0-255 with the Caffe mean
subtracted. A ``Preprocess`` knows which, so a user never has to.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torchvision.transforms import functional as TF

from .images import rescale_shortest

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shortest side to ``resize_size``, centre-crop ``input_size``, normalise.

    ``mean``/``std`` are in the weights' own channel order and pixel scale:
    ``channel_order="BGR"`` and ``pixel_scale=255`` for the Caffe release.
    Call on a PIL image -> (3, input_size, input_size) float32 tensor.
    """

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    pixel_scale: float = 1.0
    name: str = "imagenet"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = rescale_shortest(image.convert("RGB"), self.resize_size)  # checks vggkit's pixel limit
        image = TF.center_crop(image, self.input_size)
        return self.normalize(TF.to_tensor(image))

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1], (3, H, W) or (N, 3, H, W) -> the network's input, same shape."""
        x = rgb.flip(-3) if self.channel_order == "BGR" else rgb
        x = x * self.pixel_scale
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of ``normalize``: the network's input -> RGB in [0, 1]."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        rgb = (x * std + mean) / self.pixel_scale
        return rgb.flip(-3) if self.channel_order == "BGR" else rgb

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocess":
        values = dict(values)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)


IMAGENET = Preprocess()


CAFFE = Preprocess(mean=CAFFE_MEAN_BGR, std=(1.0, 1.0, 1.0), channel_order="BGR", pixel_scale=255.0, name="caffe")
