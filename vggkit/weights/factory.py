"""Every way to get a model: ``create_model`` (a name, a release or a file), ``load`` (a vggkit
checkpoint), ``backbone`` (named features), ``load_weights`` (into a model in place) and
``save_checkpoint``. A model name is resolved once, into a ``ModelSpec`` that is passed down.

Files are read with ``torch.load(weights_only=True)`` or safetensors: a checkpoint
is data, never code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..data.preprocess import CAFFE, IMAGENET, Preprocess
from ..models.backbone import VGGBackbone
from ..models.configs import ModelSpec, resolve
from ..models.heads import attach_head
from ..models.vgg import VGG, check_layers, init_parameters
from ..utils.atomic import atomic_save
from ..utils.checks import check_choice
from .checkpoint import (
    check_checkpoint_file,
    check_finite,
    check_metadata,
    read_checkpoint,
)
from .layouts import LAYOUTS, convert_state_dict, detect_layout
from .releases import CAFFE_PORT_FILES, _is_release, _read_release

DEFAULT_MODEL = "vgg16"  # the name where none is given: the network most people mean by VGG


def backbone(name: str = "vgg16", layers: list[str] | tuple[str, ...] = ("conv3_3", "conv4_3", "conv5_3"),
             weights: str | None = None, frozen: bool = False, pad_fc6: bool = False,
             width: float | None = None, init: str = "kaiming") -> VGGBackbone:
    """Named intermediate features of a VGG, e.g. for a segmentation head.

    ``layers``: ``conv1_1 ... conv5_4`` (after the ReLU), ``conv1_1_pre ... conv5_4_pre``
    (before it: the conv's output, after its batch norm in ``_bn`` models), ``pool1 ...
    pool5``, ``lrn1``, ``fc6``, ``fc7``.

    Only the layers up to the deepest one asked for are built (with random ``init``) or kept
    (with ``weights``).

    >>> fe = backbone("vgg16", layers=["conv3_3", "conv4_3", "conv5_3"])
    >>> {k: v.shape for k, v in fe(torch.zeros(1, 3, 224, 224)).items()}  # strides 4, 8, 16
    """

    spec = resolve(name)
    check_layers(spec, list(layers))
    if weights is not None:
        return VGGBackbone(create_model(spec, weights=weights, width=width), list(layers),
                           frozen=frozen, pad_fc6=pad_fc6)
    # Random weights: lay the network out on the meta device, keep what the taps need, and
    # allocate and initialise only that (vgg16's conv3_3 taps: 1.7M of 138M parameters).
    with torch.device("meta"):
        vgg = _build(spec, width=width, init=init)
    fe = VGGBackbone(vgg, list(layers), pad_fc6=pad_fc6).to_empty(device="cpu")
    init_parameters(fe, init, linear_like=tuple(c for c in (fe.fc6, fe.fc7) if c is not None))
    fe.preprocess = IMAGENET
    if frozen:
        fe.requires_grad_(False).eval()
    return fe


def read_weights_file(path: str | os.PathLike, check_values: bool = True) -> dict:
    """Read a ``.pth``/``.pt``/``.bin``/``.safetensors`` file into a dict of tensors (and metadata).

    Only plain tensors and containers are accepted (``weights_only=True``), through
    ``checkpoint_io.read_checkpoint``. A vggkit checkpoint's metadata is validated field by
    field; with ``check_values`` every weight must be finite (NaN/Inf name the first bad tensor).
    """
    loaded = read_checkpoint(path)
    if loaded.get("format") == "vggkit":
        # The name is resolved here, once, and travels with the metadata as ``spec``.
        loaded = {**loaded, "spec": check_metadata({"state_dict": None, **loaded}, path)}
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
        state, preprocess, info = _read_release(model.spec, weights.lower(), progress)
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


def _build(spec: ModelSpec | None, num_classes: int | None = None, dropout: float = 0.5,
           width: float | None = None, init: str = "kaiming", head: dict | None = None) -> VGG:
    """The one place the factories construct a VGG: defaults filled in, a saved non-paper head attached."""
    model = VGG(spec or resolve(DEFAULT_MODEL), num_classes=1000 if num_classes is None else num_classes,
                dropout=dropout, width=1.0 if width is None else width, init=init)
    if head and head.get("type", "vgg") != "vgg":
        attach_head(model, head["type"], model.num_classes, hidden=int(head.get("hidden", 512)),
                    dropout=float(head.get("dropout", dropout)))
    return model


def create_model(name: str | ModelSpec | None = None, weights: str | os.PathLike | None = None,
                 num_classes: int | None = None, dropout: float = 0.5, width: float | None = None,
                 init: str = "kaiming", layout: str | None = None, progress: bool = True,
                 seed: int | None = None) -> VGG:
    """Build a VGG of Table 1 and optionally load weights into it: every way vggkit gets a model ends here.

    ``weights``: None (random ``init``), ``"imagenet"`` (torchvision's release),
    ``"caffe"`` (the original release, vgg16/vgg19), ``"timm"``, or a path to a file in
    any known layout. ``name``, ``num_classes``, ``width`` and the head default to the file's own
    (vggkit checkpoints), else ``"vgg16"``, 1000 and 1.0. Returns an ordinary float32 ``nn.Module`` with
    ``.preprocess`` set to the weights' input transform. ``seed``: random init from this seed
    (the same network on every call; the global RNG is left as it was), else from the global RNG.
    """
    if layout is not None:
        check_choice("layout", layout, LAYOUTS)
    spec = None if name is None else resolve(name)  # resolved once here, then passed down
    if weights is None:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            model = _build(spec, num_classes, dropout, width, init)
        model.preprocess = IMAGENET
        return model
    if _is_release(weights):
        spec = spec or resolve(DEFAULT_MODEL)
        state, preprocess, info = _read_release(spec, weights.lower(), progress)
        meta = {}
    else:
        state, meta, preprocess, info = _read_path(weights, layout)
        meta = {**_guess_metadata(state), **meta}
        spec = spec or meta.get("spec")
        num_classes = num_classes if num_classes is not None else meta.get("num_classes")
        width = width if width is not None else meta.get("width")
        dropout = meta.get("dropout", dropout)
    # Built on the meta device: every tensor is about to be overwritten, so skip the random init.
    with torch.device("meta"):
        model = _build(spec, num_classes, dropout, width, init, head=meta.get("head"))
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


def load(checkpoint: str | os.PathLike) -> VGG:
    """A float32 VGG in eval mode, with its head, class names and preprocessing, from a
    vggkit checkpoint (as written by ``finetune`` or ``save_checkpoint``).
    """
    path = check_checkpoint_file(checkpoint)
    if checkpoint_metadata(path).get("format") != "vggkit":
        raise ValueError(f"{path} is a plain state dict, not a vggkit checkpoint: it does not say which model "
                         f"it belongs to. Use vggkit.create_model('vgg16', weights='{path}') with the right name.")
    return create_model(weights=path).eval()
