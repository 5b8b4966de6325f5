"""The training data pipeline: samplers that resume mid-epoch, reproducible augmentation,
and an optional GPU JPEG decode path.

Augmentation is seeded per sample from (seed, epoch, index), so an image is
augmented the same way whichever process or worker loads it. That is what makes
a run on N processes equal a run on one, and a resumed run equal an
uninterrupted one, with any number of DataLoader workers.
"""

from __future__ import annotations

import random
import time
import warnings
from itertools import islice

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from .batch_augment import colour_shift, draw_crops, resample_crops
from .device_decode import decode_jpegs, read_source
from .folders import ImageListDataset
from .images import ImageError
from .transforms import PCA_EIGVAL, PCA_EIGVEC, TrainTransform


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation in one epoch."""
    return (((seed * 1_000_003) ^ (epoch * 998_244_353)) * 2_147_483_647 + index) % (2**63 - 1)


class EpochSampler(Sampler):
    """This process's share of one shuffled epoch, as ``(index, epoch)`` keys.

    Shuffling and sharding are ``DistributedSampler``'s (seeded by seed + epoch);
    ``length`` truncates the share to whole optimizer steps and ``start`` skips the
    samples of steps already taken, for a mid-epoch resume. Across processes the
    k-th global batch holds the same samples as on one process: positions
    [k*B, (k+1)*B) of the epoch's permutation.
    """

    def __init__(self, dataset_size: int, world_size: int, rank: int, seed: int, length: int) -> None:
        self.shuffle = DistributedSampler(range(dataset_size), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=False)
        self.length, self.start, self.epoch = length, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.shuffle.set_epoch(epoch)

    def __iter__(self):
        for index in islice(iter(self.shuffle), self.start, self.length):
            yield index, self.epoch

    def __len__(self) -> int:
        return self.length - self.start


class ShardSampler(Sampler):
    """Validation indices ``rank, rank + world, ...``: every sample on exactly one process, none padded."""

    def __init__(self, dataset_size: int, world_size: int, rank: int) -> None:
        self.indices = range(rank, dataset_size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededAugment(Dataset):
    """``(index, epoch)`` -> (augmented (3, crop, crop) tensor, label).

    The transform's random draws (Python ``random`` and torch) come from a generator
    seeded by ``sample_seed``; the caller's RNG state is left as it was. An unreadable
    file is replaced by the next readable one (``ImageListDataset``).
    """

    def __init__(self, samples: list[tuple[str, int]], transform: TrainTransform, seed: int) -> None:
        self.images = ImageListDataset(samples)
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        image, label = self.images[index]
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            seed = sample_seed(self.seed, epoch, index)
            random.seed(seed)
            torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's drives dropout
            tensor = self.transform(image)
        random.setstate(python_state)
        return tensor, label


def pipeline_images_per_second(samples: list[tuple[str, int]], scale: int | tuple[int, int] = 256,
                               crop: int = 224, count: int = 200) -> float:
    """Throughput of one loader worker on the training pipeline (decode, rescale to S, random crop,
    flip, colour shift), run in this process over the first ``count`` loads, cycling ``samples``."""
    if not samples:
        raise ValueError("pipeline_images_per_second needs at least one (path, label) sample.")
    dataset = SeededAugment(samples, TrainTransform(scale=scale, crop=crop), seed=0)
    dataset[(0, 0)]  # first load pays for imports and caches
    started = time.perf_counter()
    for index in range(count):
        dataset[(index % len(dataset), 1)]
    return count / (time.perf_counter() - started)


class EncodedImages(Dataset):
    """``(index, epoch)`` -> (encoded bytes or decoded (3, H, W) uint8, label, sample seed, path).

    Workers only read files; decoding and augmentation run batched on the GPU
    (``GpuAugment``). Files nvJPEG would not read as ``load_image`` does (ImageNet has a
    few PNGs and CMYK JPEGs under .JPEG names; EXIF-rotated and oversized JPEGs) are
    decoded here on the CPU instead (``device_decode.is_plain_jpeg``).
    """

    def __init__(self, samples: list[tuple[str, int]], seed: int) -> None:
        self.samples, self.seed = list(samples), seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                encoded = read_source(path)  # the same test as evaluation's device decoding (is_plain_jpeg)
                return encoded.contiguous(), label, sample_seed(self.seed, epoch, index), path
            except (OSError, ImageError) as error:
                warnings.warn(f"Skipping unreadable image {path}: {error}", stacklevel=2)
        raise RuntimeError("No readable image left in the dataset.")


def collate_encoded(batch):
    """Keep the variable-length encoded images as a list:
    [(data, label, seed, path)] -> (list of data, (N,) labels, (N,) seeds, list of paths)."""
    data, labels, seeds, paths = zip(*batch)
    return list(data), torch.tensor(labels), torch.tensor(seeds, dtype=torch.int64), list(paths)


class GpuAugment:
    """Decode a batch of JPEGs on ``device`` (nvJPEG on CUDA, batched) and apply ``TrainTransform``'s
    augmentation to the whole batch there: rescale to S, random crop, flip, PCA colour shift, normalise.

    Every image's draws come from its sample seed (``batch_augment.draw_crops``): the same
    distribution as the CPU path's ``TrainTransform``, other draws; a run is reproducible on
    either path. The arithmetic is batched tensor work (``batch_augment.resample_crops``), so
    CPU tensors take the same code path as CUDA ones.
    """

    def __init__(self, transform: TrainTransform, device: torch.device | str) -> None:
        self.transform, self.device = transform, torch.device(device)
        # Made once: Preprocess.normalize builds them per call, a blocking host-to-device copy each time.
        preprocess = transform.preprocess
        self.mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1).to(self.device) / preprocess.pixel_scale
        self.std = torch.tensor(preprocess.std).view(1, 3, 1, 1).to(self.device) / preprocess.pixel_scale
        self.bgr = preprocess.channel_order == "BGR"

    def __call__(self, data: list[torch.Tensor], labels: torch.Tensor, seeds: torch.Tensor,
                 paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated batch -> ((N, 3, crop, crop) float32 normalised images, (N,) labels) on the device.

        An image that fails to decode is replaced, with its label and seed, by another of the batch.
        """
        images = self.decode(data, paths)
        good = [i for i, image in enumerate(images) if image is not None]
        if not good:
            raise RuntimeError(f"No image of a batch could be decoded: {paths}")
        if len(good) < len(images):
            source = [i if images[i] is not None else good[i % len(good)] for i in range(len(images))]
            images, labels, seeds = [images[j] for j in source], labels[source], seeds[source]
        rgb = self.augment(images, seeds)
        x = rgb.flip(1) if self.bgr else rgb
        return (x - self.mean) / self.std, labels.to(self.device, non_blocking=True)

    def augment(self, images: list[torch.Tensor], seeds: torch.Tensor) -> torch.Tensor:
        """(3, H_i, W_i) uint8 images on the device and (N,) int64 sample seeds -> (N, 3, crop, crop)
        RGB in [0, 1] plus the colour shift, not yet normalised."""
        t = self.transform
        draws = draw_crops(seeds, [tuple(im.shape[-2:]) for im in images], t.scale, t.crop, t.flip,
                           t.lighting.alpha_std)
        rgb = resample_crops(images, draws.box, draws.flip, t.crop).div_(255)
        if t.lighting.alpha_std:
            rgb += colour_shift(draws.alpha, PCA_EIGVAL, PCA_EIGVEC, self.device)
        return rgb

    def decode(self, data: list[torch.Tensor], paths: list[str]) -> list[torch.Tensor | None]:
        """Encoded JPEG bytes (1-D) or already-decoded (3, H, W) uint8 -> (3, H, W) uint8 on the device,
        None where a file does not decode (reported with a warning)."""
        encoded = [i for i, d in enumerate(data) if d.dim() == 1]
        images = [d.to(self.device, non_blocking=True) if d.dim() == 3 else None for d in data]
        if not encoded:
            return images
        try:  # one batched call: nvJPEG decodes the whole list at once
            decoded = self._decode_jpeg([data[i] for i in encoded])
        except RuntimeError:  # a corrupt file fails the whole call: decode one by one to find it
            decoded = []
            for i in encoded:
                try:
                    decoded.append(self._decode_jpeg([data[i]])[0])
                except RuntimeError as error:
                    decoded.append(None)
                    warnings.warn(f"Skipping unreadable image {paths[i]}: {str(error).splitlines()[0]}",
                                  stacklevel=2)
        for i, image in zip(encoded, decoded):
            images[i] = image
        return images

    def _decode_jpeg(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        return decode_jpegs(data, self.device)
