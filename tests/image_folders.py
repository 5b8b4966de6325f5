"""Small class-folder datasets rendered for the tests: shapes, and crops of scikit-image's photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def shape_image(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A filled circle or square of random colour, size and place on a noisy background."""
    background = rng.integers(0, 256, 3)
    pixels = np.clip(background + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    radius = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(radius + 2, size - radius - 2, 2))
    colour = tuple(int(c) for c in (255 - background + rng.integers(-40, 40, 3)).clip(0, 255))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=colour)
    return image


def make_shapes(root: Path, per_class: int = 40, size: int = 64, seed: int = 0) -> Path:
    """root/circle/*.png and root/square/*.png."""
    rng = np.random.default_rng(seed)
    for kind in ("circle", "square"):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape_image(kind, rng, size).save(root / kind / f"{kind}_{i:03d}.png")
    return root


def make_photo_crops(root: Path, per_class: int = 40, crop: int = 96, seed: int = 0,
                     photos: tuple[str, str] = ("chelsea", "coffee")) -> Path:
    """root/<photo>/*.jpg: random square crops of two scikit-image sample photos."""
    from skimage import data

    rng = np.random.default_rng(seed)
    for name in photos:
        photo = getattr(data, name)()
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(rng.integers(crop, min(photo.shape[:2])))
            top = int(rng.integers(0, photo.shape[0] - side + 1))
            left = int(rng.integers(0, photo.shape[1] - side + 1))
            patch = Image.fromarray(photo[top:top + side, left:left + side]).resize((crop, crop))
            patch.save(root / name / f"{name}_{i:03d}.jpg", quality=90)
    return root


def stripes_image(vertical: bool, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A two-colour grating of random period, phase and contrasting colours; vertical or horizontal."""
    period = rng.uniform(6, 16)
    phase = rng.uniform(0, period)
    ramp = (np.arange(size) + phase) % period < period / 2
    mask = np.tile(ramp, (size, 1)) if vertical else np.tile(ramp[:, None], (1, size))
    a = rng.integers(0, 256, 3)
    b = (a + rng.integers(96, 160, 3)) % 256  # every channel differs: the stripes always show
    pixels = np.where(mask[..., None], a, b) + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_stripes(root: Path, per_class: int = 40, size: int = 64, seed: int = 0) -> Path:
    """root/horizontal/*.png and root/vertical/*.png."""
    rng = np.random.default_rng(seed)
    for name in ("horizontal", "vertical"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            stripes_image(name == "vertical", rng, size).save(root / name / f"{name}_{i:03d}.png")
    return root
