"""A corpus of awkward and hostile image inputs, generated (never committed): what every entry point must survive.

``make_corpus(folder)`` writes them and returns ``{file name: expected}``, expected being
"ok" (loads as RGB), "rescale" (loads, but any rescale to 224 px or more is over the pixel
limit) or "refused" (``load_image`` raises ``ImageError``).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

NON_UTF8 = os.fsdecode(b"sq\xff\xfe.png")  # not valid UTF-8: Python carries the bytes as surrogate escapes
LONG = "l" * 236 + ".png"  # 240 characters, under the usual 255-byte limit


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` and holds no pixel data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def make_corpus(folder: Path) -> dict[str, str]:
    """Write the corpus into ``folder`` (created) -> {name: "ok" | "rescale" | "refused"}."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = noise(48, 40)
    jpeg, png = encoded(photo, "JPEG"), encoded(photo, "PNG")
    grey16 = Image.fromarray((np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 20))
    rotated = photo.copy()
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    frames = [noise(32, 32, seed) for seed in range(3)]
    files: dict[str, tuple[bytes, str]] = {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "refused"),
        "truncated.png": (png[: len(png) // 2], "refused"),
        "corrupt.jpg": (jpeg[:20] + bytes(np.random.default_rng(1).integers(0, 256, 400, dtype=np.uint8)), "refused"),
        "corrupt.png": (png[:33] + b"\x00" * 200, "refused"),
        "empty.jpg": (b"", "refused"),
        "text.jpg": (b"this is not a picture\n", "refused"),
        "bomb.png": (png_header_only(30000, 30000), "refused"),
        "one_pixel.png": (encoded(noise(1, 1), "PNG"), "ok"),
        "wide.png": (encoded(noise(10000, 2), "PNG"), "rescale"),
        "tall.png": (encoded(noise(2, 10000), "PNG"), "rescale"),
        "palette.png": (encoded(photo.convert("P"), "PNG"), "ok"),
        "la.png": (encoded(photo.convert("LA"), "PNG"), "ok"),
        "grey16.png": (encoded(grey16, "PNG"), "ok"),
        "i16.tif": (encoded(grey16.convert("I;16"), "TIFF"), "ok"),
        "cmyk.jpg": (encoded(photo.convert("CMYK"), "JPEG"), "ok"),
        "animated.gif": (encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]), "ok"),
        "photo.tiff": (encoded(photo, "TIFF"), "ok"),
        "photo.webp": (encoded(photo, "WEBP"), "ok"),
        "rotated.jpg": (encoded(rotated, "JPEG", exif=exif), "ok"),
        NON_UTF8: (png, "ok"),
        LONG: (png, "ok"),
    }
    expected = {}
    for name, (data, outcome) in files.items():
        (folder / name).write_bytes(data)
        expected[name] = outcome
    (folder / "dir.jpg").mkdir()
    expected["dir.jpg"] = "refused"  # as a file; as a folder it is walked (and here holds nothing)
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.symlink("nowhere.jpg", folder / "broken.jpg")
    os.mkfifo(folder / "fifo.jpg")
    expected.update({"loop.jpg": "refused", "broken.jpg": "refused", "fifo.jpg": "refused"})
    return expected
