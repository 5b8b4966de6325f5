"""Atomic writes: a result is complete under its final name or absent (a temp file beside it, then a rename);
temp files of killed writers are removed at the next write.

A full disk is one ``DiskFullError`` line naming the file, the space it needs and the folder, with the
fix. ``write_or_keep`` puts a result that did not fit into a fallback folder instead
(``$VGGKIT_FALLBACK_DIR``, then the system temp folder), so hours of training are not lost to it.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d*)$")

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

# torch.save's zip writer (caffe2's inline_container.cc) checks file positions, not errno, so a write the
# disk refused reaches us as "[enforce fail at inline_container.cc:672] . unexpected pos 598784 vs 598680".
TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed")

FALLBACK_ENV = "VGGKIT_FALLBACK_DIR"

MB = 1024**2


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free bytes for an unprivileged writer on the filesystem of ``folder`` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def megabytes(size: int) -> int:
    """Bytes -> whole MB, rounded up, at least 1 (what to free must never read "0 MB")."""
    return max(1, math.ceil(size / MB))


class DiskFullError(OSError):
    """No room for a file: the file, the space it needs (``needed`` bytes, exact unless ``qualifier`` says
    "about " or "more than "), the folder and the fix, in one line."""

    def __init__(self, path: str | os.PathLike, needed: int, fix: str = "choose another --output",
                 qualifier: str = "") -> None:
        self.path, self.needed, self.fix, self.qualifier = Path(path), int(needed), fix, qualifier
        self.folder = self.path.parent
        free = free_bytes(self.folder)
        # With a quota (EDQUOT) the filesystem may show plenty free: then the whole size is what to free.
        shortfall = self.needed - free if free is not None and free < self.needed else self.needed
        amount = f"{qualifier}{megabytes(self.needed)} MB"
        have = "" if free is None else f", {free / MB:.1f} MB free"
        self.message = (f"Disk full: cannot write {self.path} ({amount} needed{have} in {self.folder}); "
                        f"free {megabytes(shortfall)} MB in {self.folder} or {fix}.")
        super().__init__(errno.ENOSPC, self.message)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # OSError's default would rebuild it from (errno, message)
        return type(self), (self.path, self.needed, self.fix, self.qualifier)


def is_disk_full(error: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, and for torch.save's "unexpected pos"/"file write failed", on ``error`` or its causes."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(error, RuntimeError) and any(text in str(error) for text in TORCH_WRITE_FAILURES):
            return True
        error = error.__cause__ or error.__context__
    return False


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


def tensor_bytes(obj) -> int:
    """Bytes of the tensor storages in ``obj`` (nested dicts, lists, tuples), each storage once: a lower
    bound of what ``torch.save`` writes."""
    seen: dict[tuple, int] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            seen[(item.device.type, storage.data_ptr())] = storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return sum(seen.values())


def atomic_save(obj, path: str | os.PathLike, fix: str = "choose another --output") -> None:
    """``torch.save`` to a temp file in the same folder, then rename: never a half-written file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), size=tensor_bytes(obj), fix=fix)


def atomic_write_text(text: str, path: str | os.PathLike, fix: str = "choose another --output") -> None:
    """Write a text file through a temp file and a rename (UTF-8; odd names kept as they are)."""
    data = text.encode("utf-8", errors="surrogateescape")
    atomic_write(path, lambda tmp: tmp.write_bytes(data), size=len(data), fix=fix)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], size: int | None = None,
                 fix: str = "choose another --output") -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``; temp files of earlier writes killed half-way go first.

    ``size``: the bytes it will take, when known (a lower bound will do): refused before writing when the
    disk has less. A full disk (ENOSPC, EDQUOT, torch's position errors) raises ``DiskFullError``, ending
    in ``fix``; the temp file is removed and an earlier file at ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    free = free_bytes(path.parent)
    if size is not None and free is not None and size > free:
        raise DiskFullError(path, size, fix)  # not one byte written: nothing to clean up, no time lost
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        if not is_disk_full(error):
            raise
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)  # before measuring what is free: the temp's blocks are not
        # Without a size, what was written when the disk refused is all we know: the file needed more.
        raise DiskFullError(path, max(size or 0, written), fix, "" if size is not None else "more than ") from error
    finally:
        if tmp.exists():
            tmp.unlink()


def fallback_folders() -> list[Path]:
    """Where a result that did not fit goes instead: ``$VGGKIT_FALLBACK_DIR`` if set, then the system temp folder."""
    chosen = os.environ.get(FALLBACK_ENV)
    return ([Path(chosen)] if chosen else []) + [Path(tempfile.gettempdir())]


def write_or_keep(path: str | os.PathLike, save: Callable[[Path], object],
                  what: str = "the trained weights") -> tuple[Path | None, str | None]:
    """``save(path)``; on a ``DiskFullError``, ``save`` again into the first fallback folder with room.

    Returns (where it was written, None) when ``path`` took it, (the fallback file, the message) when a
    fallback did, (None, the message) when nowhere had room: the caller keeps the result in memory.
    The fallback file is ``FOLDER/vggkit-unsaved/<path's folder>-<date>-<pid>/<path's name>``: every
    file of one run lands in one folder, which for ``train`` is itself a run folder to ``--resume``.
    """
    path = Path(path)
    try:
        save(path)
        return path, None
    except DiskFullError as error:
        full = error
    run = f"{path.absolute().parent.name}-{time.strftime('%Y%m%d')}-{os.getpid()}"
    folders = fallback_folders()
    for folder in folders:
        free = free_bytes(folder)
        if free is not None and free < full.needed:
            continue  # no room there either: do not spend minutes writing what cannot fit
        target = folder / "vggkit-unsaved" / run / path.name
        try:
            save(target)
        except OSError:  # full as well, or not writable: the next folder
            continue
        return target, f"{full} {what[:1].upper()}{what[1:]} were written to {target} instead."
    tried = ", ".join(str(folder) for folder in folders)
    return None, (f"{full} No fallback folder had room either ({tried}; set {FALLBACK_ENV} to a folder that has): "
                  f"{what} are kept in memory only, as the returned result's model.")
