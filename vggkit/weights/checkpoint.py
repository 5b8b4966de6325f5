"""Reading and writing checkpoint files: the one place a weight file is opened.

``read_checkpoint`` is what every load goes through (``create_model(weights=...)``,
``load``, ``predict``, ``--weights``/``--model``, ``init_from``, ``train --resume``):
it checks that the path is a regular file before opening it (a FIFO would block
forever), reads it as data only (``torch.load(weights_only=True)`` or safetensors),
and turns every failure into one ``WeightsError`` naming the file. ``check_metadata``
and ``check_finite`` validate what a vggkit checkpoint says about itself and its
numbers. ``write_safetensors`` writes a vggkit checkpoint as safetensors, its metadata as
JSON strings in the header, through a temp file and a rename (``vggkit.utils.atomic``).
``keras_file_kind`` tells Keras's files apart (``vggkit.weights.keras`` reads them).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import pickle
import re
import stat
import zipfile
from pathlib import Path

import torch

from ..data.preprocess import Preprocess
from ..models.configs import ModelSpec, resolve
from ..models.heads import HEADS
from ..utils.atomic import atomic_write
from ..utils.choices import RELEASES
from ..utils.paths import looks_like_a_path


def check_checkpoint_file(path: str | os.PathLike, what: str = "Checkpoint") -> Path:
    """``path`` as a Path if it is a regular file that looks like a weight file; else a one-line error
    saying what it is (missing, a folder, a FIFO, a symlink loop, an image...)."""

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        hint = "" if looks_like_a_path(path) else " (a file such as the model.pth that vggkit finetune writes)"
        raise FileNotFoundError(f"{what} not found: {path}{hint}")
    check_checkpoint_header(check_regular_file(path, what))
    return path


def check_weights_name(weights: str | os.PathLike) -> None:
    """A ``weights`` value that is not a release name: an existing weight file, else an error with the likely fix."""
    if Path(weights).exists() or Path(weights).is_symlink():
        check_checkpoint_file(weights, "Weight file")
        return
    text = str(weights)
    if os.sep not in text and "." not in text:
        close = difflib.get_close_matches(text.lower(), RELEASES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown weights {text!r}.{hint} Use imagenet, caffe, timm, a weight file, "
                         f"or none for random initialisation.")
    raise FileNotFoundError(f"Weight file not found: {text}")


class WeightsError(ValueError):
    """A weight file that cannot be loaded into the asked-for model, with the reason and the fix."""


PASS_A_CHECKPOINT = ("Pass a .pth/.pt/.ckpt state dict, a .safetensors file, a Keras .weights.h5/.h5/.keras file "
                     "or a vggkit checkpoint.")


# How the files torch.save writes begin: a zip archive (torch >= 1.6) or a pickle (legacy).
TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"  # Keras's .weights.h5 and legacy .h5 files


KERAS_WEIGHTS_MEMBER = "model.weights.h5"  # the weights inside a .keras zip (model.save("x.keras"))


OTHER_FILE_MAGIC = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image",
                    b"%PDF": "a PDF document", b"\x1f\x8b": "a gzip archive"}


# What a path is when it is not a regular file; opening a FIFO for reading waits for a writer forever.
NOT_A_FILE = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_regular_file(path: str | os.PathLike, what: str = "Weight file") -> Path:
    """``path`` if it is a regular file (links followed); else a one-line error saying what it is."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise FileNotFoundError(f"{what} {path} is a broken symbolic link "
                                    f"(it points to {os.readlink(path)}, which does not exist).") from None
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as error:  # ELOOP: a symlink loop; EACCES: a folder on the way that cannot be entered
        reason = "a symbolic link loop" if error.errno == 40 else (error.strerror or str(error))
        raise WeightsError(f"{what} {path} cannot be opened: {reason}.") from None
    if stat.S_ISDIR(mode):
        raise WeightsError(f"{path} is a folder; give the checkpoint file in it (e.g. {path / 'model.pth'}).")
    for test, kind in NOT_A_FILE:
        if test(mode):
            raise WeightsError(f"{what} {path} is {kind}, not a regular file. {PASS_A_CHECKPOINT}")
    return path


def check_checkpoint_header(path: Path) -> None:
    """``WeightsError`` for a file that cannot be a torch.save or safetensors file, saying what it looks like."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as error:
        raise WeightsError(f"Cannot read {path}: {error.strerror or error}.") from None
    safetensors = len(head) == 9 and head[8:9] == b"{"
    if head.startswith(TORCH_FILE_MAGIC + (HDF5_MAGIC,)) or (safetensors and path.suffix == ".safetensors"):
        return
    kind = next((name for magic, name in OTHER_FILE_MAGIC.items() if head.startswith(magic)),
                "an empty file" if not head else "unrecognised contents")
    if path.suffix == ".safetensors":
        raise WeightsError(f"{path} is not a valid .safetensors file ({kind}). {PASS_A_CHECKPOINT}")
    raise WeightsError(f"{path} is not a PyTorch weight file ({kind}). {PASS_A_CHECKPOINT}")


def read_checkpoint(path: str | os.PathLike, what: str = "Weight file") -> dict:
    """A ``.pth``/``.pt``/``.bin``/``.safetensors`` file -> the dict it holds (tensors and plain metadata).

    Only tensors and plain containers are read (``weights_only=True``): a file that carries
    code is refused without running it. Every failure is one ``WeightsError`` naming the file.
    """
    path = check_regular_file(path, what)
    check_checkpoint_header(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if keras_file_kind(path):
        # Keras files are read by vggkit.weights.keras, through create_model; torch.load would call them corrupt.
        raise WeightsError(f"{path} is a Keras weight file, not a PyTorch checkpoint; load it with "
                           f"vggkit.create_model(weights='{path}').")
    try:
        loaded = _torch_load(path)
    except pickle.UnpicklingError as error:
        # torch's own message suggests weights_only=False, which would run the file's code: name the
        # object it refused instead.
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what_it_holds = f" ({found.group(1)})" if found else ""
        raise WeightsError(
            f"{path} holds Python objects other than tensors{what_it_holds}, which vggkit refuses to unpickle: "
            f"a checkpoint is read as data, never run as code. If you trust the file, re-save only its "
            f"weights: torch.save(obj.state_dict(), 'weights.pth').") from None
    except (EOFError, RuntimeError) as error:  # torch's zip reader and the unpickler on a cut-off file
        raise WeightsError(f"{path} is truncated or corrupt ({_first_line(error)}); an interrupted copy or "
                           f"download? Copy it again, or use an earlier checkpoint.") from None
    except Exception as error:  # the unpickler fails in many ways on a file that is not a checkpoint
        raise WeightsError(f"{path} is not a PyTorch weight file ({type(error).__name__}: {_first_line(error)}). "
                           f"{PASS_A_CHECKPOINT}") from None
    if not isinstance(loaded, dict):
        raise WeightsError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors.")
    return loaded


def keras_file_kind(path: str | os.PathLike) -> str | None:
    """``"hdf5"`` (``.weights.h5``, legacy ``.h5``), ``"keras"`` (a ``.keras`` zip holding ``model.weights.h5``)
    or None, from the file's first bytes and, for a zip, its member names (torch.save files are zips too)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(HDF5_MAGIC))
    except OSError:
        return None
    if head == HDF5_MAGIC:
        return "hdf5"
    if head.startswith(TORCH_FILE_MAGIC[0]):
        try:
            with zipfile.ZipFile(path) as archive:
                # A .keras name without the member is still Keras's: its reader says what is missing.
                keras = KERAS_WEIGHTS_MEMBER in archive.namelist() or Path(path).suffix == ".keras"
                return "keras" if keras else None
        except (zipfile.BadZipFile, OSError):
            return None  # a cut-off torch file: its own reader names the damage
    return None


def read_safetensors(path: Path) -> dict:
    """A ``.safetensors`` file -> its tensors, plus, for one ``save_checkpoint`` wrote, the vggkit metadata
    decoded from the header (``format``, ``model_name``, ``num_classes`` ... as JSON strings) with the
    tensors under ``state_dict``. Other metadata (``{"format": "pt"}`` of Hugging Face files) is ignored."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError
        raise WeightsError(f"{path} is not a valid .safetensors file ({_first_line(error)}).") from None
    if header.get("format") not in ('"vggkit"', "vggkit"):
        return tensors
    meta = {}
    for key, text in header.items():
        try:
            meta[key] = json.loads(text)
        except ValueError:
            shown = text if len(text) <= 40 else text[:40] + "..."
            raise field_error(path, key, f"is not JSON ({shown!r}) in the safetensors metadata") from None
    return {**meta, "format": "vggkit", "state_dict": tensors}


def write_safetensors(state: dict[str, torch.Tensor], metadata: dict, path: str | os.PathLike) -> None:
    """``state`` as a real ``.safetensors`` file, each ``metadata`` field a JSON string in its header
    (safetensors holds str -> str only), written through a temp file and a rename."""
    from safetensors.torch import save_file

    header = {}
    for key, value in metadata.items():
        try:
            header[key] = json.dumps(value)
        except TypeError:
            raise ValueError(f"Cannot write {path}: {key!r} ({type(value).__name__}) is not plain data; a "
                             f".safetensors file holds tensors and text only. Save training state to a .pth "
                             f"file instead.") from None
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    # torch's zip errors end in a paragraph of advice (some of it about weights_only); keep the reason.
    return (text.splitlines()[0] if text else type(error).__name__).split(". ")[0]


def _torch_load(path: Path):
    """``torch.load(weights_only=True)``, memory-mapped where the file format allows (zip files)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error) and "zip" not in str(error):
            raise
        # Legacy (pre-1.6, non-zip) files, as some Caffe ports are, cannot be memory-mapped.
        return torch.load(path, map_location="cpu", weights_only=True)


def check_finite(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``WeightsError`` naming the first tensor (in file order) holding NaN or infinity."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise WeightsError(f"{path}: tensor {key!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}; "
                               f"the weights are broken (a diverged run?). Use an earlier checkpoint.")


def field_error(path, field: str, problem: str) -> WeightsError:
    return WeightsError(f"{path}: checkpoint field {field!r} {problem}. The file is damaged or was not written "
                        f"by vggkit; re-save it with vggkit.save_checkpoint or use another checkpoint.")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_metadata(meta: dict, path: str | os.PathLike) -> ModelSpec:
    """Every field of a vggkit checkpoint's metadata, each refused with a message naming it and ``path``;
    returns its model name resolved, so nothing downstream resolves it again."""
    if "state_dict" in meta and not isinstance(meta["state_dict"], dict):
        raise field_error(path, "state_dict", f"is a {type(meta['state_dict']).__name__}, not the weights")
    name = meta.get("model_name")
    if not isinstance(name, str):
        raise field_error(path, "model_name", f"is {name!r}, not a model name such as 'vgg16'")
    try:
        spec = resolve(name)
    except (KeyError, ValueError):
        raise field_error(path, "model_name", f"is {name!r}, not one of vggkit's configurations") from None
    classes = meta.get("num_classes")
    if not _positive_int(classes):
        raise field_error(path, "num_classes", f"is {classes!r}, not a positive whole number")
    width = meta.get("width", 1.0)
    if not (_finite_number(width) and width > 0):
        raise field_error(path, "width", f"is {width!r}, not a positive channel multiplier")
    dropout = meta.get("dropout", 0.5)
    if not (_finite_number(dropout) and 0 <= dropout < 1):
        raise field_error(path, "dropout", f"is {dropout!r}, not a probability in [0, 1)")
    names = meta.get("class_names")
    if names is not None:
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise field_error(path, "class_names", "is not a list of names")
        if len(names) != classes:
            raise field_error(path, "class_names", f"holds {len(names)} names for num_classes={classes}")
    if "preprocess" in meta:
        _check_preprocess(meta["preprocess"], path, Preprocess)
    head = meta.get("head")
    if head is not None:
        if not isinstance(head, dict) or head.get("type", "vgg") not in HEADS:
            raise field_error(path, "head", f"is {head!r}, not a head of type {', '.join(HEADS)}")
        if "hidden" in head and not _positive_int(head["hidden"]):
            raise field_error(path, "head.hidden", f"is {head['hidden']!r}, not a positive whole number")
        if "dropout" in head and not (_finite_number(head["dropout"]) and 0 <= head["dropout"] < 1):
            raise field_error(path, "head.dropout", f"is {head['dropout']!r}, not a probability in [0, 1)")
    return spec


def _check_preprocess(values, path, preprocess_type) -> None:
    if not isinstance(values, dict):
        raise field_error(path, "preprocess", f"is {values!r}, not the weights' input transform")
    for key in ("input_size", "resize_size"):
        if key in values and not _positive_int(values[key]):
            raise field_error(path, f"preprocess.{key}", f"is {values[key]!r}, not a positive number of pixels")
    for key in ("mean", "std"):
        if key in values:
            triple = values[key]
            if not (isinstance(triple, (list, tuple)) and len(triple) == 3 and all(map(_finite_number, triple))):
                raise field_error(path, f"preprocess.{key}", f"is {triple!r}, not three finite numbers")
    if "std" in values and any(v == 0 for v in values["std"]):
        raise field_error(path, "preprocess.std", "holds a zero (it divides the input)")
    if values.get("channel_order", "RGB") not in ("RGB", "BGR"):
        raise field_error(path, "preprocess.channel_order", f"is {values['channel_order']!r}, not RGB or BGR")
    scale = values.get("pixel_scale", 1.0)
    if not (_finite_number(scale) and scale > 0):
        raise field_error(path, "preprocess.pixel_scale", f"is {scale!r}, not a positive number")
    unknown = sorted(set(values) - set(preprocess_type.__dataclass_fields__))
    if unknown:
        raise field_error(path, "preprocess", f"has unknown field(s) {', '.join(map(str, unknown))}")


# What `vggkit train --resume` needs from last.pt besides the model.
TRAINING_FIELDS = ("recipe", "optimizer", "scheduler", "epoch", "step", "global_step", "rng", "history",
                   "best_top1_error", "epoch_loss")


def read_training_state(path: str | os.PathLike) -> dict:
    """A training run's ``last.pt``: read, every field checked, weights finite; one ``WeightsError`` otherwise."""
    state = read_checkpoint(path, what="Training checkpoint")
    if state.get("format") != "vggkit" or not isinstance(state.get("state_dict"), dict):
        raise WeightsError(f"{path} is not a vggkit checkpoint, so not a training run's {Path(path).name}; "
                           f"start the run without --resume, or point --output at the run's folder.")
    missing = [key for key in TRAINING_FIELDS if key not in state]
    if missing:
        raise WeightsError(f"{path} is a vggkit checkpoint without {', '.join(map(repr, missing))}: a model "
                           f"(best.pt or a fine-tuned model.pth), not a training run's last.pt. It cannot be "
                           f"resumed; start a new run (--set init.weights={path} starts from its weights).")
    check_metadata(state, path)
    for key, kind in (("recipe", dict), ("optimizer", dict), ("scheduler", dict), ("rng", list), ("history", list)):
        if not isinstance(state[key], kind):
            raise field_error(path, key, f"is a {type(state[key]).__name__}, not a {kind.__name__}")
    for key in ("epoch", "step", "global_step"):
        if not (isinstance(state[key], int) and state[key] >= 0):
            raise field_error(path, key, f"is {state[key]!r}, not a count")
    if not state["rng"]:
        raise field_error(path, "rng", "is empty")
    check_finite(state["state_dict"], path)
    return state
