"""``vggkit bench`` rows (f)-(h): training at the GPU's pace.

(f) the training step of A and D with the batch already on the device: a plain PyTorch
loop (autocast, channels_last, SGD; eager and compiled) against vggkit's ``TrainStep``;
(g) ``vggkit train`` end to end on a generated folder of JPEGs, with CPU decode workers and
with ``--gpu-decode``, steady state (the second epoch's images/s, which leaves out its
warm-up steps); (h) the input pipelines alone: torchvision's RandomResizedCrop loader,
vggkit's CPU workers, and GPU decode + batched augmentation.

On CUDA the rows use the paper's sizes (batch 256, 224 crops of 500x375 JPEGs). On a
CPU they run in a small form (width 1/16 networks, small images and crops, a few
steps), which checks that every path runs, not how fast a GPU is; such rows say so.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..runtime.engine import DTYPES
from ._common import Row, _finish, device_matmul_peak, gflops, race, synchronizer


@dataclass(frozen=True)
class TrainSizes:
    """How big each row's work is: full size on a GPU, a small form on a CPU."""

    batch: int
    steps: int  # timed steps per round of (f); steps per epoch in (g)
    width: float
    crop: int
    scale: tuple[int, int]
    image_size: tuple[int, int]  # (width, height) of the generated JPEGs
    classes: int
    workers: int
    note: str

    images: int = 0  # generated training JPEGs (at least batch x (steps + 2))

    @classmethod
    def for_device(cls, settings, device: torch.device) -> "TrainSizes":
        """``settings``: ``bench.Settings`` or ``bench_gpu.DeviceSettings`` (``batch``, ``train_steps``,
        ``train_images`` where given)."""
        if device.type == "cuda":
            return cls(batch=settings.batch, steps=getattr(settings, "train_steps", 20), width=1.0, crop=224,
                       scale=(256, 256), image_size=(500, 375), classes=100,
                       workers=max(1, (os.cpu_count() or 2) - 1), note="", images=getattr(settings, "train_images", 0))
        return cls(batch=settings.batch, steps=2, width=1 / 16, crop=32, scale=(36, 48), image_size=(64, 48),
                   classes=4, workers=0, note="CPU small form: width 1/16, 32 px crops of 64x48 JPEGs")


def train_rows(settings, device: torch.device | str, log: Callable[[str], None],
               peaks: dict[str, float] | None = None) -> list[Row]:
    """Rows (f), (g) and (h) on ``device``, with their ratios and fractions of the matmul peak filled in.

    ``settings``: ``bench.Settings`` or ``bench_gpu.DeviceSettings``; compiled rows run where
    ``settings.compile`` (or ``slow_rows``) is true. ``peaks`` (GFLOP/s per dtype): the matmul peaks
    already measured in this run (the device bench's); measured here when not given."""
    from ..runtime.engine import choose_runtime

    device = torch.device(device)
    sizes = TrainSizes.for_device(settings, device)
    dtype = choose_runtime("auto", device).precision
    rows = []
    for name in ("A", "D"):
        rows += step_rows(name, sizes, device, settings, log)
    with tempfile.TemporaryDirectory(prefix="vggkit-bench-train-") as folder:
        data = make_jpeg_folder(Path(folder) / "data", sizes)
        rows += end_to_end_rows(data, Path(folder), sizes, device, log)
        rows += pipeline_rows(data, sizes, device, settings, log)
    if peaks is None or dtype not in peaks:
        peaks = {"fp32": device_matmul_peak(device, torch.float32), dtype: device_matmul_peak(device, DTYPES[dtype])}
    return _finish(rows, peaks)


RECIPES = {"A": "A", "D": "D-256"}  # the model's S=256 recipe


def step_rows(name: str, sizes: TrainSizes, device: torch.device, settings, log) -> list[Row]:
    """Images/s of ``steps`` optimizer steps on one batch already on the device."""
    from ..models.vgg import VGG
    from ..runtime.engine import choose_runtime
    from ..training.loop import compile_step
    from ..training.recipe import Recipe
    from ..training.step import TrainStep
    from ..weights.factory import create_model

    n, task = sizes.batch, f"(f) training step of {name}, data on the device"
    flop = 3 * gflops(lambda: VGG(name, num_classes=sizes.classes, width=sizes.width), (1, 3, sizes.crop, sizes.crop))
    x = torch.randn(n, 3, sizes.crop, sizes.crop, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, sizes.classes, (n,), device=device)
    recipe = Recipe.load(RECIPES[name], [f"model.num_classes={sizes.classes}", f"model.width={sizes.width}"])
    # vggkit's step as a long run on this device builds it (compile="auto" for the paper's 74 epochs).
    compiled = getattr(settings, "compile", getattr(settings, "slow_rows", False))
    runtime = choose_runtime("auto", device, compile=compiled and compile_step(recipe, device, steps_per_epoch=5004))
    compiled_plain = compiled
    dtype = runtime.dtype

    def model():
        torch.manual_seed(0)
        return create_model(name, num_classes=sizes.classes, width=sizes.width).to(
            device, memory_format=torch.channels_last).train()

    def plain(compiled: bool) -> Callable[[], None]:
        net = model()
        run = torch.compile(net) if compiled else net
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

        def steps():
            for _ in range(sizes.steps):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss = F.cross_entropy(run(x).float(), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            synchronizer(device)()
        return steps

    step = TrainStep(model(), recipe, runtime, distributed=False, accumulation=1)

    def vggkit_steps():
        for _ in range(sizes.steps):
            step(lambda: (x, y))
        synchronizer(device)()

    competitors = {"plain": plain(False), "vggkit": vggkit_steps}
    if compiled_plain:
        competitors["plain compiled"] = plain(True)
    log(f"{task}: {sizes.steps} steps of batch {n} per round")
    first = time.perf_counter()
    vggkit_steps()  # compiles where runtime.compile
    warm_up = time.perf_counter() - first
    best = race(competitors, max(1, settings.rounds - 1))
    images = n * sizes.steps
    precision = runtime.precision
    rows = [Row(task, f"plain PyTorch loop ({precision} autocast, channels_last, SGD)", images / best["plain"], flop,
                precision, n, reference=True, note=sizes.note)]
    if compiled_plain:
        rows.append(Row(task, "the same loop, torch.compile", images / best["plain compiled"], flop, precision, n,
                        note=sizes.note))
    rows.append(Row(task, f"vggkit TrainStep ({runtime.describe()}, "
                          f"{'fused' if device.type == 'cuda' else 'for-loop'} SGD)",
                    images / best["vggkit"], flop, precision, n,
                    note=(f"first {sizes.steps} steps (compiling) {warm_up:.0f} s. " if runtime.compile else "")
                    + sizes.note))
    return rows


def make_jpeg_folder(root: Path, sizes: TrainSizes) -> Path:
    """``root/train/<class>/*.JPEG`` (3 steps' worth of batches per epoch, at least) and a small val split:
    photos rescaled to ``image_size``, shifted and mirrored so that no two files are alike."""
    from skimage import data as photos

    sources = [np.asarray(Image.fromarray(np.asarray(p)).convert("RGB").resize(sizes.image_size))
               for p in (photos.chelsea(), photos.coffee(), photos.astronaut(), photos.rocket())]
    per_class = max(2, max(sizes.images, sizes.batch * (sizes.steps + 2)) // sizes.classes + 1)
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for label in range(sizes.classes):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.roll(sources[(label + i) % len(sources)], int(rng.integers(0, sizes.image_size[0])), 1)
                Image.fromarray(pixels[:, ::-1] if i % 2 else pixels).save(folder / f"{i}.JPEG", quality=90)
    return root


def end_to_end_rows(data: Path, scratch: Path, sizes: TrainSizes, device: torch.device, log) -> list[Row]:
    """``vggkit train`` of D for two epochs; the second epoch's steady-state images/s (its warm-up left out)."""
    from ..models.vgg import VGG
    from ..training.loop import train

    task = "(g) vggkit train D end to end, JPEG folder"
    flop = 3 * gflops(lambda: VGG("D", num_classes=sizes.classes, width=sizes.width), (1, 3, sizes.crop, sizes.crop))
    common = [f"model.num_classes={sizes.classes}", f"model.width={sizes.width}", f"data.crop={sizes.crop}",
              f"data.scale={list(sizes.scale)}", f"data.val_scale={sizes.scale[0]}", f"data.workers={sizes.workers}",
              f"optim.batch_size={sizes.batch}", "schedule.epochs=2", "init.from_a=''", "init.method='glorot'",
              f"run.device='{device}'", "run.compile=" + ("true" if device.type == "cuda" else "false")]
    rows = []
    for how, gpu_decode in ((f"{sizes.workers} CPU decode workers", False), ("--gpu-decode", True)):
        log(f"{task}: {how}")
        result = train(RECIPES["D"], data, scratch / f"run-{int(gpu_decode)}", overrides=common + [
            f"data.gpu_decode={str(gpu_decode).lower()}"], progress=False)
        row = result.history[-1]
        rows.append(Row(task, f"vggkit train --recipe D-256, {how}", row["images_per_s"], flop,
                        _precision(device), sizes.batch,
                        reference=not gpu_decode,
                        note=f"epoch 2 steady state ({row['warmup_steps']} warm-up steps left out). "
                             f"{sizes.note}".strip()))
    return rows


def _precision(device: torch.device) -> str:
    from ..runtime.engine import choose_runtime

    return choose_runtime("auto", device).precision


def pipeline_rows(data: Path, sizes: TrainSizes, device: torch.device, settings, log) -> list[Row]:
    """Images/s of each input pipeline with ``sizes.workers`` loader workers, over ``2 * steps`` batches."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from ..data.folders import scan_folder
    from ..data.pipeline import EncodedImages, EpochSampler, GpuAugment, SeededAugment, collate_encoded
    from ..data.transforms import TrainTransform

    task = f"(h) training input pipeline, {sizes.workers} workers"
    samples = scan_folder(data / "train").samples
    batches = min(2 * sizes.steps, len(samples) // sizes.batch)
    transform = TrainTransform(scale=sizes.scale, crop=sizes.crop)
    options = dict(batch_size=sizes.batch, num_workers=sizes.workers, pin_memory=device.type == "cuda",
                   persistent_workers=sizes.workers > 0, drop_last=True)
    sampler = EpochSampler(len(samples), 1, 0, seed=0, length=batches * sizes.batch)
    reference = T.Compose([T.RandomResizedCrop(sizes.crop), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    gpu = GpuAugment(transform, device)
    loaders = {
        "torchvision": (DataLoader(ImageFolder(str(data / "train"), reference), shuffle=True, **options),
                        lambda batch: batch[0].to(device, non_blocking=True)),
        "cpu": (DataLoader(SeededAugment(samples, transform, 0), sampler=sampler, **options),
                lambda batch: batch[0].to(device, non_blocking=True)),
        "gpu": (DataLoader(EncodedImages(samples, 0), sampler=sampler, collate_fn=collate_encoded, **options),
                lambda batch: gpu(*batch)[0]),
    }

    def run(name: str) -> Callable[[], None]:
        loader, finish = loaders[name]

        def epoch():
            for i, batch in enumerate(loader):
                finish(batch)
                if i + 1 == batches:
                    break
            synchronizer(device)()
        return epoch

    log(f"{task}: {batches} batches of {sizes.batch} per round")
    best = race({name: run(name) for name in loaders}, max(1, settings.rounds - 1))
    n = batches * sizes.batch
    size = f"{sizes.image_size[0]}x{sizes.image_size[1]} JPEGs"
    note = f"{size}. {sizes.note}".strip()
    return [Row(task, "torchvision ImageFolder + RandomResizedCrop + flip + normalise", n / best["torchvision"], None,
                batch=sizes.batch, reference=True, note=note),
            Row(task, f"vggkit CPU workers: TrainTransform(scale={sizes.scale})", n / best["cpu"], None,
                batch=sizes.batch, note=note),
            Row(task, f"vggkit --gpu-decode: batched decode + augmentation on {device.type}", n / best["gpu"], None,
                batch=sizes.batch, note=note)]
