"""Decoding and rescaling on the device: the tensor twin of ``data.load_image`` + ``data.rescale_shortest``.

Files are read as bytes (in DataLoader workers); a whole batch of JPEGs is decoded
in one ``torchvision.io.decode_jpeg`` call on the device (nvJPEG on CUDA, libjpeg
on the CPU, which is how the tests exercise this path) and rescaled there with
``F.interpolate(mode="bilinear", antialias=True)``. What decode_jpeg cannot read
as ``load_image`` would (PNG and other formats, CMYK JPEGs, EXIF-rotated ones,
in-memory images, files over the pixel limit) is decoded by ``load_image`` on the
CPU instead, so unreadable files get the same reasons as on the PIL path, and a
rescaled size over ``vggkit.utils.limits`` is refused as ``data.check_rescaled`` does.

Agreement with the PIL path (measured on photographs and noise, ``tests/test_device_decode.py``):
the decoded pixels are libjpeg's on both CPU paths (equal), and after rescaling to
shortest side Q the uint8 images differ by at most a few levels in a pixel and by
less than 1 level on average (PIL's bilinear filter works in fixed point on uint8).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from ..utils.limits import over_limit
from .images import EncodedImage, ImageError, check_rescaled, load_image, rescaled_wh

JPEG_MAGIC = b"\xff\xd8"


EXIF_ORIENTATION = 0x0112


Source = str | os.PathLike | Image.Image | np.ndarray


def is_plain_jpeg(path: str | os.PathLike | bytes) -> bool:
    """True for a JPEG that decode_jpeg reads as ``load_image`` would: YCbCr or grey, upright, within the pixel limit.

    ``path``: a file, or the encoded bytes themselves. CMYK JPEGs (nvJPEG cannot read them),
    EXIF-rotated ones (decode_jpeg ignores the tag) and oversized ones go through ``load_image`` instead.
    """
    try:
        if isinstance(path, bytes):
            if path[:2] != JPEG_MAGIC:
                return False
            path = io.BytesIO(path)
        else:
            with open(path, "rb") as f:
                if f.read(2) != JPEG_MAGIC:
                    return False
        with Image.open(path) as image:  # reads the header only
            width, height = image.size
            return (image.format == "JPEG" and image.mode in ("RGB", "L")
                    and image.getexif().get(EXIF_ORIENTATION, 1) == 1 and width * height > 0
                    and over_limit(width, height) is None)
    except OSError:
        return False


def read_source(source: Source) -> torch.Tensor:
    """One image -> encoded JPEG bytes (1-D uint8, for ``decode_jpegs``) or decoded uint8 RGB (3, H, W).

    Raises ``ImageError`` (as ``load_image`` does) for what is not a readable image.
    """
    if isinstance(source, EncodedImage):
        try:
            data = source.read_bytes()
        except OSError:
            data = b""  # load_image names the reason
        if is_plain_jpeg(data):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    elif isinstance(source, (str, os.PathLike)) and is_plain_jpeg(source):
        try:
            with open(source, "rb") as f:
                return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        except OSError:
            pass  # load_image names the reason
    return TF.pil_to_tensor(load_image(source))


def decode_jpegs(data: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Encoded JPEGs (1-D uint8 each) -> RGB uint8 (3, H, W) each on ``device``, in one batched call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision's notice for decode_jpeg
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def decode_on_device(data: Sequence[torch.Tensor], sources: Sequence[Source], device: torch.device | str,
                     scales: Sequence[int] = ()) -> list[torch.Tensor | str]:
    """``read_source`` outputs -> uint8 RGB (3, H, W) on ``device`` each, or the reason a file is unusable.

    The encoded ones are decoded in one batched call; where that fails (a corrupt
    file fails the whole call) each is decoded alone, and one that still fails is
    read by ``load_image``, which either decodes it or names what is wrong with it.
    An image whose copy rescaled to one of ``scales`` would be over the pixel limit
    gets ``data.check_rescaled``'s reason.
    """
    images: list[torch.Tensor | str | None] = [d.to(device, non_blocking=True) if d.dim() == 3 else None
                                               for d in data]
    encoded = [i for i, d in enumerate(data) if d.dim() == 1]
    try:
        decoded = decode_jpegs([data[i] for i in encoded], device) if encoded else []
    except RuntimeError:
        decoded = [_decode_one(data[i], sources[i], device) for i in encoded]
    for i, image in zip(encoded, decoded):
        images[i] = image
    return [_check_scales(image, source, scales) for image, source in zip(images, sources)]


def _check_scales(image: torch.Tensor | str, source: Source, scales: Sequence[int]) -> torch.Tensor | str:
    if isinstance(image, str):
        return image
    name = str(source) if isinstance(source, (str, os.PathLike)) else "<image>"
    try:
        for scale in scales:
            check_rescaled(image.shape[-1], image.shape[-2], scale, name)
    except ImageError as error:
        return error.reason
    return image


def _decode_one(data: torch.Tensor, source: Source, device: torch.device | str) -> torch.Tensor | str:
    try:
        return decode_jpegs([data], device)[0]
    except RuntimeError:
        try:
            return TF.pil_to_tensor(load_image(source)).to(device)
        except ImageError as error:
            return error.reason


def resize_shortest(images: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, H', W') with shortest side ``scale``, on their device.

    Bilinear with antialiasing, sizes rounded as ``data.images.rescaled_wh`` (torchvision's rule).
    """
    height, width = images.shape[-2:]
    new_width, new_height = rescaled_wh(width, height, scale)
    if (new_height, new_width) == (height, width):
        return images
    resized = F.interpolate(images.float(), size=(new_height, new_width), mode="bilinear", antialias=True,
                            align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def resize_all(images: Sequence[torch.Tensor], scale: int) -> list[torch.Tensor]:
    """uint8 (3, H, W) images -> each rescaled to shortest side ``scale``; images of one size in one call."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
    resized: list[torch.Tensor | None] = [None] * len(images)
    for members in by_size.values():
        for i, image in zip(members, resize_shortest(torch.stack([images[i] for i in members]), scale)):
            resized[i] = image
    return resized
