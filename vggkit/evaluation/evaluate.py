"""``evaluate``: the paper's test protocols over a class-folder dataset, with top-1/top-5 errors (Tables 3-5).

One pass over the data serves every requested protocol: each file is read and
decoded once, rescaled to every Q, and the views of a window of images go to the
centre, dense and multi-crop protocols of ``vggkit.evaluation.protocols``, which batch them
across images. Decoding runs in DataLoader workers with PIL, or, on a GPU, batched
on the device (``vggkit.data.device_decode``: workers only read the files).
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.device_decode import decode_on_device, read_source
from ..data.folders import FolderScan, report_skipped
from ..data.sources import DataInput, detect, open_scan
from ..data.images import ImageError, load_image
from ..models.configs import resolve
from ..models.vgg import VGG
from ..runtime.engine import LONG_JOB_IMAGES
from ..utils.atomic import DiskFullError, is_disk_full
from ..utils.checks import RANDOM_INIT_SEED, check_int
from ..utils.distributed import gather, is_main, rank_and_world, rank_device, rank_indices
from ..utils.choices import DECODERS, PROTOCOLS, RELEASES
from ..utils.paths import looks_like_a_path, writable_file
from ..weights.checkpoint import check_checkpoint_file, check_weights_name
from ..weights.factory import checkpoint_metadata, create_model
from .protocols import (
    PAPER_SCALES,
    InferenceNetworks,
    ProtocolViews,
    as_vgg,
    center_probabilities,
    check_scales,
    dense_probabilities_batch,
    device_views,
    inference_networks,
    multicrop_probabilities_batch,
)

PROTOCOL_TITLES = {"center": "centre crop", "dense": "dense", "multicrop": "multi-crop",
                   "dense+multicrop": "dense + multi-crop"}


TOP_K = 5


PIL_WINDOW = 16  # images per window on the PIL path for dense and multi-crop




@dataclass(frozen=True)
class ProtocolResult:
    """One protocol's errors (in %, as the paper reports them) and speed.

    ``seconds`` is the pass's wall time had this protocol run alone: its own network
    time plus the reading and decoding that all protocols of the pass share.
    """

    protocol: str
    scales: tuple[int, ...]
    top1_error: float
    top5_error: float
    n_images: int
    per_class_accuracy: dict[str, float]
    seconds: float
    top_k: int = TOP_K  # min(5, classes): "top-5" with fewer than 5 classes is top-k

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class EvaluationResult:
    """Every protocol of one pass over a dataset: ``result["dense"].top1_error``.

    With a single protocol its figures are also attributes: ``result.top1_error``.
    """

    protocols: dict[str, ProtocolResult]
    model_name: str
    data_dir: Path
    classes: list[str]
    flip: bool
    runtime: str
    seconds: float  # wall time of the whole pass
    skipped: list[tuple[str, str]] = field(default_factory=list)
    predictions_csv: Path | None = None

    def __getitem__(self, protocol: str) -> ProtocolResult:
        return self.protocols[protocol]

    def _only(self) -> ProtocolResult:
        if len(self.protocols) != 1:
            raise AttributeError(f"This pass ran {len(self.protocols)} protocols; "
                                 f"read one of them, e.g. result[{next(iter(self.protocols))!r}].top1_error.")
        return next(iter(self.protocols.values()))

    top1_error = property(lambda self: self._only().top1_error)
    top5_error = property(lambda self: self._only().top5_error)
    n_images = property(lambda self: self._only().n_images)
    per_class_accuracy = property(lambda self: self._only().per_class_accuracy)
    images_per_second = property(lambda self: self._only().images_per_second)

    def table(self) -> str:
        """A title line, then the errors as a Markdown table shaped like the paper's Table 5 (a row per protocol)."""
        k = min(r.top_k for r in self.protocols.values())
        n_images = next(iter(self.protocols.values())).n_images
        rows = [f"{self.model_name} on {self.data_dir}: {n_images} images, {len(self.classes)} classes, "
                f"{'with' if self.flip else 'without'} flips; {self.runtime}; {self.seconds:.1f} s", "",
                f"| protocol | scales | top-1 error (%) | top-{k} error (%) | images | images/s |",
                "|---|---|---:|---:|---:|---:|"]
        for result in self.protocols.values():
            scales = ("shortest side " if result.protocol == "center" else "Q = ") + ",".join(map(str, result.scales))
            rows.append(f"| {PROTOCOL_TITLES[result.protocol]} | {scales} | {result.top1_error:.2f} | "
                        f"{result.top5_error:.2f} | {result.n_images} | {result.images_per_second:.2f} |")
        return "\n".join(rows)


def load_model(model: str | os.PathLike, weights: str | os.PathLike | None = None) -> VGG:
    """A model to evaluate: a name with optional ``weights``, or a vggkit checkpoint file, which names its
    configuration, class count, class names and preprocessing (e.g. a fine-tuned 2-class model).
    """
    path = Path(model)
    if not path.exists() and looks_like_a_path(model):
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    if not path.exists():
        spec = resolve(str(model))  # a misspelt name is an error before the warning below
        if weights is not None and str(weights).lower() not in RELEASES:
            check_weights_name(weights)
        if weights is None:
            warnings.warn(f"Evaluating a randomly initialised {model} (seed {RANDOM_INIT_SEED}): its errors are "
                          f"chance level. Pass weights='imagenet', 'caffe', 'timm' or a file.", stacklevel=2)
        return create_model(spec, weights=weights, seed=RANDOM_INIT_SEED if weights is None else None)
    check_checkpoint_file(path)
    if weights is not None:
        raise ValueError(f"{path} is a checkpoint file and brings its own weights; leave out the weights "
                         f"(or give a model name with weights={str(weights)!r}).")
    meta = checkpoint_metadata(path)
    if not meta.get("model_name"):
        raise ValueError(f"{path} does not say which configuration it holds; "
                         f"give the model name and the file as its weights (--model vgg16 --weights {path}).")
    head = (meta.get("head") or {}).get("type", "vgg")
    if head != "vgg":
        raise ValueError(f"{path} has a {head!r} head; the paper's protocols need its classifier head "
                         f"(fc6-fc8), as fine-tuning with head='vgg' keeps it.")
    return create_model(meta["spec"], weights=path)


def check_protocols(protocol: str | Sequence[str]) -> list[str]:
    """One protocol name or several -> a list without repeats; unknown names are an error listing the valid ones."""
    protocols = [protocol] if isinstance(protocol, str) else list(protocol)
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"Unknown protocol(s) {unknown or protocols}; choose from {', '.join(PROTOCOLS)}.")
    return list(dict.fromkeys(protocols))


def _names(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def match_classes(model: nn.Module, data_dir: DataInput, classes: str | os.PathLike | None = None) -> FolderScan:
    """Scan ``data_dir`` (class folders, WebDataset shards or a Hugging Face dataset: ``data.sources``)
    with labels in the model's output order.

    A model with ``class_names`` must have exactly the data's classes (in any order);
    otherwise the data's classes (folders sorted; shards' and datasets' label order) are
    taken as the output order (ImageNet val in wnid folders sorted is torchvision's order),
    so their count must be the model's. ``classes``: a file naming shards' classes, one a line.
    """
    vgg = as_vgg(model)
    folders = detect(data_dir) == "folder"
    unit, where = ("class folders", "folders") if folders else ("classes", "data")
    scan = open_scan(data_dir, classes=classes, num_classes=vgg.num_classes)
    names = vgg.class_names
    if names:
        if sorted(names) != sorted(scan.classes):
            only_model = sorted(set(names) - set(scan.classes))
            only_folder = sorted(set(scan.classes) - set(names))
            raise ValueError(
                f"The model's classes do not match the {unit} of {scan.root}.\n"
                f"  model ({len(names)}): {_names(list(names))}\n"
                f"  {where} ({len(scan.classes)}): {_names(scan.classes)}\n"
                f"  only in the model: {_names(only_model) or '-'}; "
                f"only in the {where}: {_names(only_folder) or '-'}.\n"
                f"Evaluate on data with one class (a sub-folder, or a label) per model class.")
        output_index = {name: i for i, name in enumerate(names)}
        scan = FolderScan(scan.root, list(names),
                          [(path, output_index[scan.classes[label]]) for path, label in scan.samples], scan.skipped)
    elif len(scan.classes) != vgg.num_classes:
        raise ValueError(
            f"The model has {vgg.num_classes} outputs but {scan.root} has {len(scan.classes)} {unit} "
            f"({_names(scan.classes)}). Evaluate on data with one class per output, "
            f"or load weights made for these classes.")
    if not scan.samples:
        raise ValueError(f"No images in {scan.root}: its {len(scan.classes)} {unit} hold no image files "
                         f"(expected {scan.root}/<class>/<image>.jpg, or shards or a dataset of labelled images).")
    return scan


class ViewsDataset(Dataset):
    """(path, label) samples -> {"index", "label", "center", "scaled"}, or {"index", "label", "error"}.

    ``indices``: the samples this dataset serves, in order (default all; a torchrun rank's share).
    An unreadable file is returned as an error, to be reported and left out of the
    errors, never replaced by another image.
    """

    def __init__(self, samples: list[tuple[str, int]], views: ProtocolViews,
                 indices: Sequence[int] | None = None) -> None:
        self.samples, self.views = samples, views
        self.indices = range(len(samples)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = self.indices[position]
        path, label = self.samples[index]
        try:
            return {"index": index, "label": label, **self.views(load_image(path))}
        except ImageError as error:
            return {"index": index, "label": label, "error": error.reason}


class EncodedDataset(Dataset):
    """(path, label) samples -> {"index", "label", "data"} for ``decode_on_device``, or {"index", "label", "error"}.

    Workers only read the files (JPEGs as their bytes); what decode_jpeg cannot read
    is decoded here with PIL (``device_decode.read_source``). ``indices`` as ``ViewsDataset``'s.
    """

    def __init__(self, samples: list[tuple[str, int]], indices: Sequence[int] | None = None) -> None:
        self.samples = samples
        self.indices = range(len(samples)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = self.indices[position]
        path, label = self.samples[index]
        try:
            return {"index": index, "label": label, "data": read_source(path)}
        except ImageError as error:
            return {"index": index, "label": label, "error": error.reason}


def decode_batch(loaded: list[dict], samples: list[tuple[str, int]], device: torch.device,
                 scales: Sequence[int], center) -> list[dict]:
    """``EncodedDataset`` items -> ``ViewsDataset``'s items, decoded and rescaled on ``device``."""
    readable = [it for it in loaded if "error" not in it]
    every_scale = tuple(scales) + ((center.resize_size,) if center is not None else ())
    images = decode_on_device([it["data"] for it in readable], [samples[it["index"]][0] for it in readable], device,
                              every_scale)
    views = iter(device_views([image for image in images if not isinstance(image, str)], scales, center))
    items = [it for it in loaded if "error" in it]
    for it, image in zip(readable, images):
        known = {"index": it["index"], "label": it["label"]}
        items.append({**known, "error": image} if isinstance(image, str) else {**known, **next(views)})
    return items


def as_list(batch: list[dict]) -> list[dict]:
    """DataLoader collate: keep the images' views apart (their sizes differ)."""
    return batch


class TopK:
    """The top-k classes and probabilities of every image of one protocol, in file order."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.indices: list[int] = []
        self.labels: list[int] = []
        self.classes: list[torch.Tensor] = []
        self.probabilities: list[torch.Tensor] = []
        self.top1_wrong = 0

    def add(self, indices: list[int], labels: list[int], probabilities: torch.Tensor) -> None:
        """One batch: sample indices, true labels, softmax (N, classes)."""
        top = probabilities.topk(self.k, dim=-1)
        self.indices += indices
        self.labels += labels
        self.classes.append(top.indices)
        self.probabilities.append(top.values)
        self.top1_wrong += int((top.indices[:, 0] != torch.tensor(labels)).sum())

    @property
    def top1_error(self) -> float:
        return 100.0 * self.top1_wrong / max(1, len(self.labels))

    @classmethod
    def merged(cls, parts: list["TopK"]) -> "TopK":
        """The tallies of several ranks as one, in sample order."""
        whole = cls(parts[0].k)
        indices = [i for part in parts for i in part.indices]
        if not indices:
            return whole
        order = torch.tensor(indices).argsort()
        whole.indices = [indices[i] for i in order.tolist()]
        whole.labels = [label for part in parts for label in part.labels]
        whole.labels = [whole.labels[i] for i in order.tolist()]
        whole.classes = [torch.cat([c for part in parts for c in part.classes])[order]]
        whole.probabilities = [torch.cat([p for part in parts for p in part.probabilities])[order]]
        whole.top1_wrong = sum(part.top1_wrong for part in parts)
        return whole

    def result(self, protocol: str, scales: tuple[int, ...], class_names: list[str],
               seconds: float) -> ProtocolResult:
        top, labels = torch.cat(self.classes), torch.tensor(self.labels)
        hit1 = top[:, 0] == labels
        hitk = (top == labels[:, None]).any(dim=1)
        per_class = {class_names[c]: 100.0 * int(hit1[labels == c].sum()) / int((labels == c).sum())
                     for c in labels.unique().tolist()}
        n = len(labels)
        return ProtocolResult(protocol, scales, 100.0 * (n - int(hit1.sum())) / n, 100.0 * (n - int(hitk.sum())) / n,
                              n, per_class, seconds, self.k)


def evaluate(model: nn.Module, data_dir: DataInput, protocol: str | Sequence[str] = "dense",
             scales: int | Sequence[int] = PAPER_SCALES, flip: bool = True, batch_size: int | None = None,
             workers: int | None = None, precision: str = "auto", device: str | torch.device | None = None,
             predictions_csv: str | os.PathLike | None = None, progress: bool = True, decode: str = "auto",
             compile: bool | str = "auto", classes: str | os.PathLike | None = None) -> EvaluationResult:
    """Evaluate ``model`` on a dataset with the paper's protocols (section 3.2).

    ``data_dir``: a class-folder tree, WebDataset shards (a brace pattern, a list, a folder of
    ``.tar``) or a Hugging Face dataset (``data.sources``; ``classes`` names shards' classes).

    ``protocol``: "center", "dense", "multicrop", "dense+multicrop", or a list of them,
    all computed in one pass. ``scales``: the test scales Q of dense and multi-crop
    (one int or several; softmax averaged over them). ``flip``: average in the mirror
    images. ``batch_size``: crops per forward pass (dense: as many images as hold that
    many crops' pixels), and images per window that are batched together (at most
    ``PIL_WINDOW`` where PIL workers make the dense and multi-crop views); default
    256 on a GPU, 50 on the CPU. The model runs as an inference copy under
    ``vggkit.runtime`` (``precision``, ``device``; ``compile="auto"`` compiles passes of
    ``LONG_JOB_IMAGES`` or more where that gains) with its own preprocessing; the model
    itself is not changed. ``decode``: "pil" (in DataLoader workers), "device" (JPEGs
    batched through decode_jpeg and rescaled on the runtime's device, PIL for the
    rest) or "auto" (device on CUDA, else PIL). ``predictions_csv`` writes every
    image's top-5 per protocol, row by row as the pass goes, into ``<predictions_csv>.partial``, renamed
    to ``predictions_csv`` when the pass completes. Returns an ``EvaluationResult`` (errors in %).

    Under an initialised process group (``torchrun``) each rank evaluates every world-size-th
    image (on CUDA its own GPU, ``cuda:LOCAL_RANK``), the tallies are gathered, and every rank
    returns the one-process result; only rank 0 writes the CSV (every image once, in dataset order)
    and warns.
    """
    protocols = check_protocols(protocol)
    scales = check_scales(scales)
    if batch_size is not None:
        check_int("batch_size", batch_size, 1)
    if workers is not None:
        check_int("workers", workers, 0)
    if decode not in DECODERS:
        raise ValueError(f"Unknown decode {decode!r}; choose from {', '.join(DECODERS)}.")
    if predictions_csv is not None and is_main():
        writable_file(predictions_csv, example="predictions.csv")  # before the pass, not after it
    scan = match_classes(model, data_dir, classes)
    if is_main():
        report_skipped(scan.skipped)
    workers = min(8, os.cpu_count() or 1) if workers is None else workers

    long_job = len(scan.samples) >= LONG_JOB_IMAGES
    with inference_networks(model, precision, rank_device(device), compile, long_job) as nets:
        if any(p in ("dense", "dense+multicrop") for p in protocols):
            nets.require_dense()  # before reading any image
        plan = PassPlan.make(nets, protocols, scales, batch_size, decode)
        run = run_pass(nets, scan, plan, protocols, flip, workers, predictions_csv, progress)
        runtime = nets.runtime.describe()
    run = gather_pass(run, scan, plan, protocols, predictions_csv)
    if is_main():
        report_skipped(run.failed)
    if not run.tallies[protocols[0]].labels:
        raise ValueError(f"None of the {len(scan.samples)} images in {scan.root} could be read.")
    network_seconds = run.network_seconds
    shared = max(0.0, run.wall - sum(network_seconds.values()))
    network_seconds["dense+multicrop"] = network_seconds["dense"] + network_seconds["multicrop"]
    results = {p: run.tallies[p].result(p, (plan.preprocess.resize_size,) if p == "center" else scales,
                                        scan.classes, network_seconds[p] + shared)
               for p in protocols}
    return EvaluationResult(results, as_vgg(model).name, scan.root, scan.classes, flip, runtime, run.wall,
                            scan.skipped + run.failed, run.csv_path)


@dataclass
class PassPlan:
    """How one pass reads: crops per forward pass, images per window, the views made, where decoding runs."""

    batch_size: int
    window: int
    view_scales: tuple[int, ...]
    center: object  # the preprocessing whose centre crop is made, or None
    decode_here: bool
    preprocess: object

    @classmethod
    def make(cls, nets: InferenceNetworks, protocols: list[str], scales: tuple[int, ...], batch_size: int | None,
             decode: str) -> "PassPlan":
        preprocess, on_device = nets.preprocess, nets.runtime.device
        # On the CPU a dense or multi-crop pass of one image already keeps every core busy, so by default
        # its window is one image: the progress bar moves per image (a window of 16 full-size images at
        # three scales would leave it still for a minute). A batch_size given is honoured.
        cpu_one_by_one = batch_size is None and on_device.type != "cuda"
        batch_size = batch_size or (256 if on_device.type == "cuda" else 50)
        view_scales = tuple(scales) if protocols != ["center"] else ()
        center = preprocess if "center" in protocols else None
        decode_here = decode == "device" or (decode == "auto" and on_device.type == "cuda")
        # A window of images: centre crops, dense buckets of one size and multi-crop's crops batch across
        # its images. batch_size of them where workers hold only files' bytes or centre crops; fewer where
        # they hold every rescaled view (PIL: ~2 MB an image at three scales, prefetched by every worker).
        window = (batch_size if protocols == ["center"] else 1 if cpu_one_by_one
                  else batch_size if decode_here else min(batch_size, PIL_WINDOW))
        return cls(batch_size, window, view_scales, center, decode_here, preprocess)


@dataclass
class PassTallies:
    """What a pass (or this rank's share of it) found: top-k per protocol, unreadable files, times."""

    tallies: dict[str, TopK]
    failed: list[tuple[str, str]]
    failed_indices: list[int]
    network_seconds: dict[str, float]
    wall: float
    csv_path: Path | None = None


def run_pass(nets: InferenceNetworks, scan: FolderScan, plan: PassPlan, protocols: list[str], flip: bool,
             workers: int, predictions_csv: str | os.PathLike | None, progress: bool) -> PassTallies:
    """This rank's share of ``scan`` (all of it alone) through every protocol; alone, the CSV is written as it goes."""
    on_device = nets.runtime.device
    mine = rank_indices(len(scan.samples))
    alone = rank_and_world()[1] == 1
    dataset = (EncodedDataset(scan.samples, mine) if plan.decode_here
               else ViewsDataset(scan.samples, ProtocolViews(plan.view_scales, plan.center), mine))
    loader = DataLoader(dataset, batch_size=plan.window, num_workers=workers, collate_fn=as_list,
                        pin_memory=on_device.type == "cuda")
    k = min(TOP_K, nets.num_classes)
    run = PassTallies({p: TopK(k) for p in protocols}, [], [], dict.fromkeys(("center", "dense", "multicrop"), 0.0),
                      0.0)
    csv_out = (PredictionsCsv(predictions_csv, scan, k, len(scan.samples) * len(protocols))
               if predictions_csv is not None and alone else None)
    start = time.perf_counter()
    with tqdm(total=len(mine), unit="img", desc="evaluate", disable=not progress or not is_main()) as bar, \
            csv_out if csv_out else contextlib.nullcontext():
        for loaded in loader:
            if plan.decode_here:
                loaded = decode_batch(loaded, scan.samples, on_device, plan.view_scales, plan.center)
            run.failed += [(scan.samples[it["index"]][0], it["error"]) for it in loaded if "error" in it]
            run.failed_indices += [it["index"] for it in loaded if "error" in it]
            batch = [it for it in loaded if "error" not in it]
            if batch:
                probabilities = batch_probabilities(nets, batch, protocols, flip, plan.batch_size,
                                                    run.network_seconds)
                indices, labels = [it["index"] for it in batch], [it["label"] for it in batch]
                for p in protocols:
                    run.tallies[p].add(indices, labels, probabilities[p])
                    if csv_out:
                        csv_out.write(p, indices, labels, probabilities[p])
                bar.set_postfix({"top-1 err": f"{run.tallies[protocols[0]].top1_error:.1f}%"})
            bar.update(len(loaded))
    run.wall = time.perf_counter() - start
    run.csv_path = csv_out.path if csv_out else None
    return run


def gather_pass(run: PassTallies, scan: FolderScan, plan: PassPlan, protocols: list[str],
                predictions_csv: str | os.PathLike | None) -> PassTallies:
    """Alone: ``run``. Under a process group: every rank's tallies merged in sample order (the times the
    slowest rank's), and rank 0 writes the CSV as one process would have, window by window."""
    if rank_and_world()[1] == 1:
        return run
    parts = gather(run)
    failed = sorted((i, item) for part in parts for i, item in zip(part.failed_indices, part.failed))
    seconds = {name: max(part.network_seconds[name] for part in parts) for name in run.network_seconds}
    merged = PassTallies({p: TopK.merged([part.tallies[p] for part in parts]) for p in protocols},
                         [item for _, item in failed], [i for i, _ in failed], seconds,
                         max(part.wall for part in parts))
    if predictions_csv is not None and is_main():
        k = merged.tallies[protocols[0]].k
        with PredictionsCsv(predictions_csv, scan, k, len(scan.samples) * len(protocols)) as csv_out:
            csv_out.write_in_order(merged.tallies, protocols, plan.window, len(scan.samples))
        merged.csv_path = csv_out.path
    return merged


def batch_probabilities(nets: InferenceNetworks, batch: list[dict], protocols: list[str], flip: bool,
                        batch_size: int, network_seconds: dict[str, float]) -> dict[str, torch.Tensor]:
    """Decoded views of a window of images -> softmax (N, classes) per protocol; adds each network's time."""
    def timed(network: str, compute) -> torch.Tensor:
        tick = time.perf_counter()
        probabilities = compute()  # on the CPU, so the device has finished
        network_seconds[network] += time.perf_counter() - tick
        return probabilities

    probabilities: dict[str, torch.Tensor] = {}
    if "center" in protocols:
        crops = torch.stack([it["center"] for it in batch])
        probabilities["center"] = timed("center", lambda: center_probabilities(nets, crops, batch_size))
    if any(p in ("dense", "dense+multicrop") for p in protocols):
        probabilities["dense"] = timed("dense", lambda: dense_probabilities_batch(
            nets, [it["scaled"] for it in batch], flip, batch_size))
    if any(p in ("multicrop", "dense+multicrop") for p in protocols):
        probabilities["multicrop"] = timed("multicrop", lambda: multicrop_probabilities_batch(
            nets, [it["scaled"] for it in batch], flip, batch_size))
    if "dense+multicrop" in protocols:
        probabilities["dense+multicrop"] = (probabilities["dense"] + probabilities["multicrop"]) / 2
    return probabilities


class PredictionsCsv:
    """One CSV row per image and protocol, written as the pass goes (flushed every batch), so a job
    that is killed or fails keeps every row done so far: path, protocol, true class, correct top-1 and
    top-k, then the top-k classes with their probabilities.

    The rows go to ``<path>.partial``, renamed to ``path`` when the pass completes (leaving the ``with``
    without an error): a file under the final name is always a whole pass, and the rows of a pass that
    did not finish are in the ``.partial`` file. A full disk is a ``DiskFullError``. File and class
    names that are not valid UTF-8 are written as their original bytes.
    """

    def __init__(self, path: str | os.PathLike, scan: FolderScan, k: int, rows: int = 0) -> None:
        self.path, self.scan, self.k, self.rows, self.written = Path(path), scan, k, rows, 0
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.partial, "w", newline="", encoding="utf-8", errors="surrogateescape")
        self.writer = csv.writer(self.file)
        header = ["path", "protocol", "true_class", "correct_top1", f"correct_top{k}"]
        self.writer.writerow(header + [f"{column}{i}" for i in range(1, k + 1) for column in ("class", "probability")])

    def __enter__(self) -> "PredictionsCsv":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            self.file.close()  # may flush the last rows: a full disk can show here too
        except OSError as close_error:
            if error is None:
                self._disk_full(close_error)
            return  # the error already raised matters more than this one
        if error is None:
            os.replace(self.partial, self.path)

    def _disk_full(self, error: OSError) -> NoReturn:
        """Raise ``error`` as a DiskFullError when it is one; its size estimated from the rows written so far."""
        if not is_disk_full(error):
            raise error
        done = self.partial.stat().st_size if self.partial.exists() else 0
        estimate = done * max(self.rows, self.written) // max(self.written, 1)
        raise DiskFullError(self.path, estimate, "choose another --csv path", "about ") from error

    def write(self, protocol: str, indices: list[int], labels: list[int], probabilities: torch.Tensor) -> None:
        """One batch of one protocol: sample indices, true labels, softmax (N, classes)."""
        top = probabilities.topk(self.k, dim=-1)
        self.write_top(protocol, indices, labels, top.indices.tolist(), top.values.tolist())

    def write_top(self, protocol: str, indices: list[int], labels: list[int], classes: list[list[int]],
                  values: list[list[float]]) -> None:
        """Rows of one protocol from the top-k classes and probabilities (N lists of k) of each sample."""
        for index, label, top_classes, top_values in zip(indices, labels, classes, values):
            cells = [self.scan.samples[index][0], protocol, self.scan.classes[label], int(top_classes[0] == label),
                     int(label in top_classes)]
            for c, probability in zip(top_classes, top_values):
                cells += [self.scan.classes[c], f"{probability:.6f}"]
            try:
                self.writer.writerow(cells)
            except OSError as error:
                self._disk_full(error)
            self.written += 1
        try:
            self.file.flush()
        except OSError as error:
            self._disk_full(error)

    def write_in_order(self, tallies: dict[str, TopK], protocols: list[str], window: int, count: int) -> None:
        """Every row of merged ``tallies`` in one process's order: window by window of the ``count`` samples,
        each protocol's rows of the window's readable samples."""
        position = {p: 0 for p in protocols}
        columns = {p: (tallies[p].indices, tallies[p].labels, torch.cat(tallies[p].classes).tolist(),
                       torch.cat(tallies[p].probabilities).tolist()) for p in protocols if tallies[p].indices}
        for end in range(window, count + window, window):
            for p in columns:
                indices, labels, classes, values = columns[p]
                start = stop = position[p]
                while stop < len(indices) and indices[stop] < end:
                    stop += 1
                self.write_top(p, indices[start:stop], labels[start:stop], classes[start:stop], values[start:stop])
                position[p] = stop
