"""Weight sources, key mapping between layouts, and the hub cache.

Layouts, detected from the keys of a state dict:

- ``vggkit``: ``features.conv1_1.weight``, ``classifier.fc6.weight`` (this package);
- ``torchvision``: ``features.N.*``, ``classifier.0/3/6.*`` (also the Caffe ports such
  as ``vgg16-00b39a1b.pth``, which share torchvision's keys but expect Caffe input);
- ``timm``: ``features.N.*``, ``pre_logits.fc1/fc2`` stored as 7x7/1x1 convs, ``head.fc``;
- ``caffe``: ``conv1_1.weight`` ... ``fc8.weight``, the names of the original prototxt.

Files are read with ``torch.load(weights_only=True)`` or safetensors: a checkpoint
is data, never code.
"""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import torch
from torch import nn

from .checkpoint_io import WeightsError, atomic_save, check_finite, check_metadata, read_checkpoint
from .checks import check_choice
from .configs import resolve
from .model import VGG
from .preprocess import CAFFE, IMAGENET, Preprocess

LAYOUTS = ("vggkit", "torchvision", "timm", "caffe")
TORCHVISION_FC = {"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"}
TIMM_FC = {"fc6": "pre_logits.fc1", "fc7": "pre_logits.fc2", "fc8": "head.fc"}

# The original Caffe release converted to torchvision keys (BGR, 0-255, Caffe mean).
CAFFE_PORTS = {
    "vgg16": ("vgg16-00b39a1b.pth", "https://web.eecs.umich.edu/~justincj/models/vgg16-00b39a1b.pth"),
    "vgg19": ("vgg19-d01eb7cb.pth", "https://web.eecs.umich.edu/~justincj/models/vgg19-d01eb7cb.pth"),
}
CAFFE_PORT_FILES = {filename for filename, _ in CAFFE_PORTS.values()}


class WeightsUnavailableError(RuntimeError):
    """Published weights that could not be downloaded (offline, blocked) and are not cached."""


# --------------------------------------------------------------------------- reading files


def read_weights_file(path: str | os.PathLike, check_values: bool = True) -> dict:
    """Read a ``.pth``/``.pt``/``.bin``/``.safetensors`` file into a dict of tensors (and metadata).

    Only plain tensors and containers are accepted (``weights_only=True``), through
    ``checkpoint_io.read_checkpoint``. A vggkit checkpoint's metadata is validated field by
    field; with ``check_values`` every weight must be finite (NaN/Inf name the first bad tensor).
    """
    loaded = read_checkpoint(path)
    if loaded.get("format") == "vggkit":
        check_metadata({"state_dict": None, **loaded}, path)
    if check_values:
        check_finite(unwrap_checkpoint(loaded)[0], path)
    return loaded


def unwrap_checkpoint(loaded: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a loaded file into (state dict, metadata); strips DDP's ``module.`` prefix."""
    meta: dict = {}
    state = loaded
    if loaded.get("format") == "vggkit" and isinstance(loaded.get("state_dict"), dict):
        meta = {k: v for k, v in loaded.items() if k != "state_dict"}
        state = loaded["state_dict"]
    else:
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(loaded.get(key), dict):
                state = loaded[key]
                break
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, meta


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


# --------------------------------------------------------------------------- key mapping


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


# --------------------------------------------------------------------------- published releases


def hub_checkpoint_dir() -> Path:
    """Where downloaded weights are cached: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _download(url: str, filename: str, check_hash: bool, progress: bool) -> dict:
    """torch.hub's cached download, with an offline failure that says what to do."""
    cached = hub_checkpoint_dir() / filename
    try:
        return torch.hub.load_state_dict_from_url(
            url, progress=progress, check_hash=check_hash, file_name=filename, weights_only=True,
            map_location="cpu")
    except (urllib.error.URLError, OSError, ConnectionError, TimeoutError) as error:
        reason = getattr(error, "reason", error)
        raise WeightsUnavailableError(
            f"Could not download {filename} ({reason}).\n"
            f"  URL: {url}\n"
            f"  On a machine with internet this happens once; offline, download the file elsewhere "
            f"and place it at {cached}\n"
            f"  (the cache folder is $TORCH_HOME/hub/checkpoints), or pass weights='path/to/{filename}'."
        ) from None


def torchvision_weights_enum(name: str):
    """torchvision's ``VGG16_Weights.IMAGENET1K_V1`` (etc.) for a model name; None if there is none."""
    import torchvision.models as tvm

    spec = resolve(name)
    if spec.config in ("A-LRN", "C"):
        return None
    return getattr(tvm, f"{spec.name.upper()}_Weights").IMAGENET1K_V1


def load_imagenet(name: str, progress: bool = True) -> tuple[dict, Preprocess, dict]:
    """torchvision's ImageNet release for ``name`` (downloaded once, hash-checked)."""
    weights = torchvision_weights_enum(name)
    if weights is None:
        raise WeightsError(
            f"There is no published ImageNet release for {resolve(name).name} (config {resolve(name).config}); "
            f"torchvision publishes vgg11, vgg13, vgg16, vgg19 and their _bn variants. "
            f"Train it with `vggkit train` or pass a weight file.")
    url = weights.url
    state = _download(url, url.rsplit("/", 1)[-1], check_hash=True, progress=progress)
    metrics = weights.meta["_metrics"]["ImageNet-1K"]
    info = {"source": f"torchvision {weights}", "url": url, "acc@1": metrics["acc@1"], "acc@5": metrics["acc@5"]}
    return state, IMAGENET, info


def load_caffe(name: str, progress: bool = True) -> tuple[dict, Preprocess, dict]:
    """The original Caffe release (vgg16/vgg19), as the widely used torchvision-keyed port."""
    spec = resolve(name)
    if spec.batch_norm or spec.name not in CAFFE_PORTS:
        raise WeightsError(f"The Caffe release covers vgg16 and vgg19 (configs D, E) only, not {spec.name}.")
    filename, url = CAFFE_PORTS[spec.name]
    state = _download(url, filename, check_hash=False, progress=progress)
    return state, CAFFE, {"source": f"Caffe release ({filename})", "url": url}


def load_timm(name: str) -> tuple[dict, Preprocess, dict]:
    """timm's ``<name>.tv_in1k`` release, through timm's own hub download."""
    import timm

    spec = resolve(name)
    timm_name = f"{spec.name}.tv_in1k"
    if spec.config in ("A-LRN", "C"):
        raise WeightsError(f"timm has no weights for {spec.name}; it has vgg11/13/16/19 and their _bn variants.")
    try:
        model = timm.create_model(timm_name, pretrained=True)
    except Exception as error:  # huggingface_hub raises many kinds when offline
        raise WeightsUnavailableError(
            f"Could not get timm's {timm_name} weights ({type(error).__name__}: {str(error).splitlines()[0]}).\n"
            f"  On a machine with internet they are downloaded once into the Hugging Face cache; offline, "
            f"save them elsewhere with torch.save(timm.create_model('{timm_name}', pretrained=True).state_dict(), "
            f"'{spec.name}_timm.pth') and pass weights='{spec.name}_timm.pth'."
        ) from None
    cfg = model.pretrained_cfg
    preprocess = Preprocess(input_size=cfg["input_size"][-1],
                            resize_size=int(round(cfg["input_size"][-1] / cfg.get("crop_pct", 0.875))),
                            mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), name="timm")
    return model.state_dict(), preprocess, {"source": f"timm {timm_name}"}


# --------------------------------------------------------------------------- into a model


RELEASES = ("imagenet", "caffe", "timm")


def _is_release(weights) -> bool:
    return isinstance(weights, str) and weights.lower() in RELEASES


def _read_release(name: str, release: str, progress: bool) -> tuple[dict, Preprocess, dict]:
    if release == "imagenet":
        return load_imagenet(name, progress=progress)
    if release == "caffe":
        return load_caffe(name, progress=progress)
    return load_timm(name)


def _read_path(weights: str | os.PathLike, layout: str | None) -> tuple[dict, dict, Preprocess, dict]:
    """A weight file -> (state dict, metadata, its preprocessing, info)."""
    path = Path(weights)
    if not path.exists() and isinstance(weights, str) and os.sep not in weights and "." not in weights:
        raise ValueError(f"Unknown weights {weights!r}: use None, 'imagenet', 'caffe', 'timm' or a file path.")
    state, meta = unwrap_checkpoint(read_weights_file(path))
    if meta.get("preprocess"):
        preprocess = Preprocess.from_dict(meta["preprocess"])
    elif path.name in CAFFE_PORT_FILES or (layout or detect_layout(state)) == "caffe":
        preprocess = CAFFE
    else:
        preprocess = IMAGENET
    info = {"source": str(path), **{k: meta[k] for k in ("accuracy", "metrics") if k in meta}}
    return state, meta, preprocess, info


def _apply(model: VGG, state: dict, meta: dict, preprocess: Preprocess, info: dict, layout: str | None,
           fresh_fc8: bool = False) -> VGG:
    """Load a read state dict into ``model`` (strict) and attach its preprocessing and info."""
    layout = layout or detect_layout(state)
    if fresh_fc8:
        # Transfer learning from a release: its 1000-way fc8 is replaced by a fresh layer.
        reference = VGG(model.spec, num_classes=1000, width=model.width).to("meta")
        converted = convert_state_dict(state, reference, layout)
        fc8 = nn.Linear(model.classifier.fc8.in_features, model.num_classes)
        nn.init.normal_(fc8.weight, 0.0, 0.01)
        nn.init.zeros_(fc8.bias)
        converted.update({f"classifier.fc8.{k}": v for k, v in fc8.state_dict().items()})
        info = {**info, "fc8": f"new {model.num_classes}-way layer"}
    else:
        converted = convert_state_dict(state, model, layout)
    model.load_state_dict(converted, strict=True)
    model.preprocess = preprocess
    model.weights_info = info
    if meta.get("class_names"):
        model.class_names = list(meta["class_names"])
    return model


def load_weights(model: VGG, weights: str | os.PathLike, layout: str | None = None,
                 progress: bool = True) -> VGG:
    """Load ``weights`` (``"imagenet"``, ``"caffe"``, ``"timm"`` or a file path) into ``model`` in place.

    Sets ``model.preprocess`` and ``model.weights_info``. A published release given
    to a model with another class count keeps everything but a fresh fc8.
    """
    if layout is not None:
        check_choice("layout", layout, LAYOUTS)
    if _is_release(weights):
        state, preprocess, info = _read_release(model.name, weights.lower(), progress)
        return _apply(model, state, {}, preprocess, info, layout, fresh_fc8=model.num_classes != 1000)
    state, meta, preprocess, info = _read_path(weights, layout)
    return _apply(model, state, meta, preprocess, info, layout)


def checkpoint_metadata(path: str | os.PathLike) -> dict:
    """Model name, class count and width stored in a file (vggkit checkpoints), or guessed from its keys."""
    state, meta = unwrap_checkpoint(read_weights_file(path, check_values=False))
    return meta or _guess_metadata(state)


def _guess_metadata(state: dict) -> dict:
    layout = detect_layout(state)
    fc8 = {"vggkit": "classifier.fc8.weight", "caffe": "fc8.weight",
           "torchvision": "classifier.6.weight", "timm": "head.fc.weight"}[layout]
    return {"num_classes": int(state[fc8].shape[0])} if fc8 in state else {}


def create_model(name: str | None = None, weights: str | os.PathLike | None = None,
                 num_classes: int | None = None, dropout: float = 0.5, width: float | None = None,
                 init: str = "kaiming", layout: str | None = None, progress: bool = True,
                 seed: int | None = None) -> VGG:
    """Build a VGG of Table 1 and optionally load weights into it.

    ``weights``: None (random ``init``), ``"imagenet"`` (torchvision's release),
    ``"caffe"`` (the original release, vgg16/vgg19), ``"timm"``, or a path to a file in
    any known layout. ``name``, ``num_classes`` and ``width`` default to the file's own
    (vggkit checkpoints), else ``"vgg16"``, 1000 and 1.0. Returns an ordinary float32 ``nn.Module`` with
    ``.preprocess`` set to the weights' input transform. ``seed``: random init from this seed
    (the same network on every call; the global RNG is left as it was), else from the global RNG.
    """
    if layout is not None:
        check_choice("layout", layout, LAYOUTS)
    if weights is None:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            model = VGG(name or "vgg16", num_classes=1000 if num_classes is None else num_classes,
                        dropout=dropout, width=1.0 if width is None else width, init=init)
        model.preprocess = IMAGENET
        return model
    if _is_release(weights):
        name = name or "vgg16"
        read = _read_release(name, weights.lower(), progress)
        state, meta, preprocess, info = read[0], {}, read[1], read[2]
    else:
        state, meta, preprocess, info = _read_path(weights, layout)
        meta = {**_guess_metadata(state), **meta}
        name = name or meta.get("model_name") or "vgg16"
        num_classes = num_classes if num_classes is not None else meta.get("num_classes")
        width = width if width is not None else meta.get("width")
        dropout = meta.get("dropout", dropout)
    # Built on the meta device: every tensor is about to be overwritten, so skip the random init.
    with torch.device("meta"):
        model = VGG(name, num_classes=1000 if num_classes is None else num_classes, dropout=dropout,
                    width=1.0 if width is None else width, init=init)
    model.to_empty(device="cpu")
    fresh_fc8 = _is_release(weights) and model.num_classes != 1000
    return _apply(model, state, meta, preprocess, info, layout, fresh_fc8=fresh_fc8)


def save_checkpoint(model: VGG, path: str | os.PathLike, **extra) -> Path:
    """Write a self-describing vggkit checkpoint atomically (temp file + rename)."""
    path = Path(path)
    payload = {
        "format": "vggkit",
        "model_name": model.name,
        "num_classes": model.num_classes,
        "width": model.width,
        "dropout": model.dropout,
        "preprocess": (model.preprocess or IMAGENET).to_dict(),
        "class_names": model.class_names,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    atomic_save(payload, path)
    return path


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
