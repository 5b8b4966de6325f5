"""The paper's training transform: rescale to S, random crop, flip, colour shift."""

import random

import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from vggkit.data.images import rescale_shortest, rescaled_wh
from vggkit.data.transforms import PCA_EIGVAL, PCALighting, TrainTransform


def photo(width: int = 500, height: int = 375) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((width, height))


@pytest.mark.parametrize("size", [(500, 375), (300, 600)])
def test_crop_equals_rescaling_the_whole_image_then_cropping(size):
    image = photo(*size)
    transform = TrainTransform(scale=(256, 512), pca_std=0.0)
    for seed in range(12):
        random.seed(seed)
        fast = transform(image)
        random.seed(seed)  # the same draws, the plain way: whole image to S, then the crop
        rescaled = rescale_shortest(image, random.randint(256, 512))
        top, left = random.randint(0, rescaled.height - 224), random.randint(0, rescaled.width - 224)
        crop = TF.crop(rescaled, top, left, 224, 224)
        if random.random() < 0.5:
            crop = TF.hflip(crop)
        plain = transform.preprocess.normalize(TF.to_tensor(crop))
        grey_levels = ((fast - plain) * torch.tensor(transform.preprocess.std).view(3, 1, 1) * 255).abs()
        assert fast.shape == (3, 224, 224)
        assert grey_levels.max() <= 2.01 and grey_levels.mean() < 0.05  # rounding only


def test_rescaled_size_rounds_as_torchvision():
    for width, height, size in [(500, 375, 256), (375, 500, 384), (333, 1000, 256), (640, 640, 512)]:
        assert rescaled_wh(width, height, size) == rescale_shortest(Image.new("RGB", (width, height)), size).size


def test_scale_below_the_crop_is_an_error():
    with pytest.raises(ValueError, match="S=200 is smaller than the 224 px crop"):
        TrainTransform(scale=200)


def test_pca_lighting_shifts_along_the_imagenet_eigenvectors():
    torch.manual_seed(0)
    shifts = torch.stack([PCALighting(0.1)(torch.zeros(3, 1, 1)).flatten() for _ in range(4000)])
    # The shift's covariance is V diag((0.1 * eigval)^2) V^T: its total variance is the sum of those.
    assert shifts.var(0).sum().item() == pytest.approx(((0.1 * PCA_EIGVAL) ** 2).sum().item(), rel=0.1)
    assert torch.equal(PCALighting(0.0)(torch.ones(3, 2, 2)), torch.ones(3, 2, 2))
