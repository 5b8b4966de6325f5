"""Robust image loading, class-folder scanning and the paper's transforms.

Everything that touches image files goes through ``load_image``: it fixes EXIF
orientation, converts every mode (greyscale, RGBA, palette, CMYK, 16-bit) to RGB,
and refuses what is not an image, or is a decompression bomb, with a clear message.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps
from torchvision.transforms import functional as TF

from ..utils.limits import ENV_VAR, over_limit
from ..utils.limits import max_pixels as pixel_limit
from ..utils.paths import display_name

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")


class ImageError(ValueError):
    """A file that cannot be used as an image: the path, the reason and what to do."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{display_name(path)}: {reason}")  # a newline in a name must not split the message


class EncodedImage(str):
    """An image stored inside a container (a tar shard's member, a table's row): a ``str`` whose value is
    the name it is shown by (``val-000003.tar:n01440764_123.jpg``), and which reads its encoded bytes.

    Being a ``str``, it travels where a file path does ((name, label) samples, CSV rows, sorting,
    pickling to loader workers); ``load_image`` decodes it with every check a file gets. Subclasses
    (``vggkit.data.sources``) implement ``read_bytes``.
    """

    def read_bytes(self) -> bytes:
        """The encoded image (JPEG, PNG, WebP, ...); ``OSError`` when it cannot be read."""
        raise NotImplementedError


def is_image_file(path: str | os.PathLike) -> bool:
    """By name: an image extension and not a hidden file (``.DS_Store``, ``._x.jpg``)."""
    name = os.path.basename(str(path))
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparent pixels go on white; 16-bit is rescaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / high * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: str | os.PathLike | Image.Image | np.ndarray, max_pixels: int | None = None) -> Image.Image:
    """Open an image file (or take a PIL image / HxWx3 uint8 array) as an upright RGB PIL image.

    ``max_pixels`` defaults to ``vggkit.utils.limits.max_pixels()`` (``VGGKIT_MAX_PIXELS``); a larger
    image is refused from its header, before its pixels are decoded. Raises ``ImageError``
    naming the file, and what it is when it is not a regular file, for anything unusable.
    """
    if isinstance(source, np.ndarray):
        source = Image.fromarray(source)
    if isinstance(source, Image.Image):
        _check_pixels(source, "<image>", max_pixels)
        return to_rgb(ImageOps.exif_transpose(source) or source)
    if isinstance(source, EncodedImage):
        try:
            data = source.read_bytes()
        except OSError as error:
            raise ImageError(source, f"cannot be read ({error.strerror or error})") from None
        if not data:
            raise ImageError(source, EMPTY_FILE)
        return _decode(io.BytesIO(data), source, max_pixels)
    path = Path(source)
    not_a_file = describe_non_file(path)
    if not_a_file:  # never open a FIFO or a device: the read would block or never end
        raise ImageError(path, not_a_file)
    return _decode(path, path, max_pixels)


def _decode(file, path, max_pixels: int | None) -> Image.Image:
    """``file`` (a path or a binary file object) -> upright RGB; errors name ``path``."""
    try:
        with warnings.catch_warnings():
            # vggkit's own limit (checked next, from the header) decides; PIL's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                _check_pixels(image, path, max_pixels)
                image.load()
                image = ImageOps.exif_transpose(image) or image
                image = to_rgb(image)
                image.info["vggkit_path"] = str(path)  # travels with resized copies: rescale errors name the file
                return image
    except ImageError:
        raise
    except _READ_ERRORS as error:
        raise unreadable(path, error) from None


def check_header(path: str | os.PathLike) -> str | None:
    """None when ``path`` opens as an image within the pixel limit, judged from its header alone (no pixel
    is decoded: ~0.1 ms a file); else the reason ``load_image`` would give. A file whose pixel data is
    truncated passes: only decoding finds that."""
    file = path
    if isinstance(path, EncodedImage):
        try:
            file = io.BytesIO(path.read_bytes())
        except OSError as error:
            return f"cannot be read ({error.strerror or error})"
        if not file.getbuffer().nbytes:
            return EMPTY_FILE
    elif os.path.getsize(path) == 0:  # PIL would open it only to fail; a size needs no open
        return EMPTY_FILE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                _check_pixels(image, path, None)
    except ImageError as error:
        return error.reason
    except _READ_ERRORS as error:
        return unreadable(path, error).reason
    return None


EMPTY_FILE = "an empty file (0 bytes); remove it or copy the image again"


# What PIL raises for a file it cannot read: PIL.UnidentifiedImageError and truncated files are OSErrors.
_READ_ERRORS = (Image.DecompressionBombError, OSError, ValueError, SyntaxError, IndexError, EOFError)


def unreadable(path: str | os.PathLike, error: BaseException) -> ImageError:
    """The ``ImageError`` for an exception PIL raised opening or decoding ``path``: what it means and the fix."""
    if isinstance(error, Image.DecompressionBombError):  # PIL refuses at open past twice its own limit (179 MP)
        found = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(found.group(1)):,} pixels" if found else "its size"
        return ImageError(path, f"{size}, over the limit of {min(pixel_limit(), 2 * Image.MAX_IMAGE_PIXELS):,} "
                                f"(set {ENV_VAR} to change it); refused as a possible decompression bomb")
    if isinstance(error, PermissionError):
        return ImageError(path, "permission denied; make the file readable (chmod +r)")
    if isinstance(error, OSError):
        reason = "not an image PIL can read" if "cannot identify" in str(error) else f"corrupt or truncated ({error})"
        return ImageError(path, f"{reason}; remove or replace the file")
    return ImageError(path, f"corrupt image ({error}); remove or replace the file")


def describe_non_file(path: str | os.PathLike) -> str | None:
    """None for a regular file (or a link to one); else what ``path`` is, as a reason to refuse it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if os.path.islink(path):
            if error.errno == errno.ELOOP:
                return "a symbolic link loop, not an image file"
            return f"a symbolic link to {os.readlink(path)}, which does not exist"
        if error.errno == errno.EACCES:
            return "permission denied; make the file and its folders readable"
        return "no such file"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder, not an image file (give the image files in it, or the folder where a folder is accepted)"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not an image file"
    if stat.S_ISSOCK(mode):
        return "a socket, not an image file"
    return "a device, not an image file"


def _check_pixels(image: Image.Image, path, max_pixels: int | None) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(path, "empty image")
    reason = over_limit(width, height, "decoded, it", max_pixels)
    if reason:
        raise ImageError(path, f"{reason}; refused as a possible decompression bomb (downscale it first)")


def rescaled_wh(width: int, height: int, size: int) -> tuple[int, int]:
    """PIL's (width, height) after an isotropic rescale to shortest side ``size``, rounded as torchvision does
    (``evaluation.protocols.rescaled_shape`` gives the same in tensor order)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def check_rescaled(width: int, height: int, size: int, path: str | os.PathLike = "<image>") -> tuple[int, int]:
    """(width, height) after a rescale to shortest side ``size``, or ``ImageError`` when that size is over
    ``vggkit.utils.limits.max_pixels()``: an extreme aspect ratio (10000x2 at 384 is 1,920,000x384) is refused
    before anything is allocated."""
    new_width, new_height = rescaled_wh(width, height, size)
    reason = over_limit(new_width, new_height, f"rescaled to shortest side {size}, this {width}x{height} image")
    if reason:
        raise ImageError(path, f"{reason}; its aspect ratio is too extreme, crop it first")
    return new_width, new_height


def rescale_shortest(image: Image.Image, size: int) -> Image.Image:
    """Isotropic rescale so the shortest side is ``size`` (the paper's S or Q); upscales small images.

    The rescaled size is checked against the pixel limit first (``check_rescaled``).
    """
    check_rescaled(image.width, image.height, size, image.info.get("vggkit_path", "<image>"))
    return TF.resize(image, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not grey pixels
