"""Bench row (i): ``vggkit.evaluate``'s protocols against torchvision's reference centre-crop loop.

Both read the same generated folder of 500x375 JPEGs (ImageNet's usual size, with
a few portrait ones) from disk, decode, rescale and classify them:

* reference: ``ImageFolder`` + ``DataLoader`` (Resize(256), CenterCrop(224)) + torchvision's
  vgg16 holding the same weights, float32, one forward pass per batch;
* vggkit: ``evaluate`` with its defaults on the device (GPU decode on CUDA, batched
  protocols): centre crop; dense at Q in {256, 384, 512} with flips; multi-crop at
  Q = 384 (50 crops); all four protocols at the three scales in one pass.

Each figure is a whole pass over the folder (worker start-up included, as a user
sees it), the best of interleaved rounds after a warm-up pass (the pass of all
four protocols: timed once, after the others warmed up). On the CPU at toy
size (``DeviceSettings.tiny``, for the tests) the model is a 1/32-width vgg16.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..evaluation.protocols import PAPER_SCALES as SCALES
from ._common import MODEL, Row, gflops, race, synchronizer

MULTICROP_SCALE = 384


CLASSES = ("n01440764", "n01443537")  # two class folders; the head has as many outputs


PORTRAIT_EVERY = 4  # every 4th image 375x500, as ImageNet mixes both orientations


def make_jpeg_folder(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` 500x375 JPEGs (every ``PORTRAIT_EVERY``-th 375x500) of smooth random colour fields under
    ``root/<class>/``, quality 90: about ImageNet's file size and decode cost."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        size = (375, 500) if index % PORTRAIT_EVERY == PORTRAIT_EVERY - 1 else (500, 375)
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, (size[1], size[0], 3))
        pixels = np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / CLASSES[index % len(CLASSES)] / f"image{index:05d}.jpg", quality=90)
    return root


def reference_loop(vgg, root: Path, device: torch.device, batch: int, workers: int) -> Callable[[], float]:
    """torchvision's reference evaluation: ImageFolder + DataLoader + vgg16, float32 -> a callable that
    runs one pass and returns its top-1 error in %."""
    import torchvision
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from ..weights.layouts import export_state_dict

    if vgg.width == 1:
        reference = torchvision.models.vgg16(num_classes=vgg.num_classes)
        reference.load_state_dict(export_state_dict(vgg, "torchvision"))
    else:  # toy size: torchvision has no narrow vgg16; the same plain float32 module stands in
        reference = vgg
    reference = reference.eval().to(device)
    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    dataset = ImageFolder(str(root), transform)

    def run() -> float:
        wrong = 0
        loader = DataLoader(dataset, batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda")
        with torch.inference_mode():
            for x, y in loader:
                predicted = reference(x.to(device, non_blocking=True)).argmax(1).cpu()
                wrong += int((predicted != y).sum())
        return 100.0 * wrong / len(dataset)

    return run


def eval_rows(settings, device: torch.device | str, log) -> list[Row]:
    """Row (i): images/s of the reference loop and of ``evaluate``'s protocols on the same JPEGs.

    ``settings``: a ``bench_gpu.DeviceSettings`` (``eval_images``, ``batch``, ``rounds``;
    ``image_size`` under 224 means the toy size of the tests).
    """
    from ..evaluation.evaluate import evaluate
    from ..evaluation.protocols import CROP, GRID, protocol_flops
    from ..models.vgg import VGG
    from ..runtime.engine import optimize
    from ..weights.factory import create_model

    device = torch.device(device)
    toy = settings.image_size < CROP
    width = 1 / 32 if toy else 1.0
    workers = 0 if toy else min(16, os.cpu_count() or 1)
    sync = synchronizer(device)
    torch.manual_seed(0)
    vgg = create_model(MODEL, num_classes=len(CLASSES), width=width).eval()
    fast = optimize(vgg, device=device, backend="torch")  # one inference copy for every pass
    n = settings.eval_images
    batch = max(settings.batch, 50)  # crops per pass: at least the 50 of one image's scale
    with tempfile.TemporaryDirectory(prefix="vggkit-bench-eval-") as folder:
        log(f"(i) evaluation: writing {n} 500x375 JPEGs")
        root = make_jpeg_folder(Path(folder), n)
        reference = reference_loop(vgg, root, device, batch, workers)
        errors: dict[str, float] = {}

        def ours(protocol, scales) -> Callable[[], None]:
            def run():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = evaluate(fast, root, protocol=protocol, scales=scales, batch_size=batch,
                                      workers=workers, progress=False)
                errors[str(protocol)] = result[protocol if isinstance(protocol, str) else "center"].top1_error
            return run

        competitors = {"reference": lambda: errors.__setitem__("reference", reference()),
                       "center": ours("center", SCALES),
                       "dense": ours("dense", SCALES),
                       "multicrop": ours("multicrop", (MULTICROP_SCALE,))}
        log(f"(i) evaluation: torchvision's loop, centre, dense, multi-crop over {n} images on {device.type}")
        best = race(competitors, settings.rounds, sync)
        log("(i) evaluation: all four protocols at three scales in one pass (timed once, all warm)")
        every, start = ours(["center", "dense", "multicrop", "dense+multicrop"], SCALES), time.perf_counter()
        every()
        sync()
        best["all"] = time.perf_counter() - start

    flops = protocol_flops(vgg, 375, 500, SCALES)
    crop_flop = gflops(lambda: VGG(MODEL, num_classes=len(CLASSES), width=width), (1, 3, CROP, CROP))
    dense_flop = sum(flops["dense"]) / 1e9
    crops = GRID * GRID * 2
    task = f"(i) evaluation, {n} JPEGs 500x375 from disk"
    precision = fast.runtime.precision
    how = f"vggkit.evaluate ({fast.runtime.describe()}, batch {batch})"
    agreement = f"top-1 error {errors['center']:.1f}% vs torchvision's {errors['reference']:.1f}% (same weights)"
    return [
        Row(task, "torchvision ImageFolder + DataLoader + vgg16, centre crop (float32)", n / best["reference"],
            crop_flop, "fp32", batch, reference=True, note=f"{workers} workers"),
        Row(task, f"centre crop: {how}", n / best["center"], crop_flop, precision, batch, note=agreement),
        Row(task, f"dense, Q = {', '.join(map(str, SCALES))}, with flips: {how}", n / best["dense"], dense_flop,
            precision, batch),
        Row(task, f"multi-crop, Q = {MULTICROP_SCALE}, {crops} crops: {how}", n / best["multicrop"],
            crops * crop_flop, precision, batch, note=f"{n * crops / best['multicrop']:.0f} crops/s"),
        Row(task, f"all four protocols, Q = {', '.join(map(str, SCALES))}, one pass: {how}", n / best["all"],
            crop_flop + dense_flop + len(SCALES) * crops * crop_flop, precision, batch,
            note=f"50,000 images in {50_000 * best['all'] / n / 60:.1f} min at this rate"),
    ]
