"""The one bound on image size, shared by the library and the app.

Every image vggkit holds in memory counts against it: the decoded file (a
decompression bomb is refused before its pixels are read) and every rescaled copy
made from it (a 10000x2 strip rescaled to shortest side 384 would be 737 million
pixels). The bound is checked on the size an image *will* have, before anything
is allocated. Change it with the environment variable ``VGGKIT_MAX_PIXELS``.
"""

from __future__ import annotations

import os

ENV_VAR = "VGGKIT_MAX_PIXELS"


DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photograph: 120 MB as 8-bit RGB


# The app serves many people from one process, so its dense views (class score maps) hold the
# rescaled image to a tighter budget: they allocate per rescaled pixel (vgg16's conv1 maps: 2 flips x
# 64 channels x 4 bytes = 512 B each), and at 1 MP (1953 x 512: an aspect ratio of 3.8 at Q = 512,
# 15 at Q = 256) a full-width vgg16 pass adds 0.7 GB in float32 (measured).
APP_DENSE_MAX_PIXELS = 1_000_000


def max_pixels() -> int:
    """The limit in force: ``VGGKIT_MAX_PIXELS`` when set (read on every call), else 40,000,000."""
    text = os.environ.get(ENV_VAR)
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{ENV_VAR}={text!r} must be a positive whole number of pixels, e.g. 40000000.")
    return value


def over_limit(width: int, height: int, what: str = "the image", limit: int | None = None) -> str | None:
    """None when a ``width`` x ``height`` image fits the limit; else the reason, naming the limit and its fix."""
    limit = max_pixels() if limit is None else limit
    if width * height <= limit:
        return None
    return (f"{what} would be {width}x{height} = {width * height:,} pixels, over the limit of {limit:,} "
            f"(set {ENV_VAR} to change it)")
