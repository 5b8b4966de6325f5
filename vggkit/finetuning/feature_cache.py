"""Frozen-backbone features computed once and reused every epoch.

When only the head trains, the backbone's output for a fixed view of an image never
changes, so it is computed once (through ``vggkit.runtime``) and kept in memory, or in
a ``.npy`` memory map on disk when the set is too large for memory. Later epochs cost
only the head.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.folders import ImageListDataset

STORAGES = ("auto", "memory", "disk")


DEFAULT_MEMORY_LIMIT = 2 * 1024**3  # bytes; larger caches go to disk under "auto"


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
        ``cache_dir/<name>.npy`` (a memory map).
        """
        if storage not in STORAGES:
            raise ValueError(f"Unknown cache storage {storage!r}; choose from {STORAGES}.")
        # Its own generator, so building the cache leaves the global RNG (dropout) untouched.
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(0))
        features = labels = path = None
        start = 0
        for images, batch_labels in tqdm(loader, desc=f"caching {name}", disable=not progress, leave=False):
            out = backbone(images).float().cpu()
            if features is None:
                shape = (len(dataset), *out.shape[1:])
                nbytes = int(np.prod(shape)) * 4
                use_disk = storage == "disk" or (storage == "auto" and nbytes > memory_limit)
                if use_disk:
                    if cache_dir is None:
                        raise ValueError("A disk feature cache needs a cache_dir.")
                    path = Path(cache_dir) / f"{name}.npy"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
                else:
                    features = torch.empty(shape, dtype=torch.float32)
                labels = torch.empty(len(dataset), dtype=torch.long)
            stop = start + len(out)
            features[start:stop] = out.numpy() if path is not None else out
            labels[start:stop] = batch_labels
            start = stop
        if features is None:
            raise ValueError(f"Nothing to cache: the {name} set is empty.")
        if path is not None:
            features.flush()
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
