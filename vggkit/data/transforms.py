"""The paper's image transforms: training's scale jittering, random 224 crop, flip and PCA colour shift
(Sec. 3.1), and evaluation's rescale to Q with a centre crop. PIL in, float tensors (3, H, W) out.
"""

from __future__ import annotations

import math
import random

import torch
from PIL import Image
from torchvision.transforms import functional as TF

from .images import check_rescaled, rescale_shortest
from .preprocess import IMAGENET

# AlexNet's PCA colour augmentation (Krizhevsky et al. 2012): ImageNet RGB eigen-decomposition.
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])


PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


class PCALighting:
    """AlexNet's random RGB colour shift: add eigvec @ (alpha * eigval), alpha ~ N(0, 0.1), to RGB in [0, 1]."""

    def __init__(self, alpha_std: float = 0.1) -> None:
        self.alpha_std = alpha_std

    def __call__(self, rgb: torch.Tensor) -> torch.Tensor:
        if self.alpha_std == 0:
            return rgb
        alpha = torch.randn(3) * self.alpha_std
        shift = PCA_EIGVEC @ (alpha * PCA_EIGVAL)
        return rgb + shift.view(3, 1, 1)


class TrainTransform:
    """Section 3.1 augmentation: rescale to S (fixed, or drawn per image from [S_min, S_max]),
    random ``crop`` x ``crop`` crop, random flip, PCA colour shift, then the weights' normalisation.

    PIL image -> (3, crop, crop) float32.
    """

    def __init__(self, scale: int | tuple[int, int] = 256, crop: int = 224, flip: bool = True,
                 pca_std: float = 0.1, preprocess=None) -> None:
        self.scale = (scale, scale) if isinstance(scale, int) else tuple(scale)
        if self.scale[0] < crop:
            raise ValueError(f"Training scale S={self.scale[0]} is smaller than the {crop} px crop.")
        self.crop, self.flip = crop, flip
        self.lighting = PCALighting(pca_std)
        self.preprocess = preprocess or IMAGENET

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = random.randint(self.scale[0], self.scale[1])
        # Only the crop is resampled, but the limit is the same as every other rescale's.
        width, height = check_rescaled(image.width, image.height, size, image.info.get("vggkit_path", "<image>"))
        top = random.randint(0, height - self.crop)
        left = random.randint(0, width - self.crop)
        # Resample only the crop's window of the source image: the same pixels as rescaling the
        # whole image to S and then cropping (PIL's filter reads past the box), at a fraction of the work.
        x_scale, y_scale = image.width / width, image.height / height
        box = (left * x_scale, top * y_scale, (left + self.crop) * x_scale, (top + self.crop) * y_scale)
        image = image.resize((self.crop, self.crop), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
        if self.flip and random.random() < 0.5:
            image = TF.hflip(image)
        rgb = self.lighting(TF.to_tensor(image))
        return self.preprocess.normalize(rgb)


class EvalTransform:
    """Rescale the shortest side to Q, optionally centre-crop, normalise. PIL -> (3, H, W) float32."""

    def __init__(self, scale: int = 256, crop: int | None = 224, preprocess=None) -> None:
        self.scale, self.crop = scale, crop
        self.preprocess = preprocess or IMAGENET

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = rescale_shortest(image, self.scale)
        if self.crop:
            image = TF.center_crop(image, self.crop)
        return self.preprocess.normalize(TF.to_tensor(image))


def grid_offsets(length: int, crop: int, count: int) -> list[int]:
    """``count`` evenly spaced crop starts along a side of ``length`` (a side of 224 gives all zeros)."""
    if count == 1:
        return [(length - crop) // 2]
    return [int(math.floor(i * (length - crop) / (count - 1) + 0.5)) for i in range(count)]
