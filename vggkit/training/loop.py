"""ImageNet training of the paper's configurations (section 3.1), on one process or many.

``train(recipe, data_dir, output_dir)`` reads as its steps: ``resolve_run`` (recipe, data,
distributed setup, batch split), ``build_loaders``, ``build_learner`` (model, optimizer,
plateau schedule), ``restore`` (resume), then per epoch ``run_epoch`` (steps with gradient
accumulation, checkpoints) and ``end_epoch`` (validation, schedule, logs), and ``finish``.
The same code runs alone or under ``torchrun`` (DDP: NCCL on GPUs, gloo on CPUs, one or
many machines). The global batch is split over processes and accumulation steps, and
augmentation is seeded per sample, so N processes compute what one process would (section 3.3).

A run directory holds ``recipe.toml`` (the resolved recipe), ``last.pt`` (everything
needed to resume, rewritten atomically every epoch and every ``checkpoint_every``
steps), ``best.pt`` (weights of the best validation epoch), ``metrics.jsonl`` and
``curves.png``.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.folders import FolderScan, ImageListDataset
from ..data.sources import scan_imagenet
from ..data.pipeline import EncodedImages, EpochSampler, GpuAugment, SeededAugment, ShardSampler, collate_encoded
from ..data.transforms import EvalTransform, TrainTransform
from ..models.vgg import VGG
from ..runtime.engine import Runtime, choose_runtime
from ..utils.atomic import atomic_write_text, remove_stale_temps, write_or_keep
from ..utils.checks import check_device, check_flag, check_int, check_path
from ..utils.lock import OutputLock
from ..utils.paths import check_output_outside, writable_folder
from ..weights.checkpoint import read_training_state
from ..weights.factory import checkpoint_metadata, create_model, load_weights, save_checkpoint
from .recipe import Recipe, apply_overrides, check_overrides
from .step import NonFiniteLossError, TrainStep

# Section 3.1: the deeper nets take net A's first four conv layers and its three FC layers.
PRE_INIT_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")


LAST, BEST, METRICS, CURVES, RECIPE = "last.pt", "best.pt", "metrics.jsonl", "curves.png", "recipe.toml"


CURVES_EVERY_S = 60  # redraw curves.png after an epoch at most this often, and at the end of a run


WARMUP_STEPS = 10  # an epoch's first steps (compilation, cuDNN tuning, loader start) are timed apart


LONG_RUN_IMAGES = 1_000_000  # compile="auto" compiles runs of at least this many images (minutes on a GPU)


@dataclass
class TrainResult:
    """What a run ended with. ``completed`` is False when it was stopped early to be resumed.

    ``save_error``: set when a full disk stopped the run; ``checkpoint``/``best`` are then where the
    files went instead (a fallback folder), or None where nowhere had room: ``model`` holds the weights.
    """

    model: VGG
    history: list[dict]
    checkpoint: Path | None
    best: Path | None
    completed: bool
    step_losses: list[float] = field(default_factory=list)  #: every optimizer step's loss in this call
    save_error: str | None = None


def init_from(checkpoint_a: str | os.PathLike | VGG, model: VGG) -> VGG:
    """The paper's pre-initialisation: copy net A's conv1_1, conv2_1, conv3_1, conv3_2, fc6,
    fc7 and fc8 into the layers of the same name in ``model`` (B-E); the rest is untouched.

    ``checkpoint_a``: a trained net A as a file (any layout vggkit reads) or a ``VGG``.
    Returns ``model``, changed in place.
    """
    # A file that names no model (a plain state dict) is taken as net A, not create_model's vgg16.
    source = checkpoint_a if isinstance(checkpoint_a, VGG) else create_model(
        checkpoint_metadata(checkpoint_a).get("model_name", "A"), weights=checkpoint_a)
    if source.spec.config not in ("A", "A-LRN"):
        raise ValueError(f"init_from expects a trained net A (config A or A-LRN), got config {source.spec.config}.")
    source_modules, target_modules = dict(source.named_modules()), dict(model.named_modules())
    with torch.no_grad():
        for layer in PRE_INIT_LAYERS:
            path = ("classifier." if layer.startswith("fc") else "features.") + layer
            for name, tensor in source_modules[path].named_parameters():
                target = getattr(target_modules[path], name)
                if target.shape != tensor.shape:
                    raise ValueError(
                        f"init_from: {layer}.{name} of net A is {tuple(tensor.shape)} but {tuple(target.shape)} in "
                        f"{model.name}; net A must have the same width ({source.width} vs {model.width}) and "
                        f"num_classes ({source.num_classes} vs {model.num_classes}).")
                target.copy_(tensor)
    return model


def build_model(recipe: Recipe, load_init: bool = True) -> VGG:
    """The recipe's network: random ``init.method``, then ``init.weights`` or ``init.from_a`` if set
    (unless ``load_init`` is False: a resumed run brings its own weights)."""
    spec = recipe.model
    model = create_model(spec.name, num_classes=spec.num_classes, dropout=spec.dropout, width=spec.width,
                         init=recipe.init.method)
    if not load_init:
        return model
    for key, path in (("init.weights", recipe.init.weights), ("init.from_a", recipe.init.from_a)):
        if path and not Path(path).is_file():
            raise FileNotFoundError(
                f"{key}: checkpoint {path} not found. Train the run it comes from first (see README, "
                f"'Reproducing the paper'), or set {key}='' and init.method='glorot' to train from scratch.")
    if recipe.init.weights:
        load_weights(model, recipe.init.weights)
    elif recipe.init.from_a:
        init_from(recipe.init.from_a, model)
    return model


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: rank, local rank, world size and device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "") -> Distributed:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE/LOCAL_RANK set):
    NCCL on GPUs, gloo on CPUs. Alone, a single process of world size 1."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not device:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=(
            device if device.type == "cuda" else None))
    return Distributed(rank, local_rank, world_size, device)


def prepare_output(output_dir: str | os.PathLike, resume: bool) -> Path:
    """Create the run folder and prove it is writable; refuse to overwrite a run that is not resumed."""
    output = writable_folder(output_dir, fix="choose a writable --output")
    if resume and not (output / LAST).is_file():
        raise FileNotFoundError(f"Nothing to resume: {output / LAST} not found. Start the run without --resume.")
    if not resume and (output / LAST).is_file():
        raise ValueError(f"{output} already holds a run ({LAST}). Pass --resume to continue it, "
                         f"or choose another --output.")
    if int(os.environ.get("RANK", 0)) == 0:  # the rank that writes; others might delete its writes in flight
        remove_stale_temps(output)  # half-written checkpoints of a killed run
    return output


def split_batch(global_batch: int, world_size: int, max_per_device: int = 0) -> tuple[int, int, int]:
    """Global batch -> (per-process batch, micro-batch, accumulation steps)."""
    if global_batch % world_size:
        raise ValueError(f"optim.batch_size={global_batch} is not divisible by the {world_size} processes.")
    per_process = global_batch // world_size
    micro = min(per_process, max_per_device) if max_per_device else per_process
    if per_process % micro:
        raise ValueError(f"The per-process batch {per_process} is not a multiple of run.max_batch_per_gpu={micro}; "
                         f"pick a divisor of {per_process}.")
    return per_process, micro, per_process // micro


def plateau_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe):
    """lr x ``factor`` when validation top-1 accuracy (stepped with it, in %) stops improving, at most
    ``max_drops`` times: the floor lr * factor**max_drops makes every later drop a no-op."""
    schedule = recipe.schedule
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=schedule.factor, patience=schedule.patience,
        threshold=100 * schedule.threshold, threshold_mode="abs",
        min_lr=recipe.optim.lr * schedule.factor**schedule.max_drops, eps=1e-12)


def rng_state() -> dict:
    """Every RNG a training step draws from: torch (CPU and CUDA), numpy, Python."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def gather_rng_states(dist: Distributed) -> list[dict]:
    """Each rank's RNG state (dropout masks differ per rank), indexed by rank."""
    if not dist.enabled:
        return [rng_state()]
    states: list = [None] * dist.world_size
    torch_dist.all_gather_object(states, rng_state())
    return states


def load_training_state(path: Path) -> dict:
    """``last.pt`` of a run, read as data and every field checked (``checkpoint_io.read_training_state``)."""
    return read_training_state(path)


def write_metrics(output: Path, history: list[dict]) -> None:
    """metrics.jsonl: one line per epoch, rewritten whole (atomically) so a resumed run never repeats a line."""
    atomic_write_text("".join(json.dumps(row) + "\n" for row in history), output / METRICS)


def write_curves(output: Path, history: list[dict]) -> None:
    """curves.png: loss, top-1/top-5 errors and lr per epoch."""
    from ..utils.plots import plot_training_curves

    plot_training_curves(history, output / CURVES, metrics=["loss", "top1_error", "top5_error", "lr"],
                         title=output.name)


def validate(model: torch.nn.Module, loader: DataLoader, dist: Distributed, autocast, channels_last: bool) -> dict:
    """Loss and top-1/top-5 errors (%) over the whole validation set, summed across processes."""
    totals = torch.zeros(4, dtype=torch.float64, device=dist.device)  # loss sum, top-1 hits, top-5 hits, count
    model.eval()
    with torch.no_grad():
        for images, labels in loader:
            images = to_device(images, dist.device, channels_last)
            labels = labels.to(dist.device, non_blocking=True)
            with autocast():
                logits = model(images).float()
            k = min(5, logits.shape[1])
            hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
            totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), hits[:, 0].sum(),
                                   hits.any(dim=1).sum(), torch.tensor(len(labels), device=dist.device)]).double()
    if dist.enabled:
        torch_dist.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    return {"val_loss": loss / count, "val_top1_error": 100 * (1 - top1 / count),
            "val_top5_error": 100 * (1 - top5 / count)}


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


@dataclass
class Run:
    """One ``train()`` call, resolved: the recipe as run, its folder, its data and this process's share."""

    recipe: Recipe
    output: Path
    saved: dict | None  #: last.pt as read when resuming, else None
    train_scan: FolderScan
    val_scan: FolderScan
    dist: Distributed
    runtime: Runtime
    steps_per_epoch: int
    per_process: int  #: images per optimizer step on this process (micro_batch x accumulation)
    micro_batch: int
    accumulation: int


def resolve_run(recipe: Recipe | str | os.PathLike | None, data_dir: str | os.PathLike,
                output_dir: str | os.PathLike, resume: bool, overrides: list[str] | tuple[str, ...]) -> Run:
    """The recipe (a resumed run's own, from last.pt) with ``overrides``, the scanned data, the device and
    process group, the batch split; writes recipe.toml. Every check fails here, before any training."""
    check_output_outside(output_dir, data_dir)
    output = prepare_output(output_dir, resume)
    saved = load_training_state(output / LAST) if resume else None
    if saved is not None:  # the run's own recipe; a recipe given as well is ignored
        recipe = Recipe.from_dict(apply_overrides(saved["recipe"], overrides), source=str(output / LAST))
        check_same_model(recipe, saved, output / LAST)
    elif isinstance(recipe, Recipe):
        recipe = Recipe.from_dict(apply_overrides(recipe.to_dict(), overrides))
    else:
        recipe = Recipe.load(recipe, overrides)
    train_scan, val_scan = scan_imagenet(data_dir, verify=recipe.data.verify)
    if len(train_scan.classes) != recipe.model.num_classes:
        raise ValueError(f"{train_scan.root} holds {len(train_scan.classes)} classes but the recipe's "
                         f"model.num_classes is {recipe.model.num_classes}; "
                         f"pass --set model.num_classes={len(train_scan.classes)} or fix the data.")

    if recipe.run.device:
        check_device("run.device", recipe.run.device)  # before any process group is set up on it
    dist = setup_distributed(recipe.run.device)
    steps_per_epoch = len(train_scan.samples) // recipe.optim.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{train_scan.root} holds {len(train_scan.samples)} images, fewer than one batch of "
                         f"optim.batch_size={recipe.optim.batch_size}.")
    runtime = choose_runtime(recipe.run.precision, dist.device, compile=compile_step(recipe, dist.device,
                                                                                    steps_per_epoch))
    per_process, micro_batch, accumulation = split_batch(recipe.optim.batch_size, dist.world_size,
                                                         recipe.run.max_batch_per_gpu)
    if dist.is_main:
        atomic_write_text(recipe.to_toml(), output / RECIPE)
    return Run(recipe, output, saved, train_scan, val_scan, dist, runtime, steps_per_epoch, per_process,
               micro_batch, accumulation)


@dataclass
class Loaders:
    """This process's data: its shard of every (seeded, resumable) epoch, and its shard of validation."""

    train: DataLoader
    sampler: EpochSampler
    val: DataLoader
    gpu_augment: GpuAugment | None  #: decodes and augments train batches on the GPU (data.gpu_decode)


def build_loaders(run: Run) -> Loaders:
    """Train batches of ``micro_batch`` images augmented per sample from the run's seed, and val batches."""
    recipe, dist = run.recipe, run.dist
    seed, use_cuda = recipe.run.seed, dist.device.type == "cuda"
    augment = TrainTransform(scale=recipe.scale_range, crop=recipe.data.crop, flip=recipe.data.flip,
                             pca_std=recipe.data.pca_std)
    gpu_augment = GpuAugment(augment, dist.device) if recipe.data.gpu_decode else None
    train_set = (EncodedImages(run.train_scan.samples, seed) if gpu_augment
                 else SeededAugment(run.train_scan.samples, augment, seed))
    sampler = EpochSampler(len(train_set), dist.world_size, dist.rank, seed,
                           length=run.steps_per_epoch * run.per_process)
    workers = recipe.data.workers
    # Loaders draw worker seeds from their own generator, never from the global RNG that dropout uses.
    loader_options = dict(num_workers=workers, pin_memory=use_cuda, persistent_workers=workers > 0,
                          prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(seed))
    train_loader = DataLoader(train_set, batch_size=run.micro_batch, sampler=sampler,
                              collate_fn=collate_encoded if gpu_augment else None, **loader_options)
    val_set = ImageListDataset(run.val_scan.samples, EvalTransform(recipe.data.val_scale, recipe.data.crop))
    val_loader = DataLoader(val_set, batch_size=run.micro_batch,
                            sampler=ShardSampler(len(val_set), dist.world_size, dist.rank), **loader_options)
    return Loaders(train_loader, sampler, val_loader, gpu_augment)


@dataclass
class Learner:
    """The network (``net``: unwrapped, on the device), its training step (DDP, optimizer, scaler,
    autocast) and its plateau schedule."""

    net: VGG
    step: TrainStep
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau

    @property
    def lr(self) -> float:
        return self.step.optimizer.param_groups[0]["lr"]


def build_learner(run: Run) -> Learner:
    """The recipe's network with identical initial weights on every rank (a resumed run's come later)."""
    recipe = run.recipe
    torch.manual_seed(recipe.run.seed)  # identical initial weights on every rank
    net = build_model(recipe, load_init=run.saved is None)
    net.class_names = run.train_scan.classes
    net.to(run.dist.device, memory_format=torch.channels_last if recipe.run.channels_last else torch.preserve_format)
    step = TrainStep(net, recipe, run.runtime, run.dist.enabled, run.accumulation)
    return Learner(net, step, plateau_scheduler(step.optimizer, recipe))


@dataclass
class RunState:
    """Where the run stands (what last.pt holds besides weights, optimizer and RNGs) and this call's tallies."""

    start_epoch: int = 0
    start_step: int = 0  #: the next epoch's first step: past 0 when resuming inside an epoch
    global_step: int = 0
    at: tuple[int, int] = (0, 0)  #: (epoch, steps done in it) being run: where an interrupt finds the run
    checkpoint_at: tuple[int, int] | None = None  #: (epoch, step) where last.pt resumes, once there is one
    history: list[dict] = field(default_factory=list)
    best_error: float = math.inf  #: the best validation top-1 error so far (%)
    epoch_loss: float = 0.0  #: summed losses of the resumed epoch's steps before start_step
    steps_this_run: int = 0
    completed: bool = True  #: False once stop_after_steps stopped the run, to be resumed
    step_losses: list[float] = field(default_factory=list)  #: every optimizer step's loss in this call
    curves_stale: bool = False  #: curves.png lags metrics.jsonl
    curves_drawn_at: float = 0.0  #: time.monotonic() when curves.png was last drawn, or the epochs began
    save_error: str | None = None  #: a checkpoint the disk had no room for: the run stops
    kept: dict[str, Path | None] = field(default_factory=dict)  #: such a checkpoint -> its fallback file or None


def check_same_model(recipe: Recipe, saved: dict, path: Path) -> None:
    """Refuse, in one line naming the keys, a resume whose model section (after --set) builds another
    network than last.pt holds: its weights would not load."""
    from ..models.configs import resolve

    found = {"model.name": resolve(recipe.model.name).name, "model.num_classes": recipe.model.num_classes,
             "model.width": float(recipe.model.width)}
    stored = {"model.name": resolve(saved["model_name"]).name, "model.num_classes": saved["num_classes"],
              "model.width": float(saved.get("width", 1.0))}
    differ = [f"{key}={found[key]!r} (last.pt: {stored[key]!r})" for key in found if found[key] != stored[key]]
    if differ:
        raise ValueError(f"{path} holds another network than the recipe asks for: {', '.join(differ)}. Resume "
                         f"without changing the model section, or start a new run in another --output "
                         f"(--set init.weights={path} starts from these weights where the shapes fit).")


def apply_resumed_optim(learner: Learner, recipe: Recipe, saved_recipe: dict) -> None:
    """``--resume --set optim.lr=...`` (or momentum, weight_decay) takes effect: the optimizer state read
    from last.pt carries the old values. A new lr rescales the current one and the schedule's floor, so
    the drops already made are kept."""
    old = saved_recipe.get("optim", {})
    ratio = recipe.optim.lr / old["lr"] if old.get("lr") else 1.0
    for group in learner.step.optimizer.param_groups:
        group.update(lr=group["lr"] * ratio, momentum=recipe.optim.momentum,
                     weight_decay=recipe.optim.weight_decay)
    learner.scheduler.min_lrs = [floor * ratio for floor in learner.scheduler.min_lrs]


def restore(run: Run, learner: Learner) -> RunState:
    """A fresh RunState, or a resumed run's: weights, optimizer, schedule, position in the epoch, every RNG."""
    saved = run.saved
    if saved is None:
        return RunState()
    learner.net.load_state_dict(saved["state_dict"])
    learner.step.optimizer.load_state_dict(saved["optimizer"])
    learner.scheduler.load_state_dict(saved["scheduler"])
    apply_resumed_optim(learner, run.recipe, saved["recipe"])
    if saved.get("scaler"):
        learner.step.scaler.load_state_dict(saved["scaler"])
    start_epoch = saved["epoch"]
    state = RunState(start_epoch, saved["step"], saved["global_step"],
                     history=[row for row in saved["history"] if row["epoch"] <= start_epoch],  # no partial epoch
                     best_error=saved["best_top1_error"], epoch_loss=saved["epoch_loss"], curves_stale=True)
    set_rng_state(saved["rng"][run.dist.rank if len(saved["rng"]) == run.dist.world_size else 0])
    state.at = state.checkpoint_at = (start_epoch, saved["step"])
    if run.dist.is_main:
        # A kill after last.pt but before the logs: re-derive them from last.pt's history (best.pt is
        # written before last.pt, so it is never behind it).
        write_metrics(run.output, state.history)
    return state


def announce(run: Run, state: RunState) -> None:
    """The run in one line on stderr: recipe, data, processes, batch split, where a resume starts."""
    recipe, dist = run.recipe, run.dist
    how = " ".join([dist.device.type, run.runtime.precision] + ["channels_last"] * recipe.run.channels_last
                   + ["compiled"] * run.runtime.compile)
    s_min, s_max = recipe.scale_range
    scale = f"S = {s_min}" if s_min == s_max else f"S = [{s_min}, {s_max}]"  # as run, after any --set
    print(f"vggkit train: {recipe.name or recipe.model.name} ({recipe.model.name}, {scale}, crop "
          f"{recipe.data.crop}), {len(run.train_scan.samples)} train / "
          f"{len(run.val_scan.samples)} val images, {len(run.train_scan.classes)} classes; {dist.world_size} "
          f"process(es) on {how}; batch {recipe.optim.batch_size} = {dist.world_size} x "
          f"{run.accumulation} x {run.micro_batch}; {run.steps_per_epoch} steps/epoch"
          + (f"; resuming at epoch {state.start_epoch + 1}, step {state.start_step}" if run.saved is not None
             else ""),
          file=sys.stderr)


def save_state(run: Run, learner: Learner, state: RunState, epoch: int, step: int, loss_so_far: float = 0.0) -> None:
    """last.pt: everything a resume needs to continue at ``step`` of ``epoch``. Every rank calls it."""
    rng = gather_rng_states(run.dist)  # a collective: every rank takes part
    if run.dist.is_main:
        scaler = learner.step.scaler
        keep_checkpoint(run, state, LAST, lambda path: save_checkpoint(
            learner.net, path, recipe=run.recipe.to_dict(), optimizer=learner.step.optimizer.state_dict(),
            scheduler=learner.scheduler.state_dict(), scaler=scaler.state_dict() if scaler.is_enabled() else None,
            epoch=epoch, step=step, global_step=state.global_step, rng=rng, history=state.history,
            best_top1_error=state.best_error, epoch_loss=loss_so_far))
    if LAST not in state.kept:  # a last.pt that went to a fallback folder moved no resume point here
        state.checkpoint_at = (epoch, step)
    if run.dist.enabled:  # rank 0's disk is full: every rank stops with it, not hung at its next collective
        stop = torch.tensor([state.save_error is not None], dtype=torch.int32, device=run.dist.device)
        torch_dist.broadcast(stop, 0)
        if stop.item() and state.save_error is None:
            state.save_error = "rank 0 could not write a checkpoint: its disk is full"


def keep_checkpoint(run: Run, state: RunState, name: str, save) -> None:
    """``save(path)`` for ``run.output / name``; on a full disk, into a fallback folder instead
    (``vggkit.utils.atomic.write_or_keep``): one warning says where, and ``state.save_error`` stops the run."""
    where, message = write_or_keep(run.output / name, save)
    if message is not None:
        state.kept[name], state.save_error = where, message
        warnings.warn(message, stacklevel=3)


def read_back(pending: list[torch.Tensor], epoch: int, next_step: int, bar: tqdm, output: Path, lr: float,
              step_losses: list[float], recipe_lr: float = 0.0) -> None:
    """Bring the ``pending`` step losses (the last of them step ``next_step``) to the host, onto
    ``step_losses``; stop on NaN/inf with the fix: a lower ``optim.lr`` (``recipe_lr``, the recipe's, which
    a resume rescales the schedule's current ``lr`` by), and ``--resume`` only once last.pt exists."""
    if not pending:
        return
    values = torch.stack(pending).tolist()
    pending.clear()
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            bar.close()
            last = output / LAST
            # --resume needs a last.pt; before the first one, the fix is the same command with a lower lr.
            base = recipe_lr or lr
            lower = f"--set optim.lr={base / 10:g} (the recipe's is {base:g}; the lr now {lr:g})"
            fix = (f"The last good checkpoint is {last}: continue with --resume {lower}, or check the data."
                   if last.is_file() else f"No checkpoint was written yet, so there is nothing to resume: start "
                                          f"the run again with {lower}, or check the data.")
            raise NonFiniteLossError(
                f"Loss is {value} at epoch {epoch + 1}, step {next_step - len(values) + offset + 1}: training "
                f"stopped, and no checkpoint holds this or a later update. {fix}")
    step_losses.extend(values)
    bar.set_postfix(loss=f"{values[-1]:.4f}", lr=f"{lr:.0e}")


@dataclass
class EpochTally:
    """One epoch's steps as this call ran them: the summed loss (a () tensor on the device), images, timings."""

    epoch: int
    loss_sum: torch.Tensor
    warmup_steps: int  #: the first steps (compilation, cuDNN's tuning, filling the loader), timed apart
    started: float  #: time.perf_counter() at the epoch's start
    step: int  #: the last step run (start_step - 1 before the first)
    images_seen: int = 0
    warm_at: float = 0.0  #: when the warmup steps were done, and images_seen then
    warm_images: int = 0
    stopped: bool = False  #: by stop_after_steps or schedule.max_steps


def run_epoch(run: Run, loaders: Loaders, learner: Learner, state: RunState, epoch: int, stop_after_steps: int,
              progress: bool) -> EpochTally:
    """The steps of ``epoch`` from ``state.start_step``, with checkpoints every run.checkpoint_every steps.

    Losses stay on the device; they are read back (the one host synchronisation of a step) every
    run.loss_every steps, before every checkpoint and at the end of the epoch, so a non-finite loss
    is always caught before a checkpoint could hold its update.
    """
    recipe, dist, schedule, start_step = run.recipe, run.dist, run.recipe.schedule, state.start_step
    state.at = (epoch, start_step)
    loaders.sampler.set_epoch(epoch, start=start_step * run.per_process)
    batches = iter(loaders.train)
    learner.step.model.train()
    loss_sum = torch.tensor(state.epoch_loss, device=dist.device)  # summed step losses of this epoch so far
    pending: list[torch.Tensor] = []  # step losses not yet read back
    tally = EpochTally(epoch, loss_sum, min(WARMUP_STEPS, (run.steps_per_epoch - start_step) // 2),
                       time.perf_counter(), start_step - 1)
    tally.warm_at = tally.started
    bar = tqdm(total=run.steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{schedule.epochs}",
               disable=not (dist.is_main and progress), leave=False, dynamic_ncols=True)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = loaders.gpu_augment(*next(batches)) if loaders.gpu_augment else next(batches)
        return to_device(images, dist.device, recipe.run.channels_last), labels.to(dist.device, non_blocking=True)

    def flush() -> None:
        read_back(pending, epoch, tally.step + 1, bar, run.output, learner.lr, state.step_losses,
                  recipe_lr=recipe.optim.lr)

    for step in range(start_step, run.steps_per_epoch):
        tally.step = step
        step_loss = learner.step(next_batch)
        tally.loss_sum += step_loss
        pending.append(step_loss)
        state.global_step, state.steps_this_run = state.global_step + 1, state.steps_this_run + 1
        state.at = (epoch, step + 1)
        tally.images_seen += run.per_process * dist.world_size
        bar.update()
        if state.steps_this_run == 1 and run.runtime.compile:
            flush()
            if dist.is_main:
                tqdm.write(f"vggkit train: compiled the training step in {time.perf_counter() - tally.started:.1f} "
                           f"s (first step)", file=sys.stderr)
        if step + 1 - start_step == tally.warmup_steps:
            flush()
            tally.warm_at, tally.warm_images = time.perf_counter(), tally.images_seen
        if len(pending) >= recipe.run.loss_every:
            flush()
        out_of_steps = schedule.max_steps and state.global_step >= schedule.max_steps
        checkpoint = recipe.run.checkpoint_every and state.global_step % recipe.run.checkpoint_every == 0
        stop_here = stop_after_steps and state.steps_this_run >= stop_after_steps
        if stop_here or out_of_steps or checkpoint:
            flush()
        if stop_here and not out_of_steps:
            save_state(run, learner, state, epoch, step + 1, tally.loss_sum.item())
            tally.stopped, state.completed = True, False
            break
        if out_of_steps:
            tally.stopped = True
            break
        if checkpoint:
            save_state(run, learner, state, epoch, step + 1, tally.loss_sum.item())
            if state.save_error:  # a full disk: stop here, the weights kept elsewhere or in memory
                tally.stopped, state.completed = True, False
                break
    flush()
    bar.close()
    return tally


def epoch_row(recipe: Recipe, tally: EpochTally, metrics: dict, lr: float, ended: float) -> dict:
    """metrics.jsonl's line for an epoch: train loss, validation ``metrics``, lr, throughput, paper gap."""
    seconds = ended - tally.started
    steady = ((tally.images_seen - tally.warm_images) / (ended - tally.warm_at)
              if tally.images_seen > tally.warm_images else 0.0)
    row = {"epoch": tally.epoch + 1, "step": tally.step + 1, "train_loss": tally.loss_sum.item() / (tally.step + 1),
           **metrics, "lr": lr, "images_per_s": steady or tally.images_seen / seconds, "seconds": seconds,
           "warmup_steps": tally.warmup_steps, "warmup_seconds": tally.warm_at - tally.started,
           "images_per_s_with_warmup": tally.images_seen / seconds}
    row.update(target_gap(recipe, metrics))
    return row


def end_epoch(run: Run, loaders: Loaders, learner: Learner, state: RunState, tally: EpochTally) -> None:
    """Validate; step the plateau schedule if the epoch ran to its end; write best.pt (on improvement),
    last.pt, metrics.jsonl and, at most every CURVES_EVERY_S, curves.png, in that order."""
    ended = time.perf_counter()
    dist, recipe, last_step = run.dist, run.recipe, tally.step + 1
    metrics = validate(learner.step.model, loaders.val, dist, learner.step.autocast, recipe.run.channels_last)
    lr = learner.lr
    finished_epoch = last_step == run.steps_per_epoch
    if finished_epoch:
        learner.scheduler.step(100 - metrics["val_top1_error"])
    row = epoch_row(recipe, tally, metrics, lr, ended)
    state.history.append(row)
    improved = metrics["val_top1_error"] < state.best_error
    state.best_error = min(state.best_error, metrics["val_top1_error"])
    # Order matters for a kill between two writes: best.pt before last.pt (a resume replays the epoch
    # and rewrites the same best.pt), the logs after it (a resume re-derives them from last.pt).
    if dist.is_main and improved:
        keep_checkpoint(run, state, BEST, lambda path: save_checkpoint(
            learner.net, path, epoch=tally.epoch + 1, recipe=recipe.to_dict(),
            accuracy={"top1_error": metrics["val_top1_error"], "top5_error": metrics["val_top5_error"]}))
    if finished_epoch:
        save_state(run, learner, state, tally.epoch + 1, 0, 0.0)
    else:
        save_state(run, learner, state, tally.epoch, last_step, tally.loss_sum.item())
    if state.save_error:  # a full disk: stop, and leave the logs (a resume re-derives them from last.pt)
        tally.stopped, state.completed = True, False
    elif dist.is_main:
        write_metrics(run.output, state.history)
        state.curves_stale = True
        if time.monotonic() - state.curves_drawn_at >= CURVES_EVERY_S:
            write_curves(run.output, state.history)
            state.curves_drawn_at, state.curves_stale = time.monotonic(), False
    if dist.is_main:
        tqdm.write(epoch_summary(recipe, row), file=sys.stderr)
    state.start_step, state.epoch_loss = 0, 0.0


def finish(run: Run, learner: Learner, state: RunState) -> TrainResult:
    """Draw curves.png if it lags, wait for every rank, and say what the run ended with (after a full
    disk: where the checkpoints went instead)."""
    # No finished epoch yet (a job stopped twice inside epoch 1): nothing to plot, not an error.
    if run.dist.is_main and state.curves_stale and state.history and not state.save_error:
        write_curves(run.output, state.history)
    if run.dist.enabled:
        torch_dist.barrier()
    best = state.kept.get(BEST) or run.output / BEST
    return TrainResult(learner.net, state.history, state.kept.get(LAST, run.output / LAST),
                       best if best.is_file() else None, state.completed, state.step_losses, state.save_error)


def train(recipe: Recipe | str | os.PathLike | None, data_dir: str | os.PathLike, output_dir: str | os.PathLike,
          resume: bool = False, overrides: list[str] | tuple[str, ...] = (), stop_after_steps: int = 0,
          progress: bool = True) -> TrainResult:
    """Train a VGG on an ImageFolder tree (``data_dir/train/<class>/*``, ``data_dir/val/<class>/*``).

    ``recipe``: a ``Recipe``, a TOML path, or a shipped recipe's name (``"D-256-512"``);
    with ``resume=True`` it may be None: the run's own recipe is read from ``last.pt``.
    ``overrides``: ``section.key=value`` strings applied on top. ``stop_after_steps``:
    end this invocation after that many optimizer steps with a checkpoint, to be
    resumed later (time-limited cluster jobs; 0: no such stop). Under torchrun, every process calls this.
    A checkpoint the disk has no room for stops the run: it is written to ``$VGGKIT_FALLBACK_DIR`` or the
    system temp folder instead (a run folder to resume from), one warning says where, and the result's
    ``save_error`` is set (``checkpoint`` None where nowhere had room: ``model`` still holds the weights).
    """
    check_int("stop_after_steps", stop_after_steps, 0)
    check_path("data_dir", data_dir), check_path("output_dir", output_dir), check_flag("resume", resume)
    check_overrides(overrides)  # a str would be read as one override per character
    if recipe is None and not resume:
        raise ValueError("Give a recipe (a TOML file or a name from recipes/imagenet/), or --resume a run.")
    if not (recipe is None or isinstance(recipe, Recipe)):
        check_path("recipe", recipe)  # a Recipe, a TOML file or a shipped recipe's name
    check_output_outside(output_dir, data_dir)  # before the lock creates the folder
    # One writer per run folder, from the first moment: a second train, or a --resume, on it is refused
    # at once. Under torchrun rank 0 holds it for the job (the ranks write one folder together).
    with OutputLock(output_dir, enabled=int(os.environ.get("RANK", 0)) == 0, fix="choose another --output",
                    writable_fix="choose a writable --output"):
        state = None
        try:
            run = resolve_run(recipe, data_dir, output_dir, resume, overrides)
            loaders = build_loaders(run)
            learner = build_learner(run)
            torch.manual_seed(run.recipe.run.seed + run.dist.rank)  # dropout masks differ per rank
            state = restore(run, learner)
            if run.dist.is_main:
                announce(run, state)
            state.curves_drawn_at = time.monotonic()
            schedule = run.recipe.schedule
            for epoch in range(state.start_epoch, schedule.epochs):
                if schedule.max_steps and state.global_step >= schedule.max_steps:
                    break
                tally = run_epoch(run, loaders, learner, state, epoch, stop_after_steps, progress)
                if not state.completed:
                    break
                end_epoch(run, loaders, learner, state, tally)
                if tally.stopped:
                    break
            return finish(run, learner, state)
        except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM as the CLI turns it into one
            interrupt.args = (interrupted_at(Path(output_dir), state),)
            raise


def interrupted_at(output: Path, state: RunState | None) -> str:
    """The line an interrupted run ends with: where it was and the checkpoint that ``--resume`` continues from.

    Every write is atomic and ordered (best.pt, last.pt, then the logs, re-derived from last.pt on
    resume), so whatever the interrupt cut, the last.pt on disk is whole and consistent.
    """
    where = "" if state is None else f" at epoch {state.at[0] + 1} step {state.at[1]}"
    if state is not None and state.checkpoint_at is not None:
        epoch, step = state.checkpoint_at
        return (f"interrupted{where}; last checkpoint {output / LAST} (epoch {epoch + 1} step {step}); "
                f"continue with --resume")
    if (output / LAST).is_file():  # interrupted while a --resume was setting up
        return f"interrupted before training resumed; last checkpoint {output / LAST}; continue with --resume"
    when = f"{where}, before the first checkpoint" if state is not None else " before training began"
    return f"interrupted{when}; nothing to resume: start the run again"


def compile_step(recipe: Recipe, device: torch.device, steps_per_epoch: int) -> bool:
    """``run.compile``, with "auto" resolved: compile on CUDA when the run trains on at least
    LONG_RUN_IMAGES images (compilation takes about a minute and pays back over minutes of steps)."""
    if recipe.run.compile != "auto":
        return bool(recipe.run.compile)
    steps = steps_per_epoch * recipe.schedule.epochs
    if recipe.schedule.max_steps:
        steps = min(steps, recipe.schedule.max_steps)
    return device.type == "cuda" and steps * recipe.optim.batch_size >= LONG_RUN_IMAGES


def target_gap(recipe: Recipe, metrics: dict) -> dict:
    """How far the validation errors are from the paper's (percentage points; positive = worse)."""
    # The paper's errors are ImageNet's: a run on other data (another class count) is not comparable.
    if not recipe.target.top1_error or recipe.model.num_classes != 1000:
        return {}
    return {"top1_gap": metrics["val_top1_error"] - recipe.target.top1_error,
            "top5_gap": metrics["val_top5_error"] - recipe.target.top5_error}


def epoch_summary(recipe: Recipe, row: dict) -> str:
    line = (f"epoch {row['epoch']}: loss {row['train_loss']:.4f}, val top-1/top-5 error "
            f"{row['val_top1_error']:.2f}% / {row['val_top5_error']:.2f}%, lr {row['lr']:.0e}, "
            f"{row['images_per_s']:.1f} images/s")
    if row.get("warmup_steps"):
        line += f" (steady; the first {row['warmup_steps']} steps took {row['warmup_seconds']:.1f} s)"
    if "top1_gap" in row:
        line += (f"; paper {recipe.target.top1_error} / {recipe.target.top5_error} "
                 f"({row['top1_gap']:+.1f} / {row['top5_gap']:+.1f} pp)")
    return line


def cleanup_distributed() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
