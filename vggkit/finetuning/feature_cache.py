"""Frozen-backbone features computed once and reused every epoch.

When only the head trains, the backbone's output for a fixed view of an image never
changes, so it is computed once (through ``vggkit.runtime``) and kept in memory, or in
a ``.npy`` memory map on disk when the set is too large for memory. Later epochs cost
only the head. A disk cache has all its blocks allocated before it is mapped, so a full
disk is a ``DiskFullError`` (or, for a cache that fits the memory limit, one warning and
memory instead), never a SIGBUS; a cache that was not completed is deleted.
"""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.folders import ImageListDataset
from ..utils.atomic import DiskFullError, free_bytes, is_disk_full, megabytes

STORAGES = ("auto", "memory", "disk")


DEFAULT_MEMORY_LIMIT = 2 * 1024**3  # bytes; larger caches go to disk under "auto"


DISK_FIX = "choose another --output or use --cache memory"


def remove_stale_caches(cache_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``.npy`` memory maps a killed run left in ``cache_dir`` (a finished run deletes its own)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    stale = [p for p in cache_dir.glob("*.npy") if p.is_file() and not p.is_symlink()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class FlipViews(Dataset):
    """The fixed views a frozen backbone sees: item ``k`` is image ``k // views``, mirrored when ``k % views == 1``.

    ``views=1`` gives the eval transform of each image; ``views=2`` adds its mirror image,
    the only augmentation that keeps the features cacheable.
    """

    def __init__(self, samples: list[tuple[str, int]], transform, views: int = 1) -> None:
        if views not in (1, 2):
            raise ValueError(f"views must be 1 (image) or 2 (image and mirror), got {views}.")
        self.images = ImageListDataset(samples, transform)
        self.views = views

    def __len__(self) -> int:
        return len(self.images) * self.views

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        image, label = self.images[k // self.views]
        return (image.flip(-1) if k % self.views else image), label

    def item_index(self, image_index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """(image, view) pairs -> item indices of this dataset."""
        return image_index * self.views + view


def _storage(shape: tuple[int, ...], storage: str, cache_dir: str | os.PathLike | None, name: str,
             memory_limit: int) -> tuple[torch.Tensor | np.memmap, Path | None]:
    """Room for float32 features of ``shape``: (a tensor, None) in memory, or (a memory map, its path) on disk.

    A disk that cannot hold it: memory instead with one warning when it fits ``memory_limit``
    (``storage="disk"`` on a small set), else the ``DiskFullError``.
    """
    nbytes = int(np.prod(shape)) * 4
    if storage == "disk" or (storage == "auto" and nbytes > memory_limit):
        if cache_dir is None:
            raise ValueError("A disk feature cache needs a cache_dir.")
        try:
            return allocate_npy(Path(cache_dir) / f"{name}.npy", shape)
        except DiskFullError as error:
            if nbytes > memory_limit:
                raise
            warnings.warn(f"{error} The {name} features ({megabytes(nbytes)} MB) are kept in memory instead.",
                          stacklevel=3)
    return torch.empty(shape, dtype=torch.float32), None


def allocate_npy(path: Path, shape: tuple[int, ...]) -> tuple[np.memmap, Path]:
    """A float32 ``.npy`` of ``shape`` at ``path``, every block allocated, mapped for writing.

    A memory map of a sparse file (what ``open_memmap`` makes) dies of SIGBUS when the disk fills
    while its pages are written; allocating first fails cleanly (ENOSPC), as a ``DiskFullError``,
    with no file left. (Copy-on-write filesystems such as ZFS cannot promise blocks ahead.)
    """
    nbytes = int(np.prod(shape)) * 4
    free = free_bytes(path.parent)
    if free is not None and free < nbytes:  # the common case, answered before creating anything
        raise DiskFullError(path, nbytes, DISK_FIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": shape}
    try:
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            offset = f.tell()
            f.flush()
            _reserve(f.fileno(), offset, nbytes)
        return np.memmap(path, dtype=np.float32, mode="r+", offset=offset, shape=shape), path
    except BaseException as error:
        path.unlink(missing_ok=True)
        if isinstance(error, OSError) and is_disk_full(error):
            raise DiskFullError(path, nbytes, DISK_FIX) from error
        raise


def _reserve(fd: int, offset: int, nbytes: int) -> None:
    """Allocate ``nbytes`` after ``offset`` in the file ``fd``: posix_fallocate, else zeros written."""
    try:
        os.posix_fallocate(fd, offset, nbytes)
        return
    except AttributeError:  # no posix_fallocate (macOS, Windows)
        pass
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without it: write zeros
            raise
    chunk = bytes(8 * 1024**2)
    os.lseek(fd, offset, os.SEEK_SET)
    for start in range(0, nbytes, len(chunk)):
        os.write(fd, chunk[:min(len(chunk), nbytes - start)])


class FeatureCache:
    """Backbone outputs of every item of a dataset: ``features`` (items, C, h, w) float32 and ``labels`` (items,)."""

    def __init__(self, features: torch.Tensor | np.ndarray, labels: torch.Tensor, path: Path | None = None) -> None:
        self.features = features
        self.labels = labels
        self.path = path

    @property
    def storage(self) -> str:
        return "disk" if self.path is not None else "memory"

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    @torch.no_grad()
    def build(cls, backbone: nn.Module, dataset: Dataset, batch_size: int = 32, storage: str = "auto",
              cache_dir: str | os.PathLike | None = None, name: str = "features",
              memory_limit: int = DEFAULT_MEMORY_LIMIT, num_workers: int = 0,
              progress: bool = True) -> "FeatureCache":
        """Run ``backbone`` (N, 3, H, W) -> (N, C, h, w) once over ``dataset`` in order and keep the outputs.

        ``storage="auto"`` keeps them in memory up to ``memory_limit`` bytes, else in
        ``cache_dir/<name>.npy`` (a memory map, allocated in full first: see ``_storage``).
        """
        if storage not in STORAGES:
            raise ValueError(f"Unknown cache storage {storage!r}; choose from {STORAGES}.")
        # Its own generator, so building the cache leaves the global RNG (dropout) untouched.
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(0))
        features = labels = path = None
        start = 0
        try:
            for images, batch_labels in tqdm(loader, desc=f"caching {name}", disable=not progress, leave=False):
                out = backbone(images).float().cpu()
                if features is None:
                    features, path = _storage((len(dataset), *out.shape[1:]), storage, cache_dir, name,
                                              memory_limit)
                    labels = torch.empty(len(dataset), dtype=torch.long)
                stop = start + len(out)
                features[start:stop] = out.numpy() if path is not None else out
                labels[start:stop] = batch_labels
                start = stop
            if path is not None:
                features.flush()
        except BaseException:
            if path is not None:  # a cache cut short (an error, Ctrl-C) is of no use: not left on the disk
                del features
                path.unlink(missing_ok=True)
            raise
        if features is None:
            raise ValueError(f"Nothing to cache: the {name} set is empty.")
        return cls(features, labels, path)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached (features, labels) of ``indices``, in that order."""
        if self.path is not None:
            return torch.from_numpy(np.ascontiguousarray(self.features[indices.numpy()])), self.labels[indices]
        return self.features[indices], self.labels[indices]

    def close(self) -> None:
        """Drop the cache; a disk cache's file is deleted."""
        if self.path is not None:
            del self.features
            self.path.unlink(missing_ok=True)
            self.path = None
        self.features = None
