"""Checks on the files a user names, made before any work starts: checkpoints to read, outputs to write."""

from __future__ import annotations

import os
from pathlib import Path


def looks_like_a_path(text: str | os.PathLike) -> bool:
    """True for what is meant as a file (a folder in it, or a weight file's extension), not a model name."""
    text = str(text)
    return os.sep in text or Path(text).suffix.lower() in (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".h5", ".keras")


def writable_folder(path: str | os.PathLike, fix: str = "choose a writable folder") -> Path:
    """Create ``path`` if needed and prove a file can be written in it; else a one-line error ending in ``fix``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"The output folder {path} is a file; choose a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"Cannot write to the output folder {path} ({error.strerror or error}); {fix}.") from None
    return path


def writable_file(path: str | os.PathLike, example: str = "output") -> Path:
    """Check that ``path`` can be written (its folder is created if needed) before the work that fills it."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name in it, e.g. {path / example}.")
    try:
        writable_folder(path.parent)
    except ValueError:
        raise ValueError(f"Cannot write {path}: its folder {path.parent} cannot be created or written; "
                         f"choose a writable path.") from None
    return path


def check_output_outside(output: str | os.PathLike, data: str | os.PathLike, flag: str = "--output") -> None:
    """Refuse an output folder that is the data folder or inside it (links resolved): the next scan of
    the data would take its plots and checkpoints for images, or a class folder for one more class."""
    out, root = Path(output).resolve(), Path(data).resolve()
    if out == root or root in out.parents:
        raise ValueError(f"The output folder {output} is inside the data folder {data}; the next run would read "
                         f"its files as data. Choose a {flag} outside {data}.")


def display_name(name: str | os.PathLike) -> str:
    """A file or class name for showing (terminal, plot, HTML, warnings): bytes that are not UTF-8 (carried
    by Python as surrogate escapes) become U+FFFD, and control characters (newline, tab, ESC, ...) are
    written as escapes (``\\n``, ``\\t``, ``\\x1b``), so one name is one line and cannot move the cursor."""
    return os.fsencode(name).decode("utf-8", "replace").translate(_ESCAPES)


# C0 and C1 controls, DEL, and Unicode's line and paragraph separators, which also end a line.
_ESCAPES = {code: chr(code).encode("unicode_escape").decode("ascii")
            for code in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]}
