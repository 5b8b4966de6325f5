"""Every way to get a model: ``create_model`` (a name, a release or a file), ``load`` (a vggkit
checkpoint), ``backbone`` (named features), ``load_weights`` (into a model in place) and
``save_checkpoint``. A model name is resolved once, into a ``ModelSpec`` that is passed down.

Files are read with ``torch.load(weights_only=True)``, safetensors or h5py (Keras files): a
checkpoint is data, never code.
"""

from __future__ import annotations

import os
import re
import warnings
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
    WeightsError,
    check_checkpoint_file,
    check_finite,
    check_metadata,
    check_regular_file,
    keras_file_kind,
    read_checkpoint,
    write_safetensors,
)
from .keras import NoClassifierWarning, read_keras_file
from .layouts import LAYOUTS, convert_state_dict, detect_layout
from .releases import CAFFE_PORT_FILES, _is_release, _read_release

DEFAULT_MODEL = "vgg16"  # the name where none is given: the network most people mean by VGG


# The attribute a LightningModule usually keeps its network in; its .ckpt keys read "model.features.0.weight".
LIGHTNING_PREFIXES = ("model.", "net.")


VGG_KEY = re.compile(r"(features|classifier|pre_logits|head)\.|(conv\d+_\d+|fc[678])\.")  # any layout's keys


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
        fc_taps = [layer for layer in layers if layer.startswith("fc")]
        with warnings.catch_warnings():
            # A file without a classifier (Keras include_top=False) is fine for conv and pool taps.
            warnings.simplefilter("ignore", NoClassifierWarning)
            vgg = create_model(spec, weights=weights, width=width)
        if fc_taps and "classifier" in vgg.weights_info:
            raise WeightsError(f"{weights} has no fc6/fc7 weights (saved without the classifier), so it cannot "
                               f"give {', '.join(fc_taps)}; tap conv or pool layers, or use a file with the top.")
        return VGGBackbone(vgg, list(layers), frozen=frozen, pad_fc6=pad_fc6)
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
    """Read a ``.pth``/``.pt``/``.ckpt``/``.bin``/``.safetensors`` or Keras ``.weights.h5``/``.h5``/``.keras``
    file into a dict of tensors (and metadata).

    Only plain tensors and containers are accepted (``weights_only=True``), through
    ``checkpoint.read_checkpoint``; Keras files go to ``keras.read_keras_file`` (h5py, in vggkit's
    layout). A vggkit checkpoint's metadata (a ``.safetensors`` one's too) is validated field by
    field; with ``check_values`` every weight must be finite (NaN/Inf name the first bad tensor).
    """
    kind = keras_file_kind(check_regular_file(path))
    loaded = read_keras_file(path, kind) if kind else read_checkpoint(path)
    if loaded.get("format") == "vggkit":
        # The name is resolved here, once, and travels with the metadata as ``spec``.
        loaded = {**loaded, "spec": check_metadata({"state_dict": None, **loaded}, path)}
    if check_values:
        check_finite(unwrap_checkpoint(loaded)[0], path)
    return loaded


def unwrap_checkpoint(loaded: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a loaded file into (state dict, metadata); strips DDP's ``module.`` prefix and a Lightning
    ``.ckpt``'s ``model.``/``net.`` (the LightningModule's attribute holding the network)."""
    meta: dict = {}
    state = loaded
    if loaded.get("format") in ("vggkit", "keras") and isinstance(loaded.get("state_dict"), dict):
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
    state, prefix = _strip_lightning_prefix(state)
    if prefix or "pytorch-lightning_version" in loaded:
        meta["lightning"] = {"prefix": prefix, **{k: loaded[k] for k in ("epoch", "global_step",
                                                                          "pytorch-lightning_version") if k in loaded}}
    return state, meta


def _strip_lightning_prefix(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """The network's keys without a LightningModule's ``model.``/``net.``, and that prefix; only when every
    VGG key has it (none lies outside it). Keys outside it (a loss's class weights) are not the network's."""
    if any(VGG_KEY.match(key) for key in state):
        return state, None
    for prefix in LIGHTNING_PREFIXES:
        inner = {key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)}
        if any(VGG_KEY.match(key) for key in inner):
            return inner, prefix
    return state, None


def _read_path(weights: str | os.PathLike, layout: str | None) -> tuple[dict, dict, Preprocess, dict]:
    """A weight file -> (state dict, metadata, its preprocessing, info)."""
    path = Path(weights)
    if not path.exists() and isinstance(weights, str) and os.sep not in weights and "." not in weights:
        raise ValueError(f"Unknown weights {weights!r}: use None, 'imagenet', 'caffe', 'timm' or a file path.")
    state, meta = unwrap_checkpoint(read_weights_file(path))
    if layout not in (None, "vggkit") and meta.get("format") == "keras":
        raise ValueError(f"layout={layout!r} names a PyTorch key layout; {path} is a Keras file, whose layers "
                         f"are read by name and order. Leave layout out.")
    if meta.get("preprocess"):
        preprocess = Preprocess.from_dict(meta["preprocess"])
    elif path.name in CAFFE_PORT_FILES or (layout or detect_layout(state)) == "caffe":
        preprocess = CAFFE
    else:
        preprocess = IMAGENET
    info = {"source": str(path), **{k: meta[k] for k in ("accuracy", "metrics", "keras_file", "lightning")
                                    if k in meta}}
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
        if meta.get("top") is False:
            state, info = _keep_classifier(model, state, info)
        converted = convert_state_dict(state, model, layout)
    model.load_state_dict(converted, strict=True)
    if meta.get("top") is False:
        warnings.warn(f"{info['source']} has no classifier (saved with include_top=False): {model.name}'s "
                      f"fc6-fc8 are random. Use model.forward_features(x) or vggkit.backbone(weights=...) for "
                      f"features, or fine-tune the classifier before reading its classes.",
                      NoClassifierWarning, stacklevel=3)
    model.preprocess = preprocess
    model.weights_info = info
    if meta.get("class_names"):
        model.class_names = list(meta["class_names"])
    return model


def _keep_classifier(model: VGG, state: dict, info: dict) -> tuple[dict, dict]:
    """A file without fc6-fc8 (Keras ``include_top=False``): ``model``'s own (random) classifier is kept,
    so its features are the file's and its classes are not (``_apply`` warns once it has loaded)."""
    own = {f"classifier.{k}": v for k, v in model.classifier.state_dict().items()}
    return {**state, **own}, {**info, "classifier": "random (the file has no fc6-fc8)"}


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
    """Name, class count and width a file states (vggkit checkpoints, Keras files), else guessed from its keys."""
    state, meta = unwrap_checkpoint(read_weights_file(path, check_values=False))
    # A vggkit or Keras file describes itself; any other (a Lightning .ckpt too) is described by its keys.
    return meta if meta.get("format") else {**_guess_metadata(state), **meta}


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
    if meta.get("top") is False:  # the file has no fc6-fc8: they are the only layers initialised here
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            init_parameters(model.classifier, init)
    fresh_fc8 = _is_release(weights) and model.num_classes != 1000
    return _apply(model, state, meta, preprocess, info, layout, fresh_fc8=fresh_fc8)


def save_checkpoint(model: VGG, path: str | os.PathLike, **extra) -> Path:
    """Write a self-describing vggkit checkpoint atomically (temp file + rename).

    ``x.safetensors``: a real safetensors file, each metadata field (format, model_name, num_classes,
    width, dropout, head, class_names, preprocess and ``extra``) a JSON string in its header; ``extra``
    must then be plain data. Any other name: ``torch.save`` of the metadata and ``state_dict``.
    """
    path = Path(path)
    meta = {
        "format": "vggkit",
        "model_name": model.name,
        "num_classes": model.num_classes,
        "width": model.width,
        "dropout": model.dropout,
        "preprocess": (model.preprocess or IMAGENET).to_dict(),
        "class_names": model.class_names,
        **({"head": model.head_config} if getattr(model, "head_config", None) else {}),  # attach_head's record
        **extra,
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        write_safetensors(state, {k: v for k, v in meta.items() if v is not None}, path)
    else:
        atomic_save({**meta, "state_dict": state}, path)
    return path


def load(checkpoint: str | os.PathLike) -> VGG:
    """A float32 VGG in eval mode, with its head, class names and preprocessing, from a
    vggkit checkpoint (as written by ``finetune`` or ``save_checkpoint``).
    """
    path = check_checkpoint_file(checkpoint)
    if keras_file_kind(path):  # told from its first bytes, before reading 500 MB to say the same
        raise ValueError(f"{path} is a Keras file, not a vggkit checkpoint: load it with "
                         f"vggkit.create_model(weights='{path}'), which maps Keras's layers onto vggkit's.")
    if checkpoint_metadata(path).get("format") != "vggkit":
        raise ValueError(f"{path} is a plain state dict, not a vggkit checkpoint: it does not say which model "
                         f"it belongs to. Use vggkit.create_model('vgg16', weights='{path}') with the right name.")
    return create_model(weights=path).eval()
