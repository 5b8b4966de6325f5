"""A fine-tuned checkpoint back into a model, and top-k predictions on image files.

A vggkit checkpoint carries the model name, width, head, class names and
preprocessing, so ``load(path)`` and ``predict(path, images)`` need nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data import load_image
from .heads import attach_head
from .model import VGG
from .paths import check_checkpoint_file
from .preprocess import Preprocess
from .runtime import optimize
from .weights import WeightsError, read_weights_file, unwrap_checkpoint

ImageInput = str | os.PathLike | Image.Image | np.ndarray


def load(checkpoint: str | os.PathLike) -> VGG:
    """A float32 VGG in eval mode, with its head, class names and preprocessing, from a
    vggkit checkpoint (as written by ``finetune`` or ``save_checkpoint``).
    """
    path = check_checkpoint_file(checkpoint)
    state, meta = unwrap_checkpoint(read_weights_file(path))
    if meta.get("format") != "vggkit":
        raise ValueError(f"{path} is a plain state dict, not a vggkit checkpoint: it does not say which model "
                         f"it belongs to. Use vggkit.create_model('vgg16', weights='{path}') with the right name.")
    model = VGG(meta["model_name"], num_classes=int(meta["num_classes"]), dropout=float(meta.get("dropout", 0.5)),
                width=float(meta.get("width", 1.0)))
    head = meta.get("head") or {"type": "vgg"}
    attach_head(model, head["type"], int(meta["num_classes"]), hidden=int(head.get("hidden", 512)),
                dropout=float(head.get("dropout", model.dropout)))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # the metadata and the tensors disagree (a head or width that does not fit)
        raise WeightsError(f"{path}: the weights do not fit the model its metadata describes "
                           f"({model.name}, num_classes={model.num_classes}, width={model.width}, "
                           f"head {head['type']!r}): {(str(error).splitlines() + [''])[1].strip()[:300]}") from None
    model.preprocess = Preprocess.from_dict(meta["preprocess"]) if "preprocess" in meta else Preprocess()
    model.class_names = list(meta["class_names"]) if meta.get("class_names") else None
    model.weights_info = {"source": str(path), **{k: meta[k] for k in ("metrics",) if k in meta}}
    return model.eval()


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
    """
    model = _as_model(model_or_checkpoint)
    preprocess = model.preprocess or Preprocess()
    fast = optimize(model, precision=precision, device=device)
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="predict", disable=not progress, leave=False):
        batch = torch.stack([preprocess(load_image(image)) for image in images[start:start + batch_size]])
        chunks.append(torch.softmax(fast(batch), dim=1).cpu())
    if not chunks:
        return torch.empty(0, model.num_classes)
    return torch.cat(chunks)


def predict(model_or_checkpoint: VGG | str | os.PathLike, images: Sequence[ImageInput], top_k: int = 5,
            **options) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) per image, most likely first.

    ``model_or_checkpoint`` is a model or a checkpoint path; names come from its
    ``class_names`` (``"class <i>"`` when it has none). ``options`` go to ``predict_proba``.
    """
    model = _as_model(model_or_checkpoint)
    names = model.class_names or [f"class {i}" for i in range(model.num_classes)]
    probabilities = predict_proba(model, list(images), **options)
    top = probabilities.topk(min(top_k, model.num_classes), dim=1)
    return [[(names[i], float(p)) for p, i in zip(values.tolist(), indices.tolist())]
            for values, indices in zip(top.values, top.indices)]
