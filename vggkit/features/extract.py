"""Feature extraction at any named layer, the paper's transfer descriptor, and linear probes.

The paper's descriptor (its appendix on transfer learning): the image, isotropically
rescaled to Q, runs through the dense (fully-convolutional) network; the fc7 map is
averaged over positions and over the image and its mirror, L2-normalised, and the
per-scale descriptors are averaged (VOC) or stacked (Caltech). A linear SVM on top,
no fine-tuning: ``probe``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from ..data.device_decode import decode_on_device, read_source, resize_all
from ..data.folders import SeenFiles, image_files, report_skipped, scan_folder
from ..data.images import ImageError, load_image
from ..data.sources import detect, open_scan, parquet_files, shard_list
from ..data.transforms import EvalTransform
from ..models.backbone import VGGBackbone
from ..models.vgg import VGG, check_layers
from ..runtime.engine import LONG_JOB_IMAGES, optimize
from ..utils.atomic import atomic_write
from ..utils.checks import RANDOM_INIT_SEED, ArgumentError, check_int, check_sides
from ..utils.choices import DECODERS
from ..utils.distributed import gather, is_main, rank_device, rank_indices
from ..utils.lock import OutputLock
from ..utils.paths import display_name, looks_like_a_path, writable_file
from ..weights.factory import create_model, load

REDUCTIONS = ("mean", "stack", None)


ImageInput = str | os.PathLike | Image.Image | np.ndarray


@dataclass
class Features:
    """Extracted features and where they came from.

    ``features``: (N, D) pooled (``reduce="mean"``: D = channels; ``"stack"``: D =
    scales x channels), (N, S, D) with ``reduce=None``, or (N, C, h, w) maps;
    ``labels``: (N,) int64 class indices, -1 where unknown; ``paths``: N sources.
    """

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    class_names: list[str]
    layer: str
    scales: tuple[int, ...]

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (features, labels, paths, class_names, layer, scales), atomically; a full disk
        is a ``DiskFullError``."""
        path = Path(path)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a temp file's name
                np.savez(f, features=self.features, labels=self.labels, paths=np.array(self.paths, dtype=str),
                         class_names=np.array(self.class_names, dtype=str), layer=np.array(self.layer),
                         scales=np.array(self.scales, dtype=np.int64))

        # The arrays' bytes, a lower bound of the file (np.savez stores them uncompressed): a disk without
        # them is refused before writing.
        atomic_write(path, write, size=self.features.nbytes + self.labels.nbytes)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Features":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["features"], data["labels"], data["paths"].tolist(), data["class_names"].tolist(),
                       str(data["layer"]), tuple(int(s) for s in data["scales"]))


class LayerTap(nn.Module):
    """(N, 3, H, W) -> the named layer's map (N, C, h, w).

    fc6/fc7/fc8 run densely through ``model.to_fully_conv().fc_maps`` (the paper's dense
    network; an input of at least 224 px); conv and pool layers through ``VGGBackbone``,
    which runs only as deep as needed.
    """

    def __init__(self, model: VGG, layer: str) -> None:
        super().__init__()
        check_layers(model.spec, [layer])
        self.layer = layer
        if layer.startswith("fc"):
            if not hasattr(model.classifier, "fc7"):
                head = getattr(model, "head_config", {}).get("type")
                raise ValueError(f"Layer {layer} needs the VGG classifier (fc6-fc8), but this model has a {head!r} "
                                 f"head; use a conv or pool layer such as 'pool5'.")
            self.dense = model.to_fully_conv().eval()
        else:
            self.tap = VGGBackbone(model, [layer]).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer.startswith("fc"):
            return self.dense.fc_maps(self.dense.features(x))[self.layer]
        return self.tap(x)[self.layer]


class _ScaledImages(Dataset):
    """Item i -> (i, [one (3, H, W) tensor per scale]) or (i, reason) when the image cannot be read."""

    def __init__(self, sources: Sequence[ImageInput], transforms: list) -> None:
        self.sources, self.transforms = sources, transforms

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        try:  # the transforms too: a rescale may refuse an extreme aspect ratio
            image = load_image(self.sources[index])
            return index, [transform(image) for transform in self.transforms]
        except ImageError as error:
            return index, error.reason


class _EncodedImages(Dataset):
    """Item i -> (i, ``device_decode.read_source`` of it) or (i, reason) when the image cannot be read."""

    def __init__(self, sources: Sequence[ImageInput]) -> None:
        self.sources = sources

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        try:
            return index, read_source(self.sources[index])
        except ImageError as error:
            return index, error.reason


class _DeviceViews:
    """``_EncodedImages`` items -> ``_ScaledImages``' items: decoded, rescaled to each Q, cropped and
    normalised on ``device`` (what ``EvalTransform`` does with PIL)."""

    def __init__(self, sources: Sequence[ImageInput], scales: Sequence[int], crop: int | None, preprocess,
                 device: torch.device) -> None:
        self.sources, self.scales, self.crop, self.device = sources, scales, crop, device
        self.preprocess = preprocess or EvalTransform().preprocess

    def __call__(self, batch: list) -> list:
        readable = [(i, data) for i, data in batch if not isinstance(data, str)]
        images = decode_on_device([data for _, data in readable], [self.sources[i] for i, _ in readable],
                                  self.device, self.scales)
        decoded = [image for image in images if not isinstance(image, str)]
        per_scale = [resize_all(decoded, q) for q in self.scales]
        views = iter([[self.view(per_scale[s][k]) for s in range(len(self.scales))] for k in range(len(decoded))])
        return [item for item in batch if isinstance(item[1], str)] + [
            (i, image if isinstance(image, str) else next(views)) for (i, _), image in zip(readable, images)]

    def view(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) -> the network's float32 input (3, crop or H, crop or W)."""
        if self.crop:
            image = TF.center_crop(image, self.crop)
        return self.preprocess.normalize(image.float().div_(255))


def _as_list(batch):
    return batch


def summarise_names(names: Sequence[str], limit: int = 5) -> str:
    """``"a, b, c"``, or the first ``limit`` names and ``"... (N in all)"`` for a long list; each name
    escaped (``display_name``), so a newline in a class name does not split the line."""
    shown = [display_name(name) for name in names[:limit]]
    return ", ".join(shown) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def resolve_images(images_or_dir, classes: str | os.PathLike | None = None
                   ) -> tuple[list, np.ndarray, list[str], list[tuple[str, str]]]:
    """A class-folder tree, WebDataset shards, a Hugging Face dataset (``data.sources``), a flat folder of
    images, or a list of files/images -> (sources, labels, class names, skipped)."""
    if _is_data_source(images_or_dir):
        scan = open_scan(images_or_dir, classes=classes)
        paths = [path for path, _ in scan.samples]
        return paths, np.array([label for _, label in scan.samples], dtype=np.int64), scan.classes, scan.skipped
    if isinstance(images_or_dir, (str, os.PathLike)) and Path(images_or_dir).is_dir():
        root = Path(images_or_dir)
        if any(d.is_dir() and not d.name.startswith(".") for d in root.iterdir()):
            scan = scan_folder(root)
            paths = [path for path, _ in scan.samples]
            return paths, np.array([label for _, label in scan.samples], dtype=np.int64), scan.classes, scan.skipped
        skipped: list[tuple[str, str]] = []
        files = image_files(root, SeenFiles(), skipped)
        return files, np.full(len(files), -1, dtype=np.int64), [], skipped
    if isinstance(images_or_dir, (str, os.PathLike, Image.Image, np.ndarray)):
        images_or_dir = [images_or_dir]
    sources = list(images_or_dir)
    return sources, np.full(len(sources), -1, dtype=np.int64), [], []


def _is_data_source(images_or_dir) -> bool:
    """True for WebDataset shards or a Hugging Face dataset (a path, a pattern or a list of .tar/.parquet)."""
    if isinstance(images_or_dir, (list, tuple)):
        if not all(isinstance(item, (str, os.PathLike)) for item in images_or_dir):
            return False
        return bool(shard_list(images_or_dir) or parquet_files(images_or_dir))
    if not isinstance(images_or_dir, (str, os.PathLike)):
        return False
    try:
        return detect(images_or_dir) != "folder"
    except (ValueError, OSError):
        return False


def _describe(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__} image>"


def extract_features(
    model_or_name: VGG | str | os.PathLike,
    images_or_dir: str | os.PathLike | Sequence[ImageInput],
    layer: str = "fc7",
    scales: Sequence[int] = (256,),
    flip: bool = False,
    reduce: str | None = "mean",
    pool: str | None = "avg",
    normalize: bool = True,
    crop: int | None = None,
    weights: str | os.PathLike | None = "imagenet",
    width: float | None = None,
    batch_size: int = 16,
    precision: str = "auto",
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    decode: str = "auto",
    compile: bool | str = "auto",
    classes: str | os.PathLike | None = None,
) -> Features:
    """Features of ``layer`` for every image, batched through ``vggkit.runtime``.

    Each image is rescaled (shortest side = Q for each Q in ``scales``; centre-cropped
    to ``crop`` if given) and the layer's map is computed. ``pool="avg"`` averages it
    over positions (and over the image and its mirror with ``flip``), L2-normalises it
    (``normalize``) and combines scales by ``reduce``: ``"mean"`` -> (N, C), ``"stack"``
    (concatenated, the paper's stacking) -> (N, S*C), None -> (N, S, C). With the
    defaults at ``layer="fc7"`` this is the paper's descriptor. ``pool=None`` keeps the
    maps (N, C, h, w): one scale, square crops (``crop`` defaults to the scale).

    ``model_or_name``: a VGG, a vggkit checkpoint path, or a model name built with ``weights``
    (default ``"imagenet"``; offline that raises ``WeightsUnavailableError``; ``None``: random
    weights from ``vggkit.utils.checks.RANDOM_INIT_SEED``, the same network on every call).
    ``images_or_dir``: a folder of class folders (labels from the folders), WebDataset shards
    or a Hugging Face dataset (labels from them; ``classes`` names shards' classes, see
    ``data.sources``), a folder of images, or a list of files / PIL images / arrays.
    Unreadable images are skipped with one warning.

    Under an initialised process group (``torchrun``) each rank extracts every world-size-th
    image (on CUDA on its own GPU); the rows are gathered, and every rank returns all of them
    in input order.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"Unknown reduce {reduce!r}; choose from {REDUCTIONS}.")
    if pool not in ("avg", None):
        raise ValueError(f"pool must be 'avg' (average over positions) or None (keep the maps), got {pool!r}.")
    scales = tuple(check_sides("scales", scales))
    check_int("batch_size", batch_size, 1)
    check_int("num_workers", num_workers, 0)
    if pool is None:
        if len(scales) != 1:
            raise ValueError(f"Maps (pool=None) of different scales do not stack; give one scale, not {scales}.")
        crop = crop or scales[0]
    if (isinstance(images_or_dir, (str, os.PathLike)) and not Path(images_or_dir).exists()
            and not _is_data_source(images_or_dir)):
        raise FileNotFoundError(f"Image folder or file not found: {images_or_dir}")
    if layer in ("fc6", "fc7", "fc8") and (crop or min(scales)) < 224:
        raise ValueError(f"Layer {layer}: the fully-convolutional VGG needs an input of at least 224x224 px; "
                         f"got scale {crop or min(scales)}. Use scales of 224 or more, or a conv/pool "
                         f"layer (e.g. pool5) for smaller images.")
    if decode not in DECODERS:
        raise ValueError(f"Unknown decode {decode!r}; choose from {', '.join(DECODERS)}.")
    model = _as_model(model_or_name, weights, width)
    sources, labels, class_names, skipped = resolve_images(images_or_dir, classes)
    # The torch copy: images run at their own rescaled sizes, each of which onnxruntime would export anew.
    fast = optimize(LayerTap(model, layer), precision=precision, device=rank_device(device), compile=compile,
                    long_job=len(sources) >= LONG_JOB_IMAGES, backend="torch")
    loader, views = _loader(fast, model, sources, scales, crop, decode, batch_size, num_workers)
    kept: list[int] = []
    outputs: list[np.ndarray] = []
    failed: list[tuple[int, str]] = []
    bar = tqdm(total=len(loader.dataset), desc=f"extract {layer}", unit="image", disable=not progress or not is_main())
    for batch in loader:
        batch = views(batch)
        readable = [(i, views) for i, views in batch if not isinstance(views, str)]
        failed += [(i, views) for i, views in batch if isinstance(views, str)]
        per_scale = [_run_grouped(fast, [views[s] for _, views in readable], flip, pool) for s in range(len(scales))]
        kept += [i for i, _ in readable]
        outputs += [np.stack([per_scale[s][k] for s in range(len(scales))]) for k in range(len(readable))]
        bar.update(len(batch))  # images, not batches: a batch of 16 large images takes a while
    bar.close()
    kept, outputs, failed = _gathered(kept, outputs, failed)
    skipped += [(_describe(sources[i]), reason) for i, reason in failed]
    if is_main():
        report_skipped(skipped)
    if not outputs:
        raise ValueError(f"None of the {len(sources)} image(s) given could be read; see the warning above.")
    features = np.stack(outputs)  # (N, S, C) pooled or (N, 1, C, h, w) maps
    if pool is None:
        features = features[:, 0]
    else:
        if normalize:
            features = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
        if reduce == "mean":
            features = features.mean(axis=1)
        elif reduce == "stack":
            features = features.reshape(len(features), -1)
    return Features(features.astype(np.float32), labels[kept], [_describe(sources[i]) for i in kept],
                    list(class_names or getattr(model, "class_names", None) or []), layer, scales)


def _loader(fast, model: VGG, sources: list, scales: tuple[int, ...], crop: int | None, decode: str,
            batch_size: int, num_workers: int) -> tuple[DataLoader, object]:
    """The loader of this rank's share of ``sources`` (all of them alone) and what makes its items' views."""
    on_device = fast.runtime.device
    if decode == "device" or (decode == "auto" and on_device.type == "cuda"):
        dataset = _EncodedImages(sources)
        views = _DeviceViews(sources, scales, crop, model.preprocess, on_device)
    else:
        dataset = _ScaledImages(sources, [EvalTransform(scale=q, crop=crop, preprocess=model.preprocess)
                                          for q in scales])
        views = _as_list
    share = Subset(dataset, rank_indices(len(sources)))  # items keep their index into sources
    return DataLoader(share, batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list,
                      pin_memory=on_device.type == "cuda"), views


def _gathered(kept: list[int], outputs: list[np.ndarray], failed: list[tuple[int, str]]
              ) -> tuple[list[int], list[np.ndarray], list[tuple[int, str]]]:
    """Every rank's (indices, rows, failures) merged in input order; alone, as they are."""
    parts = gather((kept, outputs, failed))
    if len(parts) == 1:
        return kept, outputs, failed
    rows = sorted(((i, row) for part_kept, part_rows, _ in parts for i, row in zip(part_kept, part_rows)),
                  key=lambda item: item[0])
    return [i for i, _ in rows], [row for _, row in rows], sorted(f for _, _, part in parts for f in part)


def extract_to_file(output: str | os.PathLike, *args, **kwargs) -> Features:
    """``extract_features(*args, **kwargs)``, saved to ``output`` (``Features.save``, atomic).

    Under torchrun only rank 0 writes. ``output`` is held by this call from the start (``vggkit.utils.lock.OutputLock.for_file``): a second
    extraction to the same file is refused at once, before any work, with one line naming this process.
    """
    output = writable_file(output, example="features.npz") if is_main() else Path(output)
    with OutputLock.for_file(output, fix="choose another output file (-o)", enabled=is_main()):
        features = extract_features(*args, **kwargs)
        if is_main():  # under torchrun, rank 0 alone writes
            features.save(output)
    return features


def _as_model(model_or_name, weights, width) -> VGG:
    if isinstance(model_or_name, nn.Module):
        return model_or_name
    if Path(str(model_or_name)).exists() or looks_like_a_path(model_or_name):
        if width is not None:
            raise ArgumentError("width", width, f"{model_or_name} is a checkpoint and brings its own width; "
                                                f"leave the width out (it applies to a model name)")
        return load(model_or_name)
    # Random weights from a fixed seed: train and test features from separate calls come from one network.
    return create_model(str(model_or_name), weights=weights, width=width,
                        seed=RANDOM_INIT_SEED if weights is None else None)


@torch.no_grad()
def _run_grouped(fast: nn.Module, images: list[torch.Tensor], flip: bool, pool: str | None) -> list[np.ndarray]:
    """Run same-sized images together; per image (C,) pooled or (C, h, w) maps, mirror-averaged with ``flip``."""
    results: list[np.ndarray | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(k)
    for members in groups.values():
        batch = torch.stack([images[k] for k in members])
        maps = fast(torch.cat([batch, batch.flip(-1)]) if flip else batch).cpu()
        if pool == "avg":
            out = maps.mean(dim=(2, 3))
            out = (out[: len(members)] + out[len(members):]) / 2 if flip else out
        else:
            # The mirror's map is flipped back so positions line up before averaging.
            out = (maps[: len(members)] + maps[len(members):].flip(-1)) / 2 if flip else maps
        for k, row in zip(members, out.numpy()):
            results[k] = row
    return results


class ProbeResult(NamedTuple):
    """``estimator``: fitted on all the given features; ``report``: cross-validation and test figures."""

    estimator: object
    report: dict


def probe(features: np.ndarray | Features, labels: np.ndarray | None = None, method: str = "svm",
          Cs: Sequence[float] = tuple(10.0 ** np.arange(-3, 4)), cv: int = 5,
          test_features: np.ndarray | Features | None = None, test_labels: np.ndarray | None = None,
          seed: int = 0) -> ProbeResult:
    """A linear classifier on fixed features, the paper's transfer protocol.

    ``method="svm"`` (linear SVM) or ``"logreg"`` (logistic regression); C is chosen by
    stratified ``cv``-fold cross-validation over ``Cs``, then the estimator is refit on
    all of ``features`` (N, ...) flattened to (N, D). The report holds the chosen C,
    cross-validated accuracy, training accuracy and, with test data, test accuracy,
    mean class recall (the paper's Caltech measure) and the confusion matrix.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
    )
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.svm import LinearSVC

    X, y = _features_and_labels(features, labels, "features")
    counts = np.bincount(y)
    counts = counts[counts > 0]
    if len(counts) < 2:
        raise ValueError("A probe needs at least two classes in the labels.")
    folds = min(cv, int(counts.min()))
    if folds < 2:
        raise ValueError(f"Cross-validation needs at least two examples of every class; the smallest class has "
                         f"{int(counts.min())}.")
    if method == "svm":
        estimator = LinearSVC(dual="auto", max_iter=20000, random_state=seed)
    elif method == "logreg":
        estimator = LogisticRegression(max_iter=5000)
    else:
        raise ValueError(f"Unknown probe method {method!r}; choose 'svm' or 'logreg'.")
    search = GridSearchCV(estimator, {"C": list(Cs)}, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                          scoring="accuracy", refit=True)
    search.fit(X, y)
    best = search.best_index_
    report = {
        "method": method,
        "C": float(search.best_params_["C"]),
        "cv_folds": folds,
        "cv_accuracy": float(search.cv_results_["mean_test_score"][best]),
        "cv_accuracy_std": float(search.cv_results_["std_test_score"][best]),
        "train_accuracy": float(accuracy_score(y, search.predict(X))),
        "n_samples": int(len(y)),
        "n_features": int(X.shape[1]),
    }
    if test_features is not None:
        X_test, y_test = _features_and_labels(test_features, test_labels, "test_features")
        predicted = search.predict(X_test)
        report.update(test_accuracy=float(accuracy_score(y_test, predicted)),
                      mean_class_recall=float(balanced_accuracy_score(y_test, predicted)),
                      confusion_matrix=confusion_matrix(y_test, predicted, labels=search.classes_).tolist())
    return ProbeResult(search.best_estimator_, report)


def _features_and_labels(features, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(features, Features):
        labels = features.labels if labels is None else labels
        features = features.features
    if labels is None:
        raise ValueError(f"{name} need labels: pass labels=..., or Features extracted from class folders.")
    X = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    y = np.asarray(labels, dtype=np.int64)
    if len(X) != len(y):
        raise ValueError(f"{name}: {len(X)} feature rows but {len(y)} labels.")
    if (y < 0).any():
        raise ValueError(f"{name}: some labels are unknown (-1); extract from a folder of class folders.")
    return X, y
