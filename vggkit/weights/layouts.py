"""Weight layouts, detected from the keys of a state dict, and the key and shape maps between
vggkit's named layers and each of them, both ways:

- ``vggkit``: ``features.conv1_1.weight``, ``classifier.fc6.weight`` (this package);
- ``torchvision``: ``features.N.*``, ``classifier.0/3/6.*`` (also the Caffe ports such
  as ``vgg16-00b39a1b.pth``, which share torchvision's keys but expect Caffe input);
- ``timm``: ``features.N.*``, ``pre_logits.fc1/fc2`` stored as 7x7/1x1 convs, ``head.fc``;
- ``caffe``: ``conv1_1.weight`` ... ``fc8.weight``, the names of the original prototxt.
"""

from __future__ import annotations

import torch

from ..models.configs import resolve
from ..models.vgg import VGG
from .checkpoint import WeightsError

LAYOUTS = ("vggkit", "torchvision", "timm", "caffe")


TORCHVISION_FC = {"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"}


TIMM_FC = {"fc6": "pre_logits.fc1", "fc7": "pre_logits.fc2", "fc8": "head.fc"}


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """Which of ``LAYOUTS`` a state dict is in; ``WeightsError`` if it is not a VGG's."""
    keys = set(state)
    if "features.conv1_1.weight" in keys:
        return "vggkit"
    if "conv1_1.weight" in keys:
        return "caffe"
    if "features.0.weight" in keys:
        return "timm" if any(k.startswith(("pre_logits.", "head.")) for k in keys) else "torchvision"
    sample = ", ".join(sorted(keys)[:6]) or "no tensors"
    raise WeightsError(
        f"Not a VGG state dict: expected keys like 'features.0.weight' (torchvision/timm), "
        f"'features.conv1_1.weight' (vggkit) or 'conv1_1.weight' (Caffe), found {sample}."
    )


def _index_names(model: VGG) -> dict[int, str]:
    """features index (torchvision/timm) -> our module name, for modules holding tensors."""
    return {
        index: name
        for index, (name, module) in enumerate(model.features.named_children())
        if any(True for _ in module.parameters()) or any(True for _ in module.buffers())
    }


def key_map(model: VGG, layout: str) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    """For each of our state-dict keys: (key in ``layout``, that tensor's shape there or None if same)."""
    mapping: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    ours = model.state_dict()
    index_of = {name: index for index, name in _index_names(model).items()}
    for key, tensor in ours.items():
        part, module, param = key.split(".", 2)
        if part == "features":
            if layout == "vggkit":
                other = key
            elif layout == "caffe":
                other = f"{module}.{param}"
            else:
                other = f"features.{index_of[module]}.{param}"
            mapping[key] = (other, None)
        elif part == "classifier":
            if layout == "vggkit":
                mapping[key] = (key, None)
            elif layout == "caffe":
                mapping[key] = (f"{module}.{param}", None)
            elif layout == "torchvision":
                mapping[key] = (f"{TORCHVISION_FC[module]}.{param}", None)
            else:  # timm stores fc6/fc7 as convs
                shape = None
                if param == "weight" and module == "fc6":
                    shape = (tensor.shape[0], model.feature_channels, 7, 7)
                elif param == "weight" and module == "fc7":
                    shape = (tensor.shape[0], tensor.shape[1], 1, 1)
                mapping[key] = (f"{TIMM_FC[module]}.{param}", shape)
    return mapping


def convert_state_dict(state: dict[str, torch.Tensor], model: VGG, layout: str | None = None) -> dict:
    """A state dict in any layout -> vggkit keys for ``model``; ``WeightsError`` naming what does not fit."""
    layout = layout or detect_layout(state)
    mapping = key_map(model, layout)
    ours = model.state_dict()
    converted, missing, mismatched = {}, [], []
    for key, (other, _) in mapping.items():
        if other not in state:
            # BN's step counter is bookkeeping, not a weight; older files lack it.
            if not key.endswith("num_batches_tracked"):
                missing.append(other)
            continue
        tensor = state[other]
        if tensor.numel() != ours[key].numel():
            mismatched.append(f"{other}: file {tuple(tensor.shape)} vs model {tuple(ours[key].shape)}")
            continue
        converted[key] = tensor.reshape(ours[key].shape)
    used = {other for other, _ in mapping.values()}
    unexpected = sorted(k for k in state if k not in used)
    if missing or unexpected or mismatched:
        raise WeightsError(_mismatch_message(state, layout, model, missing, unexpected, mismatched))
    return converted


def export_state_dict(model: VGG, layout: str = "torchvision") -> dict[str, torch.Tensor]:
    """The model's weights in another layout (``torchvision``, ``timm``, ``caffe`` or ``vggkit``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; choose from {LAYOUTS}.")
    out = {}
    for key, tensor in model.state_dict().items():
        other, shape = key_map(model, layout)[key]
        out[other] = tensor.reshape(shape) if shape else tensor
    return out


def guess_config(state: dict[str, torch.Tensor], layout: str | None = None) -> str:
    """The model name a state dict most likely belongs to, e.g. ``'vgg16_bn'`` (with ``num_classes``)."""
    layout = layout or detect_layout(state)
    convs = [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 4
             and not k.startswith(("pre_logits.", "head."))]
    kernels = [state[k].shape[-1] for k in convs]
    batch_norm = any(k.endswith("running_mean") for k in state)
    depth = len(convs) + 3
    config = {11: "A", 13: "B", 16: "C" if 1 in kernels else "D", 19: "E"}.get(depth)
    fc8 = {"vggkit": "classifier.fc8.weight", "caffe": "fc8.weight",
           "torchvision": "classifier.6.weight", "timm": "head.fc.weight"}[layout]
    classes = f", num_classes={state[fc8].shape[0]}" if fc8 in state else ""
    if config is None:
        return f"a VGG with {len(convs)} conv layers (not one of the paper's configurations){classes}"
    return f"'{resolve(config + ('_bn' if batch_norm else '')).name}'{classes}"


def _mismatch_message(state, layout, model, missing, unexpected, mismatched) -> str:
    def listing(items: list[str]) -> str:
        return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

    lines = [f"These weights ({layout} layout) do not fit {model.name} with num_classes={model.num_classes}, "
             f"width={model.width}."]
    if missing:
        lines.append(f"  missing keys: {listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {listing(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatch: {listing(mismatched)}")
    lines.append(f"  The file looks like {guess_config(state, layout)}: pass that to create_model.")
    return "\n".join(lines)
