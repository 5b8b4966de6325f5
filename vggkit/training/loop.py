"""ImageNet training of the paper's configurations (section 3.1), on one process or many.

``train(recipe, data_dir, output_dir)`` reads top to bottom: distributed setup, data,
model, optimizer and plateau schedule, resume, then the epoch loop (steps with
gradient accumulation, checkpoints, validation, logs). The same code runs alone or
under ``torchrun`` (DDP: NCCL on GPUs, gloo on CPUs, one or many machines). The
global batch is split over processes and accumulation steps, and augmentation is
seeded per sample, so N processes compute what one process would (section 3.3).

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.folders import ImageListDataset, scan_imagenet
from ..data.pipeline import EncodedImages, EpochSampler, GpuAugment, SeededAugment, ShardSampler, collate_encoded
from ..data.transforms import EvalTransform, TrainTransform
from ..models.vgg import VGG
from ..runtime.engine import choose_runtime
from ..utils.atomic import atomic_write_text, remove_stale_temps
from ..utils.checks import check_device, check_int
from ..utils.paths import check_output_outside, writable_folder
from ..weights.checkpoint import read_training_state
from ..weights.factory import create_model, load_weights, save_checkpoint
from .recipe import Recipe, apply_overrides
from .step import NonFiniteLossError, TrainStep

# Section 3.1: the deeper nets take net A's first four conv layers and its three FC layers.
PRE_INIT_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")


LAST, BEST, METRICS, CURVES, RECIPE = "last.pt", "best.pt", "metrics.jsonl", "curves.png", "recipe.toml"


CURVES_EVERY_S = 60  # redraw curves.png after an epoch at most this often, and at the end of a run


WARMUP_STEPS = 10  # an epoch's first steps (compilation, cuDNN tuning, loader start) are timed apart


LONG_RUN_IMAGES = 1_000_000  # compile="auto" compiles runs of at least this many images (minutes on a GPU)


@dataclass
class TrainResult:
    """What a run ended with. ``completed`` is False when it was stopped early to be resumed."""

    model: VGG
    history: list[dict]
    checkpoint: Path
    best: Path | None
    completed: bool
    step_losses: list[float] = field(default_factory=list)  #: every optimizer step's loss in this call


def init_from(checkpoint_a: str | os.PathLike | VGG, model: VGG) -> VGG:
    """The paper's pre-initialisation: copy net A's conv1_1, conv2_1, conv3_1, conv3_2, fc6,
    fc7 and fc8 into the layers of the same name in ``model`` (B-E); the rest is untouched.

    ``checkpoint_a``: a trained net A as a file (any layout vggkit reads) or a ``VGG``.
    Returns ``model``, changed in place.
    """
    source = checkpoint_a if isinstance(checkpoint_a, VGG) else _load_net_a(checkpoint_a)
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


def _load_net_a(path: str | os.PathLike) -> VGG:
    from ..weights.factory import checkpoint_metadata

    name = checkpoint_metadata(path).get("model_name", "A")
    return create_model(name, weights=path)


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


def train(recipe: Recipe | str | os.PathLike | None, data_dir: str | os.PathLike, output_dir: str | os.PathLike,
          resume: bool = False, overrides: list[str] | tuple[str, ...] = (), stop_after_steps: int = 0,
          progress: bool = True) -> TrainResult:
    """Train a VGG on an ImageFolder tree (``data_dir/train/<class>/*``, ``data_dir/val/<class>/*``).

    ``recipe``: a ``Recipe``, a TOML path, or a shipped recipe's name (``"D-256-512"``);
    with ``resume=True`` it may be None: the run's own recipe is read from ``last.pt``.
    ``overrides``: ``section.key=value`` strings applied on top. ``stop_after_steps``:
    end this invocation after that many optimizer steps with a checkpoint, to be
    resumed later (time-limited cluster jobs; 0: no such stop). Under torchrun, every process calls this.
    """
    check_int("stop_after_steps", stop_after_steps, 0)
    # ---- where the run lives, what it trains on, which recipe
    if recipe is None and not resume:
        raise ValueError("Give a recipe (a TOML file or a name from recipes/imagenet/), or --resume a run.")
    check_output_outside(output_dir, data_dir)
    output = prepare_output(output_dir, resume)
    state = load_training_state(output / LAST) if resume else None
    if state is not None:  # the run's own recipe; a recipe given as well is ignored
        recipe = Recipe.from_dict(apply_overrides(state["recipe"], overrides), source=str(output / LAST))
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
        (output / RECIPE).write_text(recipe.to_toml())

    # ---- data: seeded per-sample augmentation, this process's shard of every epoch
    seed, use_cuda = recipe.run.seed, dist.device.type == "cuda"
    augment = TrainTransform(scale=recipe.scale_range, crop=recipe.data.crop, flip=recipe.data.flip,
                             pca_std=recipe.data.pca_std)
    gpu_augment = GpuAugment(augment, dist.device) if recipe.data.gpu_decode else None
    train_set = (EncodedImages(train_scan.samples, seed) if gpu_augment
                 else SeededAugment(train_scan.samples, augment, seed))
    sampler = EpochSampler(len(train_set), dist.world_size, dist.rank, seed, length=steps_per_epoch * per_process)
    workers = recipe.data.workers
    # Loaders draw worker seeds from their own generator, never from the global RNG that dropout uses.
    loader_options = dict(num_workers=workers, pin_memory=use_cuda, persistent_workers=workers > 0,
                          prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(seed))
    train_loader = DataLoader(train_set, batch_size=micro_batch, sampler=sampler,
                              collate_fn=collate_encoded if gpu_augment else None, **loader_options)
    val_set = ImageListDataset(val_scan.samples, EvalTransform(recipe.data.val_scale, recipe.data.crop))
    val_loader = DataLoader(val_set, batch_size=micro_batch,
                            sampler=ShardSampler(len(val_set), dist.world_size, dist.rank), **loader_options)

    # ---- model, optimizer, plateau schedule (at most max_drops drops: the floor stops the rest)
    torch.manual_seed(seed)  # identical initial weights on every rank
    raw_model = build_model(recipe, load_init=state is None)
    raw_model.class_names = train_scan.classes
    raw_model.to(dist.device, memory_format=torch.channels_last if recipe.run.channels_last else torch.preserve_format)
    train_step = TrainStep(raw_model, recipe, runtime, dist.enabled, accumulation)
    model, optimizer, scaler, autocast = train_step.model, train_step.optimizer, train_step.scaler, train_step.autocast
    schedule = recipe.schedule
    scheduler = plateau_scheduler(optimizer, recipe)

    # ---- resume: weights, optimizer, schedule, position in the epoch, every RNG
    start_epoch, start_step, global_step, history, best_error, epoch_loss = 0, 0, 0, [], math.inf, 0.0
    torch.manual_seed(seed + dist.rank)  # dropout masks differ per rank, as on separate GPUs
    if state is not None:
        raw_model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step, global_step = state["epoch"], state["step"], state["global_step"]
        history = [row for row in state["history"] if row["epoch"] <= start_epoch]  # drop a partial epoch's row
        best_error, epoch_loss = state["best_top1_error"], state["epoch_loss"]
        set_rng_state(state["rng"][dist.rank if len(state["rng"]) == dist.world_size else 0])
        if dist.is_main:
            # A kill after last.pt but before the logs: re-derive them from last.pt's history (best.pt is
            # written before last.pt, so it is never behind it).
            write_metrics(output, history)

    def save_state(epoch: int, step: int, loss_so_far: float = 0.0) -> None:
        rng = gather_rng_states(dist)  # a collective: every rank takes part
        if dist.is_main:
            save_checkpoint(raw_model, output / LAST, recipe=recipe.to_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler.is_enabled()
                            else None, epoch=epoch, step=step, global_step=global_step, rng=rng, history=history,
                            best_top1_error=best_error, epoch_loss=loss_so_far)

    if dist.is_main:
        how = " ".join([dist.device.type, runtime.precision] + ["channels_last"] * recipe.run.channels_last
                       + ["compiled"] * runtime.compile)
        s_min, s_max = recipe.scale_range
        scale = f"S = {s_min}" if s_min == s_max else f"S = [{s_min}, {s_max}]"  # as run, after any --set
        print(f"vggkit train: {recipe.name or recipe.model.name} ({recipe.model.name}, {scale}, crop "
              f"{recipe.data.crop}), {len(train_scan.samples)} train / "
              f"{len(val_scan.samples)} val images, {len(train_scan.classes)} classes; {dist.world_size} "
              f"process(es) on {how}; batch {recipe.optim.batch_size} = {dist.world_size} x "
              f"{accumulation} x {micro_batch}; {steps_per_epoch} steps/epoch"
              + (f"; resuming at epoch {start_epoch + 1}, step {start_step}" if state is not None else ""),
              file=sys.stderr)

    # ---- the epoch loop. Losses stay on the device; they are read back (the one host synchronisation
    # of a step) every run.loss_every steps, before every checkpoint and at the end of an epoch, so a
    # non-finite loss is always caught before a checkpoint could hold its update.
    steps_this_run, completed, curves_drawn_at, curves_stale = 0, True, time.monotonic(), state is not None
    step_losses: list[float] = []

    def read_back(pending: list[torch.Tensor], epoch: int, next_step: int, bar) -> None:
        """Bring the ``pending`` step losses (the last of them step ``next_step``) to the host; stop on NaN/inf."""
        if not pending:
            return
        values = torch.stack(pending).tolist()
        pending.clear()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                bar.close()
                last = output / LAST
                kept = f"The last good checkpoint is {last}." if last.is_file() else "No checkpoint was written yet."
                raise NonFiniteLossError(
                    f"Loss is {value} at epoch {epoch + 1}, step {next_step - len(values) + offset + 1}: training "
                    f"stopped, and no checkpoint holds this or a later update. {kept} Lower optim.lr (now "
                    f"{optimizer.param_groups[0]['lr']:g}) or check the data, then continue with --resume.")
        step_losses.extend(values)
        bar.set_postfix(loss=f"{values[-1]:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.0e}")

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = gpu_augment(*next(batches)) if gpu_augment else next(batches)
        return to_device(images, dist.device, recipe.run.channels_last), labels.to(dist.device, non_blocking=True)

    for epoch in range(start_epoch, schedule.epochs):
        if schedule.max_steps and global_step >= schedule.max_steps:
            break
        sampler.set_epoch(epoch, start=start_step * per_process)
        batches = iter(train_loader)
        model.train()
        loss_sum = torch.tensor(epoch_loss, device=dist.device)  # summed step losses of this epoch so far
        pending: list[torch.Tensor] = []  # step losses not yet read back
        # The first steps of an epoch (compilation, cuDNN's tuning, filling the loader) are timed apart.
        warmup_steps = min(WARMUP_STEPS, (steps_per_epoch - start_step) // 2)
        images_seen, started, step = 0, time.perf_counter(), start_step - 1
        warm_at, warm_images = started, 0
        bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{schedule.epochs}",
                   disable=not (dist.is_main and progress), leave=False, dynamic_ncols=True)
        stopped = False
        for step in range(start_step, steps_per_epoch):
            step_loss = train_step(next_batch)
            loss_sum += step_loss
            pending.append(step_loss)
            global_step, steps_this_run = global_step + 1, steps_this_run + 1
            images_seen += per_process * dist.world_size
            bar.update()
            if steps_this_run == 1 and runtime.compile:
                read_back(pending, epoch, step + 1, bar)
                if dist.is_main:
                    tqdm.write(f"vggkit train: compiled the training step in {time.perf_counter() - started:.1f} s "
                               f"(first step)", file=sys.stderr)
            if step + 1 - start_step == warmup_steps:
                read_back(pending, epoch, step + 1, bar)
                warm_at, warm_images = time.perf_counter(), images_seen
            if len(pending) >= recipe.run.loss_every:
                read_back(pending, epoch, step + 1, bar)
            out_of_steps = schedule.max_steps and global_step >= schedule.max_steps
            checkpoint = recipe.run.checkpoint_every and global_step % recipe.run.checkpoint_every == 0
            if (stop_after_steps and steps_this_run >= stop_after_steps) or out_of_steps or checkpoint:
                read_back(pending, epoch, step + 1, bar)
            if stop_after_steps and steps_this_run >= stop_after_steps and not out_of_steps:
                save_state(epoch, step + 1, loss_sum.item())
                stopped, completed = True, False
                break
            if out_of_steps:
                stopped = True
                break
            if checkpoint:
                save_state(epoch, step + 1, loss_sum.item())
        read_back(pending, epoch, step + 1, bar)
        bar.close()
        if not completed:
            break
        ended = time.perf_counter()
        seconds = ended - started

        # ---- validation, the plateau schedule, logs, checkpoints
        metrics = validate(model, val_loader, dist, autocast, recipe.run.channels_last)
        lr = optimizer.param_groups[0]["lr"]
        finished_epoch = step + 1 == steps_per_epoch
        if finished_epoch:
            scheduler.step(100 - metrics["val_top1_error"])
        steady = (images_seen - warm_images) / (ended - warm_at) if images_seen > warm_images else 0.0
        row = {"epoch": epoch + 1, "step": step + 1, "train_loss": loss_sum.item() / (step + 1), **metrics,
               "lr": lr, "images_per_s": steady or images_seen / seconds, "seconds": seconds,
               "warmup_steps": warmup_steps, "warmup_seconds": warm_at - started,
               "images_per_s_with_warmup": images_seen / seconds}
        row.update(target_gap(recipe, metrics))
        history.append(row)
        improved = metrics["val_top1_error"] < best_error
        best_error = min(best_error, metrics["val_top1_error"])
        # Order matters for a kill between two writes: best.pt before last.pt (a resume replays the epoch
        # and rewrites the same best.pt), the logs after it (a resume re-derives them from last.pt).
        if dist.is_main and improved:
            save_checkpoint(raw_model, output / BEST, epoch=epoch + 1, recipe=recipe.to_dict(),
                            accuracy={"top1_error": metrics["val_top1_error"],
                                      "top5_error": metrics["val_top5_error"]})
        save_state(epoch + 1 if finished_epoch else epoch, 0 if finished_epoch else step + 1,
                   0.0 if finished_epoch else loss_sum.item())
        if dist.is_main:
            write_metrics(output, history)
            curves_stale = True
            if time.monotonic() - curves_drawn_at >= CURVES_EVERY_S:
                write_curves(output, history)
                curves_drawn_at, curves_stale = time.monotonic(), False
            tqdm.write(epoch_summary(recipe, row), file=sys.stderr)
        start_step, epoch_loss = 0, 0.0
        if stopped:
            break

    if dist.is_main and curves_stale:
        write_curves(output, history)
    if dist.enabled:
        torch_dist.barrier()
    return TrainResult(raw_model, history, output / LAST, output / BEST if (output / BEST).is_file() else None,
                       completed, step_losses)


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
