"""``vggkit bench``: vggkit's default paths against torchvision's and timm's, on one machine, in one run.

Every competitor gets the same weights and the same input batch; timings are the
best of several interleaved rounds (so a busy machine penalises everyone alike).
Each row gives images/s, the ratio to its reference row, and the fraction of the
machine's matmul peak (measured in the same run, in the row's dtype) that the
row's FLOPs reach. Work too long to run whole is measured in part and
extrapolated; such rows say so.
"""

from __future__ import annotations

import datetime
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..evaluation.protocols import PAPER_SCALES as SCALES
from ._common import (
    MODEL,
    RSS_BATCH,
    TAPS,
    BenchResult,
    MatmulPeaks,
    Row,
    Settings,
    _finish,
    agreement,
    cpu_name,
    gflops,
    race,
    run_probe,
)

TORCHVISION_TAPS = {"features.15": "conv3_3", "features.22": "conv4_3", "features.29": "conv5_3"}




CROPS_PER_SCALE = 50  # the paper's 5x5 grid and its mirror image


FINETUNE_IMAGES, FINETUNE_EPOCHS = 500, 10


def _models():
    """vggkit's vgg16 (random init) and torchvision's and timm's holding the same weights."""
    import timm
    import torchvision

    from ..weights.factory import create_model
    from ..weights.layouts import export_state_dict

    vgg = create_model(MODEL).eval()
    reference = torchvision.models.vgg16().eval()
    reference.load_state_dict(export_state_dict(vgg, "torchvision"))
    timm_vgg = timm.create_model(MODEL, pretrained=False).eval()
    timm_vgg.load_state_dict(export_state_dict(vgg, "timm"))
    return vgg, reference, timm_vgg


def _how(fast) -> str:
    """The runtime of an optimised copy, and whether its convs run packed with their ReLU."""
    from ..runtime.fusion import PackedConv2d

    packed = any(isinstance(m, PackedConv2d) for m in fast.model.modules())
    return fast.runtime.describe() + (", oneDNN conv+ReLU on packed weights" if packed else "")


def _no_grad(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return module(x)
    return run


def classification(vgg, reference, timm_vgg, settings: Settings, log) -> list[Row]:
    from ..models.vgg import VGG
    from ..runtime.engine import optimize

    flop = gflops(lambda: VGG(MODEL), (1, 3, 224, 224))
    x = torch.randn(settings.batch, 3, 224, 224)
    fast = optimize(vgg, backend="torch")
    with torch.no_grad():
        logits_note = agreement([fast(x)], [reference(x)], fast.runtime.precision)
    log(f"(a) classification forward, batch {settings.batch}")
    best = race({"torchvision": _no_grad(reference, x), "timm": _no_grad(timm_vgg, x), "vggkit": lambda: fast(x)},
                settings.rounds)
    task = f"(a) {MODEL} classification forward"
    n = settings.batch
    rows = [Row(task, "torchvision default (float32 NCHW)", n / best["torchvision"], flop, batch=n, reference=True),
            Row(task, "timm default (float32 NCHW)", n / best["timm"], flop, batch=n),
            Row(task, f"vggkit.optimize(backend='torch') ({_how(fast)})", n / best["vggkit"], flop,
                fast.runtime.precision, n, note=f"logits {logits_note}")]
    if settings.slow_rows:
        rows += _slow_classification_rows(vgg, task, flop, settings, log)
    return rows


def _slow_classification_rows(vgg, task: str, flop: float, settings: Settings, log) -> list[Row]:
    """Forced bf16 (batch 2, one timed call) and torch.compile of the default path (compile time in the note)."""
    from ..runtime.engine import choose_runtime, cpu_has_fast_bf16, optimize

    rows = []
    if choose_runtime("auto").precision != "bf16":
        # Not the default here, so likely without a hardware path: one small timed batch shows its cost.
        log("(a) bf16 forced on a machine whose default is not bf16 (batch 2)")
        bf16 = optimize(vgg, precision="bf16", backend="torch")
        x = torch.randn(2, 3, 224, 224)
        seconds = race({"bf16": lambda: bf16(x)}, 1)["bf16"]
        note = "" if cpu_has_fast_bf16() else "no AMX/AVX-512-bf16 on this CPU: no native bf16 kernels"
        rows.append(Row(task, f"vggkit.optimize(precision='bf16') ({bf16.runtime.describe()})", 2 / seconds, flop,
                        "bf16", 2, note=note))
        del bf16
    log("(a) torch.compile of the default path (compiling)")
    compiled = optimize(vgg, compile=True, backend="torch")
    x = torch.randn(settings.batch, 3, 224, 224)
    start = time.perf_counter()
    compiled(x)
    compile_seconds = time.perf_counter() - start
    seconds = race({"compiled": lambda: compiled(x)}, max(1, settings.rounds - 1))["compiled"]
    rows.append(Row(task, f"vggkit.optimize(compile=True) ({compiled.runtime.describe()})",
                    settings.batch / seconds, flop, compiled.runtime.precision, settings.batch,
                    note=f"first call (compile) {compile_seconds:.0f} s"))
    return rows


def cpu_backends(vgg, reference, settings: Settings, log) -> list[Row]:
    """(k) float32 CPU inference of vgg16 at 224 px: torchvision eager (the reference), ``torch.compile`` of
    it, vggkit's fused oneDNN copy and onnxruntime (``optimize(backend="onnxruntime")``), on one batch.

    The rows that ``optimize(backend="auto")`` decides between. First-call costs (compiling, exporting
    and opening the session) are in the notes, not in the timings.
    """
    from ..models.vgg import VGG
    from ..runtime.engine import optimize
    from ..runtime.onnx import INSTALL, onnxruntime_available

    flop = gflops(lambda: VGG(MODEL), (1, 3, 224, 224))
    x = torch.randn(settings.batch, 3, 224, 224)
    with torch.no_grad():
        expected = reference(x)
    fused = optimize(vgg, precision="fp32", backend="torch")
    competitors = {"torchvision": _no_grad(reference, x), "fused": lambda: fused(x)}
    notes = {"fused": f"logits {agreement([fused(x)], [expected], 'fp32')}"}
    for name, make in (("compile", lambda: torch.compile(reference)),
                       ("onnxruntime", lambda: optimize(vgg, precision="fp32", backend="onnxruntime"))):
        if name == "onnxruntime" and not onnxruntime_available():
            notes[name] = f"not measured: {INSTALL}"
            continue
        log(f"(k) {name}: first call (compile or export) at batch {settings.batch}")
        run = make()
        start = time.perf_counter()
        with torch.no_grad():
            out = run(x)
        notes[name] = f"first call {time.perf_counter() - start:.0f} s; logits {agreement([out], [expected], 'fp32')}"
        competitors[name] = _no_grad(run, x)
    log(f"(k) CPU inference backends, batch {settings.batch}")
    best = race(competitors, settings.rounds)
    task = f"(k) {MODEL} float32 CPU inference backends"
    n = settings.batch
    labels = {"torchvision": "torchvision eager (float32 NCHW)",
              "compile": "torch.compile(torchvision model) (inductor, float32)",
              "fused": f"vggkit.optimize(precision='fp32') ({_how(fused)})",
              "onnxruntime": "vggkit.optimize(precision='fp32', backend='onnxruntime') (onnxruntime CPU, float32)"}
    return [Row(task, labels[name], n / seconds, flop, "fp32", n, reference=name == "torchvision",
                note=notes.get(name, "")) for name, seconds in best.items()]


def extraction(vgg, reference, settings: Settings, log) -> list[Row]:
    from torchvision.models.feature_extraction import create_feature_extractor

    from ..models.backbone import VGGBackbone
    from ..models.vgg import VGG
    from ..runtime.engine import optimize

    flop = gflops(lambda: VGGBackbone(VGG(MODEL), list(TAPS)), (1, 3, 224, 224))
    x = torch.randn(settings.batch, 3, 224, 224)
    fast = optimize(VGGBackbone(vgg, list(TAPS)), backend="torch")
    extractor = create_feature_extractor(reference, return_nodes=TORCHVISION_TAPS).eval()
    with torch.no_grad():
        maps_note = agreement(list(fast(x).values()), list(extractor(x).values()), fast.runtime.precision)
    log(f"(b) backbone features at {', '.join(TAPS)}, batch {settings.batch}")
    best = race({"torchvision": _no_grad(extractor, x), "vggkit": lambda: fast(x)}, settings.rounds)
    task = f"(b) features at {', '.join(TAPS)}"
    n = settings.batch
    return [Row(task, "torchvision create_feature_extractor (float32 NCHW)", n / best["torchvision"], flop,
                batch=n, reference=True),
            Row(task, f"vggkit.optimize(vggkit.backbone(...)) ({_how(fast)})", n / best["vggkit"],
                flop, fast.runtime.precision, n, note=f"maps {maps_note}")]


def _extraction_rss(queue) -> None:
    """In a fresh process: peak RSS with the backbone loaded, then after one batch of RSS_BATCH.

    Linux carries a parent's RSS at the fork into the child's ru_maxrss, so the
    parent must still be small when this starts.
    """
    from ..runtime.engine import optimize
    from ..weights.factory import backbone

    mib = 1024.0  # ru_maxrss is in KiB on Linux
    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / mib
    fast = optimize(backbone(MODEL, list(TAPS)), backend="torch")
    x = torch.randn(RSS_BATCH, 3, 224, 224)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / mib
    outputs = fast(x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / mib
    queue.put({"imported": imported, "model_loaded": loaded, "after_extraction": after, "input": x.nbytes / 2 ** 20,
               "outputs": sum(v.nbytes for v in outputs.values()) / 2 ** 20})


def extraction_peak_rss(log) -> dict:
    log(f"(b) peak RSS of extraction at batch {RSS_BATCH}, in a fresh process")
    return run_probe(_extraction_rss, (), "extraction memory probe")


def dense_vs_multicrop(vgg, settings: Settings, log) -> list[Row]:
    from skimage import data as photos

    from ..evaluation.protocols import (
        dense_probabilities,
        grid_crops,
        inference_networks,
        rescaled_view,
    )
    from ..models.vgg import VGG

    photo = Image.fromarray(np.asarray(photos.chelsea()))
    crop_flop = gflops(lambda: VGG(MODEL), (1, 3, 224, 224))
    rows = []
    with inference_networks(vgg, "auto") as nets:
        for scale in SCALES:
            view = rescaled_view(photo, scale)
            height, width = view.shape[-2:]
            dense_flop = 2 * gflops(lambda: VGG(MODEL).to_fully_conv(), (1, 3, height, width))
            crops = grid_crops(view, flip=True)[: settings.crops_measured]
            log(f"(c) Q={scale}: dense (image + mirror) and {len(crops)} of {CROPS_PER_SCALE} crops")
            best = race({"dense": lambda: dense_probabilities(nets, [view], flip=True),
                         "multicrop": lambda: nets.logits(nets.normalize(crops))},
                        max(1, settings.rounds - 1))
            task = f"(c) evaluation cost per image, Q={scale}"
            multicrop_seconds = best["multicrop"] * CROPS_PER_SCALE / len(crops)
            rows += [Row(task, f"multi-crop, {CROPS_PER_SCALE} crops of 224", 1 / multicrop_seconds,
                         CROPS_PER_SCALE * crop_flop, nets.runtime.precision, len(crops), reference=True,
                         note=f"{len(crops)} crops timed, x{CROPS_PER_SCALE / len(crops):g} extrapolated"),
                     Row(task, f"dense, {height}x{width} image + mirror", 1 / best["dense"], dense_flop,
                         nets.runtime.precision, 2)]
    return rows


def head_finetuning(vgg, settings: Settings, log) -> list[Row]:
    """Head-only fine-tuning (fc6-fc8 on a frozen backbone), FINETUNE_IMAGES images x FINETUNE_EPOCHS epochs.

    Cached: the backbone runs once, then every epoch trains the head on stored pool5.
    Uncached: the backbone runs again every epoch. Both are extrapolated from the
    per-image cost of the backbone and of one head step measured here.
    """
    import copy

    from ..models.vgg import VGG
    from ..runtime.engine import optimize

    n = settings.finetune_images
    x = torch.randn(n, 3, 224, 224)
    labels = torch.randint(0, 2, (n,))
    frozen = optimize(vgg.features, backend="torch")
    head = copy.deepcopy(vgg.classifier).train()
    head.fc8 = torch.nn.Linear(head.fc8.in_features, 2)
    optimizer = torch.optim.SGD(head.parameters(), lr=1e-3, momentum=0.9)
    pool5 = frozen(x).clone()

    def head_step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(head(pool5.flatten(1)), labels).backward()
        optimizer.step()

    log(f"(d) head-only fine-tuning: backbone and head steps on {n} images")
    best = race({"backbone": lambda: frozen(x), "head": head_step}, max(1, settings.rounds - 1))
    backbone_s, head_s = best["backbone"] / n, best["head"] / n
    images, epochs = FINETUNE_IMAGES, FINETUNE_EPOCHS
    cached = images * backbone_s + epochs * images * head_s
    uncached = epochs * images * (backbone_s + head_s)
    backbone_flop = gflops(lambda: VGG(MODEL).features, (1, 3, 224, 224))
    head_flop = 3 * (gflops(lambda: VGG(MODEL), (1, 3, 224, 224)) - backbone_flop)  # forward + backward
    task = f"(d) head-only fine-tuning, {images} images x {epochs} epochs"
    note = f"extrapolated from {n} images: {{:.0f}} s for the whole job"
    seen = images * epochs
    return [Row(task, "uncached (frozen backbone recomputed every epoch)", seen / uncached,
                backbone_flop + head_flop, frozen.runtime.precision, n, reference=True,
                note=note.format(uncached)),
            Row(task, "cached (backbone once, then the head on stored pool5)", seen / cached,
                (images * backbone_flop + seen * head_flop) / seen, frozen.runtime.precision, n,
                note=note.format(cached))]


def data_pipeline(settings: Settings, log) -> list[Row]:
    """Images/s of one worker: decode a JPEG, rescale to S in [256, 512], random crop, flip, colour shift."""
    import torchvision.transforms as T
    from skimage import data as photos

    from ..data.images import load_image
    from ..data.pipeline import pipeline_images_per_second

    log(f"(e) training data pipeline over {settings.pipeline_images} JPEG decodes")
    with tempfile.TemporaryDirectory(prefix="vggkit-bench-") as folder:
        samples = []
        for i, photo in enumerate((photos.chelsea(), photos.coffee(), photos.astronaut(), photos.rocket())):
            # ImageNet's typical size: about 500x375.
            path = Path(folder) / f"photo{i}.jpg"
            Image.fromarray(np.asarray(photo)).convert("RGB").resize((500, 375)).save(path, quality=90)
            samples.append((str(path), i))
        ours = pipeline_images_per_second(samples, scale=(256, 512), count=settings.pipeline_images)
        standard = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                              T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        paths = [p for p, _ in samples]
        standard(load_image(paths[0]))
        start = time.perf_counter()
        for i in range(settings.pipeline_images):
            standard(load_image(paths[i % len(paths)]))
        theirs = settings.pipeline_images / (time.perf_counter() - start)
    task = "(e) training data pipeline, one worker"
    return [Row(task, "torchvision RandomResizedCrop(224) + flip + normalise", theirs, None, batch=None,
                reference=True, note="500x375 JPEGs"),
            Row(task, "vggkit.data.transforms.TrainTransform(scale=(256, 512)): rescale, crop, flip, PCA colour",
                ours, None, batch=None, note="500x375 JPEGs")]


def run_bench(quick: bool = False, log: Callable[[str], None] | None = None) -> BenchResult:
    """Run every section in this process; ``quick`` does less of each. Returns the rows with machine facts."""
    from ..runtime.engine import choose_runtime
    from .perceptual import perceptual_rows
    from .sources import data_sources

    log = log or (lambda message: print(f"bench: {message}", file=sys.stderr, flush=True))
    settings = Settings.quick() if quick else Settings()
    start = time.perf_counter()
    runtime = choose_runtime("auto")
    machine = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cores": os.cpu_count(),
               "threads": torch.get_num_threads(), "load_average": f"{os.getloadavg()[0]:.1f}",
               "torch": torch.__version__, "runtime": runtime.describe(), "runtime_reason": runtime.reason,
               "quick": quick}
    log("matmul peak (float32, bfloat16; measured again after each section, the best counts)")
    peaks = MatmulPeaks()
    peaks.measure()
    # First, while this process is small: a child's ru_maxrss starts at its parent's RSS.
    rss = extraction_peak_rss(log)
    torch.manual_seed(0)
    vgg, reference, timm_vgg = _models()
    rows = classification(vgg, reference, timm_vgg, settings, log)
    peaks.measure()
    if settings.slow_rows:  # compiling and exporting take a minute or two
        rows += cpu_backends(vgg, reference, settings, log)
        peaks.measure()
    rows += extraction(vgg, reference, settings, log)
    peaks.measure()
    del timm_vgg
    rows += dense_vs_multicrop(vgg, settings, log)
    peaks.measure()
    rows += head_finetuning(vgg, settings, log)
    rows += data_pipeline(settings, log)
    rows += data_sources(settings, log)
    peaks.measure()
    rows += perceptual_rows(settings, log)
    return BenchResult(machine, dict(peaks.gflops), _finish(rows, peaks.gflops), rss, time.perf_counter() - start)


def write_outputs(result: BenchResult, json_path: str | os.PathLike | None = None,
                  markdown_path: str | os.PathLike | None = None) -> None:
    """Write the JSON and the Markdown table where asked (each atomically: a temp file, then a rename)."""
    from ..utils.atomic import atomic_write_text

    for path, text in ((json_path, result.to_json()), (markdown_path, result.markdown())):
        if path is None:
            continue
        atomic_write_text(text + "\n", path)
