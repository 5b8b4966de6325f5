"""Atomic writes: a result is complete under its final name or absent (a temp file beside it, then a rename);
temp files of killed writers are removed at the next write.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d*)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete ``.NAME.tmp<pid>`` files in ``folder`` left by writes whose process is gone (a killed run).

    ``name``: only the temp files of that target file. Returns what was removed.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = TEMP_PATTERN.match(entry.name)
        if not match or (name is not None and match["name"] != name):
            continue
        pid = int(match["pid"]) if match["pid"] else None
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue  # a write in progress, not a leftover
        try:
            if entry.is_file() and not entry.is_symlink():
                entry.unlink()
                removed.append(entry)
        except OSError:
            pass  # somebody else's file we cannot remove: not ours to insist on
    return removed


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, then rename: never a half-written file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file through a temp file and a rename (UTF-8; odd names kept as they are)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))


def atomic_write(path: str | os.PathLike, write) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``; temp files of earlier writes killed half-way go first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
