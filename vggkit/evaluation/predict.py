"""A fine-tuned checkpoint back into a model, and top-k predictions on image files.

A vggkit checkpoint carries the model name, width, head, class names and
preprocessing, so ``load(path)`` and ``predict(path, images)`` need nothing else.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.folders import SeenFiles, image_files, report_skipped
from ..data.images import ImageError, describe_non_file, load_image
from ..data.preprocess import Preprocess
from ..data.sources import detect, open_scan
from ..models.vgg import VGG
from ..runtime.engine import optimize
from ..weights.factory import load

ImageInput = str | os.PathLike | Image.Image | np.ndarray


def _as_model(model_or_checkpoint: VGG | str | os.PathLike) -> VGG:
    if isinstance(model_or_checkpoint, torch.nn.Module):
        return model_or_checkpoint
    return load(model_or_checkpoint)


def predict_proba(model_or_checkpoint: VGG | str | os.PathLike, images: Sequence[ImageInput], batch_size: int = 32,
                  precision: str = "auto", device: str | torch.device | None = None,
                  progress: bool = False) -> torch.Tensor:
    """Class probabilities (N, num_classes) float32 for image files / PIL images / HxWx3 arrays.

    Each image goes through the model's own ``preprocess`` (resize, centre crop, normalise)
    and the model through ``vggkit.runtime`` (``optimize``); the model itself is not changed.
    An unusable image raises ``ImageError`` naming it (``predict_paths`` skips such files instead).
    """
    probabilities, _ = _probabilities(_as_model(model_or_checkpoint), images, batch_size, precision, device,
                                      progress, skipped=None)
    return probabilities


def _probabilities(model: VGG, images: Sequence[ImageInput], batch_size: int, precision: str,
                   device: str | torch.device | None, progress: bool,
                   skipped: list[tuple[str, str]] | None) -> tuple[torch.Tensor, list[int]]:
    """-> (softmax (K, classes), the K indices of ``images`` used). With a ``skipped`` list an unusable
    image is added to it, with its reason, and left out; without one its ``ImageError`` is raised."""
    preprocess = model.preprocess or Preprocess()
    fast = optimize(model, precision=precision, device=device)
    chunks, kept = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="predict", disable=not progress, leave=False):
        inputs = []
        for index in range(start, min(start + batch_size, len(images))):
            try:
                inputs.append(preprocess(load_image(images[index])))
                kept.append(index)
            except ImageError as error:
                if skipped is None:
                    raise
                skipped.append((str(images[index]), error.reason))
        if inputs:
            chunks.append(torch.softmax(fast(torch.stack(inputs)), dim=1).cpu())
    if not chunks:
        return torch.empty(0, model.num_classes), kept
    return torch.cat(chunks), kept


def _top_k(model: VGG, probabilities: torch.Tensor, top_k: int) -> list[list[tuple[str, float]]]:
    names = model.class_names or [f"class {i}" for i in range(model.num_classes)]
    top = probabilities.topk(min(top_k, model.num_classes), dim=1)
    return [[(names[i], float(p)) for p, i in zip(values.tolist(), indices.tolist())]
            for values, indices in zip(top.values, top.indices)]


def predict(model_or_checkpoint: VGG | str | os.PathLike, images: Sequence[ImageInput], top_k: int = 5,
            **options) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) per image, most likely first.

    ``model_or_checkpoint`` is a model or a checkpoint path; names come from its
    ``class_names`` (``"class <i>"`` when it has none). ``options`` go to ``predict_proba``.
    One result per image, so an unusable image raises ``ImageError`` naming it and what it is.
    """
    model = _as_model(model_or_checkpoint)
    return _top_k(model, predict_proba(model, list(images), **options), top_k)


def predict_paths(model_or_checkpoint: VGG | str | os.PathLike, paths: Sequence[str | os.PathLike], top_k: int = 5,
                  **options) -> dict[str, list[tuple[str, float]]]:
    """Top-k per image file, for files and folders (every image under a folder, each file once).

    Unusable files (corrupt, too large, a FIFO, a broken link, ...) are skipped with one
    warning listing each and why, as ``finetune`` and ``extract_features`` do; a ``ValueError``
    only when no file at all could be used. -> ``{path: [(class name, probability), ...]}`` in order.
    """
    model = _as_model(model_or_checkpoint)
    files, skipped = expand_image_paths(paths)
    given = len(files) + len(skipped)  # before reading: a file that fails to decode joins ``skipped`` too
    probabilities, kept = _probabilities(model, files, options.pop("batch_size", 32), options.pop("precision", "auto"),
                                         options.pop("device", None), options.pop("progress", False), skipped)
    report_skipped(skipped)
    if not kept:
        raise ValueError(f"No usable image among the {given} file(s) given"
                         f"{'; see the warning above' if skipped else ''}.")
    return dict(zip((files[i] for i in kept), _top_k(model, probabilities, top_k)))


def expand_image_paths(paths: Sequence[str | os.PathLike]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files and folders -> (image files, each once, [(path, reason)] for what was left out).

    A folder stands for the image files in it and its sub-folders; WebDataset shards (a ``.tar``, a
    folder of them, a brace pattern) and Hugging Face datasets for their samples (``data.sources``);
    a file is taken as given (its reading decides), and anything that is not a file or a folder is
    left out with what it is.
    """
    seen, files, skipped = SeenFiles(), [], []
    for path in map(str, paths):
        if _is_source(path):
            scan = open_scan(path)
            files += [sample for sample, _ in scan.samples]
            skipped += scan.skipped
            continue
        if os.path.isdir(path):
            before = len(skipped)
            found = image_files(path, seen, skipped)
            if not found and len(skipped) == before:
                skipped.append((path, "a folder with no image files (.jpg, .png, ...)"))
            files += found
            continue
        reason = describe_non_file(path)
        if reason:
            skipped.append((path, reason))
            continue
        first = seen.claim(path, os.stat(path))
        if first:
            skipped.append((path, f"the same file as {first} (a link or hard link); predicted once"))
        else:
            files.append(path)
    return files, skipped


def _is_source(path: str) -> bool:
    """True for WebDataset shards or a Hugging Face dataset (not a folder of images or an image file)."""
    try:
        return detect(path) != "folder"
    except (ValueError, OSError):
        return False
