"""Transfer learning on a folder of images: ``finetune(data_dir, num_classes=2)``.

The loop a reader can follow top to bottom: scan and split the folder (bad files
skipped with one warning, empty classes refused before any training), build the
model with a head, freeze by strategy, train with early stopping on validation,
restore the best epoch, measure, write an atomic checkpoint and the plots.

With a frozen backbone (``strategy="head"``) the backbone's pool5 for each image and
its mirror is computed once (``FeatureCache``) and every epoch trains only the head;
``cache_features=False`` recomputes it each epoch, the plain recipe, for comparison.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.folders import DataSplits, ImageListDataset, Samples, report_skipped
from ..data.sources import prepare_splits
from ..data.transforms import EvalTransform, TrainTransform
from ..models.configs import resolve
from ..models.heads import STRATEGIES, attach_head, freeze, frozen_prefix, parameter_groups, set_train_mode
from ..models.vgg import VGG
from ..runtime.engine import choose_runtime, optimize
from ..training.step import NonFiniteLossError
from ..utils.checks import (
    check_choice,
    check_device,
    check_fraction,
    check_int,
    check_num_classes,
    check_positive,
    check_side,
)
from ..utils.choices import RELEASES
from ..utils.atomic import write_or_keep
from ..utils.lock import OutputLock, deferred_interrupts
from ..utils.paths import check_output_outside
from ..weights.checkpoint import check_weights_name
from ..weights.factory import checkpoint_metadata, create_model, load, save_checkpoint
from .feature_cache import FeatureCache, FlipViews, remove_stale_caches

OPTIMIZERS = ("sgd", "adamw")


DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}


# Defaults by where the backbone starts: pretrained features need only a head; random ones must all learn,
# and SGD at 0.01 with the conv layers at a tenth of it barely moves a random network in a few epochs.
PRETRAINED_DEFAULTS = {"strategy": "head", "optimizer": "sgd", "backbone_lr_scale": 0.1}


RANDOM_INIT_DEFAULTS = {"strategy": "full", "optimizer": "adamw", "backbone_lr_scale": 1.0}


class FrozenBackboneBatches:
    """Head-only inputs: pool5 of fixed views (image, mirror), from a ``FeatureCache`` or recomputed.

    Both paths draw the same shuffles and views from the same generator, so with one
    seed they feed the head the same batches; only the cost differs.
    """

    def __init__(self, backbone, samples: Samples, transform, views: int, batch_size: int,
                 cache: str | None, cache_dir: Path, name: str, num_workers: int, progress: bool) -> None:
        self.backbone = backbone
        self.dataset = FlipViews(samples, transform, views)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.cache = None
        if cache is not None:
            self.cache = FeatureCache.build(backbone, self.dataset, batch_size, storage=cache, cache_dir=cache_dir,
                                            name=name, num_workers=num_workers, progress=progress)

    def __len__(self) -> int:
        return -(-len(self.dataset.images) // self.batch_size)

    def batches(self, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(pool5 (B, C, h, w), labels (B,)); shuffled with random views when a generator is given."""
        count = len(self.dataset.images)
        if generator is None:
            items = torch.arange(count) * self.dataset.views
        else:
            order = torch.randperm(count, generator=generator)
            views = torch.randint(self.dataset.views, (count,), generator=generator)
            items = self.dataset.item_index(order, views)
        chunks = list(items.split(self.batch_size))
        if self.cache is not None:
            yield from (self.cache.batch(chunk) for chunk in chunks)
            return
        # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG,
        # which would shift the head's dropout masks away from the cached path's.
        loader = DataLoader(self.dataset, batch_sampler=[c.tolist() for c in chunks], num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(0))
        for images, labels in loader:
            # The runtime copy runs in inference mode; a clone is an ordinary tensor the head can train on.
            yield self.backbone(images).clone(), labels

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


class ImageBatches:
    """Image inputs for the strategies that train conv layers: augmented for training, fixed for eval."""

    def __init__(self, samples: Samples, transform, batch_size: int, num_workers: int, shuffle: bool,
                 seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(ImageListDataset(samples, transform), batch_size=batch_size, shuffle=shuffle,
                                 num_workers=num_workers, generator=self.generator, drop_last=False)

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from self.loader

    def close(self) -> None:
        pass


@dataclass
class FinetuneResult:
    """What ``finetune`` gives back.

    ``model``: the float32 model at its best validation epoch (eval mode, class names set);
    ``history``: one dict per epoch (``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``,
    ``lr``, ``seconds``; epoch 1's ``seconds`` include building the feature cache);
    ``metrics``: on the test split if there is one, else validation (``accuracy``,
    per-class ``precision``/``recall``, ``confusion_matrix``); ``checkpoint``: its path;
    ``plots``: PNG paths next to it. ``save_error``: set when the disk had no room for
    ``model.pth``; ``checkpoint`` is then the fallback file, or None (the weights are in ``model``
    only), and no plots were drawn.
    """

    model: VGG
    history: list[dict]
    metrics: dict
    checkpoint: Path | None
    plots: dict[str, Path]
    class_names: list[str]
    config: dict
    best_epoch: int
    cache_storage: str | None = None
    cache_seconds: float = 0.0
    save_error: str | None = None

    @property
    def epoch_seconds(self) -> list[float]:
        return [row["seconds"] for row in self.history]


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, class_names: list[str], split: str) -> dict:
    """Accuracy, per-class precision/recall/support and the confusion matrix (rows true), as plain Python."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    indices = list(range(len(class_names)))
    precision, recall, _, support = precision_recall_fscore_support(labels, predictions, labels=indices,
                                                                    zero_division=0)
    return {
        "split": split,
        "accuracy": float(accuracy_score(labels, predictions)),
        "precision": {name: float(p) for name, p in zip(class_names, precision)},
        "recall": {name: float(r) for name, r in zip(class_names, recall)},
        "support": {name: int(s) for name, s in zip(class_names, support)},
        "confusion_matrix": confusion_matrix(labels, predictions, labels=indices).tolist(),
    }


def build_model(model: str, weights, num_classes: int, head: str, width: float | None, dropout: float,
                hidden: int, image_size: int | None) -> VGG:
    """A VGG with loaded ``weights`` and a fresh ``num_classes`` head; preprocessing resized to ``image_size``.

    A weight file keeps its own class count when loaded (a 1000-way torchvision file, an
    earlier fine-tuned checkpoint with any head); then its classifier is replaced.
    """
    if weights is None or (isinstance(weights, str) and weights.lower() in RELEASES):
        vgg = create_model(model, weights=weights, num_classes=num_classes, width=width, dropout=dropout)
    else:
        check_weights_name(weights)
        meta = checkpoint_metadata(weights)
        if meta.get("format") == "vggkit":
            if resolve(meta["model_name"]) != resolve(model):
                raise ValueError(f"{weights} holds a {meta['model_name']}, not a {resolve(model).name}: "
                                 f"pass model={meta['model_name']!r} (--model {meta['model_name']}).")
            vgg = load(weights)
        else:
            vgg = create_model(model, weights=weights, width=width, dropout=dropout)
        vgg.dropout = dropout
    attach_head(vgg, head, num_classes, hidden=hidden, dropout=dropout)
    if image_size is not None:
        # Keep the weights' normalisation; scale the resize side with the crop (256/224 for 224).
        ratio = vgg.preprocess.resize_size / vgg.preprocess.input_size
        vgg.preprocess = dataclasses.replace(vgg.preprocess, input_size=image_size,
                                             resize_size=int(round(image_size * ratio)))
    return vgg


def run_epoch(batches, forward, device: torch.device, optimizer=None, generator=None,
              progress: bool = False, description: str = "") -> tuple[float, float, np.ndarray, np.ndarray]:
    """One pass: mean loss, accuracy, labels and predictions. Trains when an ``optimizer`` is given.

    A NaN or infinite training loss raises ``NonFiniteLossError`` before its update.
    """
    total_loss, seen, correct, labels_seen, predicted = 0.0, 0, 0, [], []
    bar = tqdm(batches.batches(generator), total=len(batches), desc=description, disable=not progress, leave=False)
    with torch.set_grad_enabled(optimizer is not None):
        for batch, (inputs, labels) in enumerate(bar, start=1):
            inputs, labels = inputs.to(device), labels.to(device)
            logits = forward(inputs)
            loss = F.cross_entropy(logits, labels)
            if optimizer is not None and not torch.isfinite(loss):
                bar.close()
                raise NonFiniteLossError(f"Loss is {loss.item()} at {description or 'training'}, batch {batch}")
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            labels_seen.append(labels.cpu())
            predicted.append(logits.argmax(1).cpu())
            total_loss += loss.item() * len(labels)
            seen += len(labels)
            correct += int((predicted[-1] == labels_seen[-1]).sum())
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    if not labels_seen:
        raise ValueError(f"No batches to {description or 'run'}: the split is empty.")
    labels_all, predicted_all = torch.cat(labels_seen).numpy(), torch.cat(predicted).numpy()
    return total_loss / len(labels_all), float((labels_all == predicted_all).mean()), labels_all, predicted_all


@dataclass
class TrainingInputs:
    """Batches for each split and the forward pass that turns a batch into logits."""

    train: "FrozenBackboneBatches | ImageBatches"
    val: "FrozenBackboneBatches | ImageBatches"
    test: "FrozenBackboneBatches | ImageBatches | None"
    forward: Callable[[torch.Tensor], torch.Tensor]

    def close(self) -> None:
        for batches in (self.train, self.val, self.test):
            if batches is not None:
                batches.close()


def eval_transform_of(net: VGG) -> EvalTransform:
    """The weights' own test-time transform: resize the shortest side, centre crop, normalise."""
    preprocess = net.preprocess
    return EvalTransform(scale=preprocess.resize_size, crop=preprocess.input_size, preprocess=preprocess)


def frozen_backbone_inputs(net: VGG, splits: DataSplits, flip: bool, cache: str | None, cache_dir: Path,
                           device: torch.device, batch_size: int, num_workers: int, progress: bool) -> TrainingInputs:
    """Head-only training: pool5 of the image (and its mirror with ``flip``) through the runtime's
    copy of the backbone, cached (``cache`` = storage) or recomputed (None); the head trains on it."""
    backbone = optimize(net.features, device=device, backend="torch")
    transform = eval_transform_of(net)
    common = dict(batch_size=batch_size, cache_dir=cache_dir, num_workers=num_workers, progress=progress)
    train = FrozenBackboneBatches(backbone, splits.train, transform, 2 if flip else 1, cache=cache, name="train",
                                  **common)
    val = FrozenBackboneBatches(backbone, splits.val, transform, 1, cache=cache, name="val", **common)
    test = FrozenBackboneBatches(backbone, splits.test, transform, 1, cache=None, name="test",
                                 **common) if splits.test else None
    return TrainingInputs(train, val, test, net.forward_head)


def image_inputs(net: VGG, frozen: int, splits: DataSplits, flip: bool, seed: int, batch_size: int,
                 num_workers: int) -> TrainingInputs:
    """Training with conv layers: augmented images (scale jitter from the resize side to 1.5x it, random
    crop, flip, colour shift); the frozen leading blocks run without keeping activations."""
    preprocess = net.preprocess
    augment = TrainTransform(scale=(preprocess.resize_size, int(round(preprocess.resize_size * 1.5))),
                             crop=preprocess.input_size, flip=flip, preprocess=preprocess)
    transform = eval_transform_of(net)
    train = ImageBatches(splits.train, augment, batch_size, num_workers, shuffle=True, seed=seed)
    val = ImageBatches(splits.val, transform, batch_size, num_workers, shuffle=False, seed=seed)
    test = ImageBatches(splits.test, transform, batch_size, num_workers, shuffle=False,
                        seed=seed) if splits.test else None
    frozen_layers, trained_layers = net.features[:frozen], net.features[frozen:]

    def forward(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # no activations kept for the frozen blocks
            features = frozen_layers(images)
        return net.forward_head(trained_layers(features))

    return TrainingInputs(train, val, test, forward)


def _stop_on_non_finite(error: NonFiniteLossError, best_epoch: int, lr: float) -> None:
    """A diverged fine-tuning run keeps its best finite epoch (a warning), or writes nothing if there is none."""
    fix = f"Lower the learning rate (now {lr:g}) or check the data."
    if not best_epoch:
        raise NonFiniteLossError(f"{error}: training stopped before this update, and no epoch finished with "
                                 f"finite losses, so nothing was written. {fix}") from None
    # Called from _fit, itself called by finetune: stacklevel 4 points the warning at finetune's caller.
    warnings.warn(f"{error}: training stopped before this update; the best epoch before it ({best_epoch}) is "
                  f"kept and saved. {fix}", stacklevel=4)


def _trainable_state(model: VGG, frozen: int) -> dict[str, torch.Tensor]:
    """A copy of the weights that change in training (head and unfrozen conv layers)."""
    frozen_names = {name for name, _ in list(model.features.named_children())[:frozen]}
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not (k.startswith("features.") and k.split(".")[1] in frozen_names)}


def _training_defaults(weights, strategy: str | None, optimizer: str | None,
                       backbone_lr_scale: float | None) -> tuple[str, str, float]:
    """Fill what the caller left out: pretrained weights train a head, random weights train everything."""
    given = {"strategy": strategy, "optimizer": optimizer, "backbone_lr_scale": backbone_lr_scale}
    defaults = RANDOM_INIT_DEFAULTS if weights is None else PRETRAINED_DEFAULTS
    chosen = {key: defaults[key] for key, value in given.items() if value is None}
    if weights is None and chosen:
        warnings.warn("Random weights: training with " + ", ".join(f"{k}={v!r}" for k, v in chosen.items())
                      + " (the defaults for random weights: a head on a frozen random backbone stays at chance, so the "
                        "whole network trains).",
                      stacklevel=3)
    if weights is None and strategy == "head":
        warnings.warn("strategy='head' with random weights trains a head on a frozen random backbone: expect "
                      "chance-level accuracy. Use strategy='full' (the default with random weights).", stacklevel=3)
    given.update(chosen)
    return given["strategy"], given["optimizer"], float(given["backbone_lr_scale"])


def finetune(
    data_dir: str | os.PathLike,
    num_classes: int | None = None,
    *,
    model: str = "vgg16",
    weights: str | os.PathLike | None = "imagenet",
    head: str = "vgg",
    strategy: str | None = None,
    unfreeze_blocks: int = 2,
    epochs: int = 20,
    batch_size: int = 32,
    optimizer: str | None = None,
    lr: float | None = None,
    backbone_lr_scale: float | None = None,
    weight_decay: float = 5e-4,
    dropout: float = 0.5,
    hidden: int = 512,
    width: float | None = None,
    image_size: int | None = None,
    flip: bool = True,
    val_fraction: float = 0.2,
    patience: int = 5,
    cache_features: bool | str = True,
    output_dir: str | os.PathLike | None = None,
    seed: int = 0,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    verify_images: bool = True,
    progress: bool = True,
    log_epochs: bool | None = None,
) -> FinetuneResult:
    """Fine-tune a VGG on ``data_dir`` (class folders, or ``train/``/``val/``[``/test/``] of class folders).

    ``weights``: ``"imagenet"`` (default; offline it raises ``WeightsUnavailableError``
    saying where to put the file), ``None`` (random init) or a weight file.
    ``head``: ``"vgg"`` (fc6/fc7 kept, new fc8), ``"linear"`` or ``"mlp"``.
    ``strategy``: ``"head"`` (frozen backbone; its features cached when ``cache_features``
    is True/``"memory"``/``"disk"``), ``"partial"`` (the last ``unfreeze_blocks`` conv
    blocks train too) or ``"full"``; conv layers train at ``lr * backbone_lr_scale``.
    Left out, ``strategy``, ``optimizer`` and ``backbone_lr_scale`` are ``"head"``, ``"sgd"``,
    0.1 with pretrained weights and ``"full"``, ``"adamw"``, 1.0 with ``weights=None`` (a
    frozen random backbone cannot learn); the choice is reported in a warning.
    ``image_size`` sets the square training crop (default: the weights' own, 224) and
    ``width`` the channel multiplier. Training stops after ``patience`` epochs without a
    better validation accuracy and keeps the best epoch (of equal accuracies, the lowest
    validation loss). One line per epoch is printed when ``log_epochs`` (default: ``progress``).
    Writes ``model.pth``, ``training_curves.png`` and ``confusion_matrix.png`` to ``output_dir``.
    A ``model.pth`` the disk has no room for goes to ``$VGGKIT_FALLBACK_DIR`` or the system temp
    folder instead, with one warning saying where (``save_error``): the trained weights are never lost.
    """
    _check_arguments(num_classes, strategy=strategy, optimizer=optimizer, cache_features=cache_features,
                     epochs=epochs, patience=patience, batch_size=batch_size, num_workers=num_workers,
                     unfreeze_blocks=unfreeze_blocks, lr=lr, backbone_lr_scale=backbone_lr_scale,
                     val_fraction=val_fraction, image_size=image_size, device=device)
    log_epochs = progress if log_epochs is None else log_epochs
    strategy, optimizer, backbone_lr_scale = _training_defaults(weights, strategy, optimizer, backbone_lr_scale)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    data_dir = Path(data_dir)
    output_dir = Path(output_dir) if output_dir is not None else Path("vggkit_runs") / f"{data_dir.name}-{model}"
    check_output_outside(output_dir, data_dir, flag="output_dir (--output)")
    # Called here, not in a helper: its single-image warning points two frames up, at finetune's caller.
    splits = prepare_splits(data_dir, num_classes, val_fraction=val_fraction, seed=seed, verify=verify_images)
    # One writer per output folder (created here and proved writable): a second finetune on it is refused
    # before any training, with one line naming this process.
    lock, written = OutputLock(output_dir, fix="choose another output_dir (--output)").acquire(), False
    try:
        report_skipped(splits.skipped)
        if len(splits.classes) < 2:
            raise ValueError(f"{data_dir} holds one class folder ({splits.classes[0]}): a classifier learns to tell "
                             f"at least two classes apart. Add a folder of images of another class.")

        net, frozen, run_device = _build_network(model, weights, splits.classes, head=head, width=width,
                                                 dropout=dropout, hidden=hidden, image_size=image_size,
                                                 strategy=strategy, unfreeze_blocks=unfreeze_blocks, device=device)
        inputs, cache_storage, cache_seconds = _training_inputs(net, frozen, splits, strategy, cache_features, flip,
                                                                output_dir, run_device, seed=seed,
                                                                batch_size=batch_size, num_workers=num_workers,
                                                                progress=progress)
        lr = lr if lr is not None else DEFAULT_LR[optimizer]
        opt, scheduler = _optimizer(net, frozen, optimizer, lr, backbone_lr_scale, weight_decay, patience)
        try:
            history, best_epoch = _fit(net, frozen, inputs, run_device, opt, scheduler, epochs=epochs,
                                       patience=patience, seed=seed, cache_seconds=cache_seconds, progress=progress,
                                       log_epochs=log_epochs)
            split, labels, predictions = _evaluate(net, inputs, run_device)
        finally:
            inputs.close()
        metrics = classification_metrics(labels, predictions, splits.classes, split)

        config = {"data_dir": str(data_dir), "model": net.name, "weights": None if weights is None else str(weights),
                  "head": head, "strategy": strategy, "unfreeze_blocks": unfreeze_blocks, "epochs": epochs,
                  "batch_size": batch_size, "optimizer": optimizer, "lr": lr, "backbone_lr_scale": backbone_lr_scale,
                  "weight_decay": weight_decay, "dropout": dropout, "width": net.width,
                  "image_size": net.preprocess.input_size, "flip": flip, "val_fraction": val_fraction,
                  "patience": patience, "cache_features": cache_storage, "seed": seed}
        # model.pth and its plots land as a set: an interrupt from here on waits until all are written
        # (seconds), so it leaves this run's complete outputs or, arriving before, the previous ones.
        with deferred_interrupts():
            checkpoint, plots, save_error = _write_outputs(net, config, history, metrics, best_epoch,
                                                           splits.classes, output_dir)
            written = True
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM as the CLI turns it into one
        interrupt.args = (f"interrupted after writing {output_dir / 'model.pth'} and its plots" if written else
                          f"interrupted; nothing written (the outputs in {output_dir} are as they were)",)
        raise
    finally:
        lock.release()
    return FinetuneResult(net, history, metrics, checkpoint, plots, list(splits.classes), config, best_epoch,
                          cache_storage, cache_seconds, save_error)


def _check_arguments(num_classes: int | None, *, strategy: str | None, optimizer: str | None,
                     cache_features: bool | str, epochs: int, patience: int, batch_size: int, num_workers: int,
                     unfreeze_blocks: int, lr: float | None, backbone_lr_scale: float | None, val_fraction: float,
                     image_size: int | None, device: str | torch.device | None) -> None:
    """Refuse a bad argument before any file is read; the ones left as None are filled in later."""
    if optimizer is not None:
        check_choice("optimizer", optimizer, OPTIMIZERS)
    if strategy is not None:
        check_choice("strategy", strategy, STRATEGIES)
    if cache_features not in (True, False, "auto", "memory", "disk"):
        raise ValueError(f"cache_features must be True, False, 'memory' or 'disk', got {cache_features!r}.")
    if num_classes is not None:
        check_num_classes("num_classes", num_classes, minimum=2)
    for name, value, minimum in (("epochs", epochs, 1), ("patience", patience, 1), ("batch_size", batch_size, 1),
                                 ("num_workers", num_workers, 0), ("unfreeze_blocks", unfreeze_blocks, 1)):
        check_int(name, value, minimum)
    if lr is not None:
        check_positive("lr", lr)
    if backbone_lr_scale is not None:
        check_positive("backbone_lr_scale", backbone_lr_scale)
    check_fraction("val_fraction", val_fraction)
    if image_size is not None:
        check_side("image_size", image_size)
    if device is not None:
        check_device("device", device)


def _build_network(model: str, weights, classes: list[str], *, head: str, width: float | None, dropout: float,
                   hidden: int, image_size: int | None, strategy: str, unfreeze_blocks: int,
                   device: str | torch.device | None) -> tuple[VGG, int, torch.device]:
    """The model with its new head, frozen by strategy, on the chosen device.

    Returns the model, how many leading ``features`` layers are frozen, and the device.
    """
    net = build_model(model, weights, len(classes), head, width, dropout, hidden, image_size)
    net.class_names = list(classes)
    frozen = frozen_prefix(net, strategy, unfreeze_blocks)
    freeze(net, frozen)
    runtime = choose_runtime(device=device)
    net.to(runtime.device)
    return net, frozen, runtime.device


def _training_inputs(net: VGG, frozen: int, splits: DataSplits, strategy: str, cache_features: bool | str,
                     flip: bool, output_dir: Path, device: torch.device, *, seed: int, batch_size: int,
                     num_workers: int, progress: bool) -> tuple[TrainingInputs, str | None, float]:
    """Batches for each split: cached or recomputed pool5 for ``strategy="head"``, else images.

    Returns the inputs, the feature cache's storage (None without one) and the seconds it took to build.
    """
    cache = None if cache_features is False or strategy != "head" else (
        "auto" if cache_features is True else cache_features)
    cache_start = time.perf_counter()
    if strategy == "head":
        remove_stale_caches(output_dir / "feature_cache")  # left by a run killed before it cleaned up
        inputs = frozen_backbone_inputs(net, splits, flip, cache, output_dir / "feature_cache", device,
                                        batch_size, num_workers, progress)
    else:
        inputs = image_inputs(net, frozen, splits, flip, seed, batch_size, num_workers)
    cache_seconds = time.perf_counter() - cache_start if cache else 0.0
    cache_storage = inputs.train.cache.storage if cache else None
    return inputs, cache_storage, cache_seconds


def _optimizer(net: VGG, frozen: int, optimizer: str, lr: float, backbone_lr_scale: float, weight_decay: float,
               patience: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau]:
    """SGD with momentum or AdamW over the trainable layers (conv at ``lr * backbone_lr_scale``), and its schedule."""
    groups = parameter_groups(net, frozen, lr, backbone_lr_scale)
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    # The paper's schedule, divide the learning rate by 10 when validation stops improving, on the
    # validation loss: on a small validation set the accuracy stays flat for epochs while a network
    # from random weights is still learning, and dividing then leaves it at chance.
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1,
                                                           patience=max(1, patience // 2))
    return opt, scheduler


def _fit(net: VGG, frozen: int, inputs: TrainingInputs, device: torch.device, opt: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau, *, epochs: int, patience: int, seed: int,
         cache_seconds: float, progress: bool, log_epochs: bool) -> tuple[list[dict], int]:
    """Train with early stopping on validation accuracy and leave ``net`` at its best epoch.

    Returns one history dict per finished epoch and the best epoch's number. A non-finite loss
    ends training at the last good epoch (a warning), or raises if no epoch finished.
    """
    generator = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    best_key, best_epoch, best_state, stale = None, 0, None, 0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        try:
            train_loss, train_acc, val_loss, val_acc = _train_and_validate(net, frozen, inputs, device, opt,
                                                                           generator, epoch, epochs, progress)
        except NonFiniteLossError as error:
            _stop_on_non_finite(error, best_epoch, opt.param_groups[0]["lr"])
            break
        seconds = time.perf_counter() - start + (cache_seconds if epoch == 1 else 0.0)
        history.append({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                        "val_acc": val_acc, "lr": opt.param_groups[0]["lr"], "seconds": seconds})
        if log_epochs:
            tqdm.write(f"epoch {epoch:3d}  train loss {train_loss:.4f} acc {train_acc:.3f}  "
                       f"val loss {val_loss:.4f} acc {val_acc:.3f}  {seconds:.1f}s")
        # Patience counts epochs without a better accuracy (as --patience says); among equal
        # accuracies the kept state is the one with the lowest validation loss.
        stale = 0 if best_key is None or val_acc > best_key[0] else stale + 1
        if best_key is None or (val_acc, -val_loss) > best_key:
            best_key, best_epoch, best_state = (val_acc, -val_loss), epoch, _trainable_state(net, frozen)
        if stale >= patience:
            break
        scheduler.step(val_loss)
    net.load_state_dict(best_state, strict=False)
    return history, best_epoch


def _train_and_validate(net: VGG, frozen: int, inputs: TrainingInputs, device: torch.device,
                        opt: torch.optim.Optimizer, generator: torch.Generator, epoch: int, epochs: int,
                        progress: bool) -> tuple[float, float, float, float]:
    """One training epoch and one validation pass: train loss and accuracy, then validation loss and accuracy.

    Raises ``NonFiniteLossError`` on a non-finite training or validation loss.
    """
    set_train_mode(net, frozen)
    train_loss, train_acc, _, _ = run_epoch(inputs.train, inputs.forward, device, opt,
                                            generator, progress, f"epoch {epoch}/{epochs} train")
    net.eval()
    val_loss, val_acc, _, _ = run_epoch(inputs.val, inputs.forward, device,
                                        progress=progress, description=f"epoch {epoch}/{epochs} val")
    if not np.isfinite(val_loss):
        raise NonFiniteLossError(f"Validation loss is {val_loss} after epoch {epoch}")
    return train_loss, train_acc, val_loss, val_acc


def _evaluate(net: VGG, inputs: TrainingInputs, device: torch.device) -> tuple[str, np.ndarray, np.ndarray]:
    """The split measured (test if there is one, else val), its labels (N,) and predictions (N,), in eval mode."""
    net.eval()
    split = "test" if inputs.test is not None else "val"
    _, _, labels, predictions = run_epoch(inputs.test or inputs.val, inputs.forward, device, description=split)
    return split, labels, predictions


def _write_outputs(net: VGG, config: dict, history: list[dict], metrics: dict, best_epoch: int,
                   class_names: list[str], output_dir: Path) -> tuple[Path | None, dict[str, Path], str | None]:
    """The checkpoint ``model.pth`` (atomic), then the plots; returns its path, the plots' paths and, when
    the disk had no room for it, the message (the checkpoint then in a fallback folder, or None)."""
    net.weights_info = {"source": f"finetuned on {config['data_dir']}", "from": config["weights"],
                        "best_epoch": best_epoch, "accuracy": metrics["accuracy"]}
    checkpoint, save_error = write_or_keep(output_dir / "model.pth", lambda path: save_checkpoint(
        net, path, head=net.head_config, finetune=config, history=history, metrics=metrics))
    if save_error is not None:  # a full disk: the plots would not fit either, and are cheap to draw again
        warnings.warn(save_error, stacklevel=3)
        return checkpoint, {}, save_error
    plots = save_plots(history, metrics, class_names, output_dir,
                       title=f"{net.name}, {config['head']} head, strategy {config['strategy']}")
    return checkpoint, plots, None

def save_plots(history: list[dict], metrics: dict, class_names: list[str], output_dir: Path,
               title: str) -> dict[str, Path]:
    """Training curves and the confusion matrix as PNGs in ``output_dir``."""
    from ..utils.plots import plot_confusion_matrix, plot_training_curves

    plots = {"training_curves": output_dir / "training_curves.png",
             "confusion_matrix": output_dir / "confusion_matrix.png"}
    plot_training_curves(history, plots["training_curves"], metrics=["loss", "acc"], title=title)
    plot_confusion_matrix(metrics["confusion_matrix"], class_names, plots["confusion_matrix"],
                          title=f"Confusion matrix ({metrics['split']})")
    return plots
