"""Robust image loading, class-folder scanning and the paper's transforms.

Everything that touches image files goes through ``load_image``: it fixes EXIF
orientation, converts every mode (greyscale, RGBA, palette, CMYK, 16-bit) to RGB,
and refuses what is not an image, or is a decompression bomb, with a clear message.
"""

from __future__ import annotations

import errno
import math
import os
import random
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from .limits import ENV_VAR, over_limit
from .limits import max_pixels as pixel_limit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")
SPLITS = ("train", "val", "test")

# AlexNet's PCA colour augmentation (Krizhevsky et al. 2012): ImageNet RGB eigen-decomposition.
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


class ImageError(ValueError):
    """A file that cannot be used as an image: the path, the reason and what to do."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def is_image_file(path: str | os.PathLike) -> bool:
    """By name: an image extension and not a hidden file (``.DS_Store``, ``._x.jpg``)."""
    name = os.path.basename(str(path))
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def display_name(name: str | os.PathLike) -> str:
    """A file or class name for showing (terminal, plot, HTML): bytes that are not UTF-8 (carried by
    Python as surrogate escapes) become U+FFFD instead of breaking the output."""
    return os.fsencode(name).decode("utf-8", "replace")


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

    ``max_pixels`` defaults to ``vggkit.limits.max_pixels()`` (``VGGKIT_MAX_PIXELS``); a larger
    image is refused from its header, before its pixels are decoded. Raises ``ImageError``
    naming the file, and what it is when it is not a regular file, for anything unusable.
    """
    if isinstance(source, np.ndarray):
        source = Image.fromarray(source)
    if isinstance(source, Image.Image):
        _check_pixels(source, "<image>", max_pixels)
        return to_rgb(ImageOps.exif_transpose(source) or source)
    path = Path(source)
    not_a_file = describe_non_file(path)
    if not_a_file:  # never open a FIFO or a device: the read would block or never end
        raise ImageError(path, not_a_file)
    try:
        with warnings.catch_warnings():
            # vggkit's own limit (checked next, from the header) decides; PIL's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_pixels(image, path, max_pixels)
                image.load()
                image = ImageOps.exif_transpose(image) or image
                image = to_rgb(image)
                image.info["vggkit_path"] = str(path)  # travels with resized copies: rescale errors name the file
                return image
    except ImageError:
        raise
    except Image.DecompressionBombError as error:  # PIL refuses at open past twice its own limit (179 MP)
        found = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(found.group(1)):,} pixels" if found else "its size"
        raise ImageError(path, f"{size}, over the limit of {min(pixel_limit(), 2 * Image.MAX_IMAGE_PIXELS):,} "
                               f"(set {ENV_VAR} to change it); refused as a possible decompression bomb") from None
    except PermissionError:
        raise ImageError(path, "permission denied; make the file readable (chmod +r)") from None
    except OSError as error:  # PIL.UnidentifiedImageError and truncated files are OSErrors
        reason = "not an image PIL can read" if "cannot identify" in str(error) else f"corrupt or truncated ({error})"
        raise ImageError(path, f"{reason}; remove or replace the file") from None
    except (ValueError, SyntaxError, IndexError, EOFError) as error:
        raise ImageError(path, f"corrupt image ({error}); remove or replace the file") from None


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


# --------------------------------------------------------------------------- folders


@dataclass
class FolderScan:
    """The result of scanning a class-folder tree: classes, (path, label) samples and what was skipped."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts = {c: 0 for c in self.classes}
        for _, label in self.samples:
            counts[self.classes[label]] += 1
        return counts


class SeenFiles:
    """Files and folders already counted, by identity (device, inode): a symbolic link to one already
    seen, a hard link to it, or a folder loop is recognised, so every file counts once.

    Share one between the scans of a run's splits to keep them disjoint.
    """

    def __init__(self) -> None:
        self.first: dict[tuple[int, int], str] = {}

    def claim(self, path: str, status: os.stat_result) -> str | None:
        """None the first time a file or folder is seen; afterwards the path it was first seen under."""
        key = (status.st_dev, status.st_ino)
        if key in self.first:
            return self.first[key]
        self.first[key] = path
        return None


def class_folders(root: str | os.PathLike) -> list[str]:
    """The sorted names of ``root``'s visible sub-folders (links to folders included); nothing is walked."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Data folder not found: {root}. Expected one sub-folder per class.")
    return sorted(d.name for d in root.iterdir() if not d.name.startswith(".") and d.is_dir())


def scan_folder(root: str | os.PathLike, classes: list[str] | None = None, verify: bool = False,
                seen: SeenFiles | None = None) -> FolderScan:
    """Scan ``root/<class>/**/<image>``: class names sorted, files sorted, hidden and non-image files skipped.

    Links are followed, but every file and folder counts once, by identity: a link or hard link
    to one already seen (in this scan or, with a shared ``seen``, another split's) and folder
    loops are skipped and listed in ``skipped``, as are FIFOs, devices and broken links named
    like images. ``verify=True`` decodes every image once and skips the unreadable ones and those
    too extreme to rescale to 224 px within the pixel limit.
    Raises a clear ``ValueError`` when ``root`` is missing or holds no class folders.
    """
    root = Path(root)
    found = class_folders(root)
    if not found:
        raise ValueError(f"{root} holds no class folders. Expected {root}/<class_name>/<image files>.")
    classes = list(classes) if classes is not None else found
    seen = SeenFiles() if seen is None else seen
    seen.claim(str(root), os.stat(root))  # a link back to the root is a loop, not more data
    samples: list[tuple[str, int]] = []
    skipped: list[tuple[str, str]] = []
    # Every class folder is claimed before any is walked: a link inside one class to another class's
    # folder is then skipped there, not counted as the first class.
    walked = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        first = seen.claim(str(folder), os.stat(folder))
        if first:
            skipped.append((str(folder), f"the same folder as {first} (a link); its files are counted once"))
        else:
            walked.append((label, folder))
    for label, folder in walked:
        for path in image_files(str(folder), seen, skipped):
            if verify:
                try:
                    image = load_image(path)
                    check_rescaled(image.width, image.height, 224, path)  # the smallest scale vggkit uses
                except ImageError as error:
                    skipped.append((path, error.reason))
                    continue
            samples.append((path, label))
    return FolderScan(root, classes, samples, skipped)


def image_files(folder: str | os.PathLike, seen: SeenFiles, skipped: list[tuple[str, str]]) -> list[str]:
    """Regular image files under ``folder`` counted once each, in ``os.walk``'s top-down sorted order;
    everything left out goes to ``skipped`` with its reason (hidden files and folders silently)."""
    files: list[str] = []
    pending = [str(folder)]
    while pending:
        current = pending.pop()
        try:
            entries = sorted((e for e in os.scandir(current) if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as error:
            skipped.append((current, f"cannot list the folder ({error.strerror or error})"))
            continue
        subfolders = []
        for entry in entries:
            try:
                status = os.stat(entry.path)  # follows links
            except OSError:
                reason = describe_non_file(entry.path) if is_image_file(entry.path) else "not an image file"
                skipped.append((entry.path, reason))
                continue
            if stat.S_ISDIR(status.st_mode):
                first = seen.claim(entry.path, status)
                if first:
                    skipped.append((entry.path, f"the same folder as {first} (a link or a loop); "
                                                f"its files are counted once"))
                else:
                    subfolders.append(entry.path)
            elif not is_image_file(entry.path):
                skipped.append((entry.path, "not an image file (by extension)"))
            elif not stat.S_ISREG(status.st_mode):
                skipped.append((entry.path, describe_non_file(entry.path) or "not a regular file"))
            else:
                first = seen.claim(entry.path, status)
                if first:
                    skipped.append((entry.path, f"the same file as {first} (a link or hard link); counted once"))
                else:
                    files.append(entry.path)
        pending += reversed(subfolders)
    return files


def report_skipped(skipped: list[tuple[str, str]], limit: int = 20) -> None:
    """One warning that lists every skipped file (the first ``limit`` by name) and why."""
    if not skipped:
        return
    lines = [f"  {path}: {reason}" for path, reason in skipped[:limit]]
    more = f"\n  ... and {len(skipped) - limit} more" if len(skipped) > limit else ""
    warnings.warn(f"Skipped {len(skipped)} file(s) (unusable, or already counted):\n" + "\n".join(lines) + more,
                  stacklevel=2)


def find_splits(data_dir: str | os.PathLike) -> dict[str, Path]:
    """``{"train": ..., "val": ..., "test": ...}`` for the split folders present in ``data_dir`` (may be empty)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"Data folder not found: {data_dir}")
    return {s: data_dir / s for s in SPLITS if (data_dir / s).is_dir()}


class ImageListDataset(Dataset):
    """(path, label) samples -> (transform(image), label).

    A file that fails to decode during training is reported once and replaced by
    the next readable sample, so one bad file never stops an epoch.
    """

    def __init__(self, samples: list[tuple[str, int]], transform=None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.failed: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            if path in self.failed:
                continue
            try:  # the transform too: its rescale may refuse an extreme aspect ratio
                image = load_image(path)
                return (self.transform(image) if self.transform else image), label
            except ImageError as error:
                self.failed[path] = error.reason
                warnings.warn(f"Skipping unreadable image {path}: {error.reason}", stacklevel=2)
        raise RuntimeError("No readable image left in the dataset.")


# --------------------------------------------------------------------------- the paper's transforms


def rescaled_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after an isotropic rescale to shortest side ``size``, rounded as torchvision does."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def check_rescaled(width: int, height: int, size: int, path: str | os.PathLike = "<image>") -> tuple[int, int]:
    """(width, height) after a rescale to shortest side ``size``, or ``ImageError`` when that size is over
    ``vggkit.limits.max_pixels()``: an extreme aspect ratio (10000x2 at 384 is 1,920,000x384) is refused
    before anything is allocated."""
    new_width, new_height = rescaled_size(width, height, size)
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
        from .preprocess import IMAGENET

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
        from .preprocess import IMAGENET

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


ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not grey pixels
