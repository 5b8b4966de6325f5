"""Keras's ``keras.applications.VGG16``/``VGG19`` weight files -> vggkit state dicts, read with h5py alone.

The three files Keras writes, none of which needs Keras (or TensorFlow) to be read:

- ``.weights.h5`` (Keras 3 ``save_weights``): ``layers/conv2d``, ``conv2d_1`` ... ``dense_2``, each with
  ``vars/0`` (kernel) and ``vars/1`` (bias). The groups are named after the layer's class, numbered
  in the model's layer order, so that order (not ``block1_conv1``) identifies each layer;
- legacy ``.h5`` (``model.save("x.h5")`` under ``model_weights/``, or Keras 2 ``save_weights``
  at the file's root, as the published ``vgg16_weights_tf_dim_ordering_tf_kernels.h5``): a group per
  layer (``block1_conv1`` ... ``fc1``, ``fc2``, ``predictions``) whose ``weight_names`` list kernel, bias;
- ``.keras`` (``model.save("x.keras")``): a zip holding ``model.weights.h5`` in the Keras 3 layout.

Keras kernels are HWIO for convs and (in, out) for Dense layers; fc1 reads Keras's flatten of the
(7, 7, 512) NHWC pool5, so its rows are reordered to vggkit's NCHW flatten. 13 conv layers are
VGG16 (config D), 16 are VGG19 (E). The weights expect Keras's ``preprocess_input`` ("caffe" mode:
BGR, 0-255, Caffe mean, no std), which is vggkit's ``CAFFE`` preprocessing.
"""

from __future__ import annotations

import io
import os
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..data.preprocess import CAFFE
from ..models.configs import resolve
from .checkpoint import KERAS_WEIGHTS_MEMBER, WeightsError

CONFIG_BY_CONVS = {13: "vgg16", 16: "vgg19"}  # keras.applications' two VGGs, told apart by depth


NAMED_LAYER = re.compile(r"(?P<kind>.+?)(?:_(?P<index>\d+))?$")  # "conv2d_10" -> conv2d, 10


class NoClassifierWarning(UserWarning):
    """A weight file without fc6-fc8 (Keras ``include_top=False``) was loaded: the classifier is random."""


def read_keras_file(path: str | os.PathLike, kind: str) -> dict:
    """A Keras VGG16/VGG19 file (``kind``: ``"hdf5"`` or ``"keras"``, see ``keras_file_kind``) -> a dict
    ``{"format": "keras", "state_dict": vggkit keys -> tensors, "model_name", "spec", "num_classes"
    (with a top), "top", "preprocess", "keras_file"}``; ``WeightsError`` naming the file otherwise."""
    path = Path(path)
    try:
        import h5py
    except ImportError:
        raise WeightsError(f"{path} is a Keras weight file; reading it needs h5py (Keras itself is not needed): "
                           f"pip install h5py, or pip install 'vggkit[keras]'.") from None
    try:
        if kind == "keras":
            with _open_member(path, KERAS_WEIGHTS_MEMBER) as member, h5py.File(member, "r") as h5:
                convs, denses = _keras3_layers(h5, path)
        else:
            with h5py.File(path, "r") as h5:
                convs, denses = _keras3_layers(h5, path) if "layers" in h5 else _legacy_layers(h5, path)
    except (OSError, KeyError, zipfile.BadZipFile) as error:  # h5py's errors on a damaged file are OSErrors
        raise WeightsError(f"{path} is a truncated or corrupt Keras file ({error}); save it again from Keras "
                           f"(model.save_weights('vgg16.weights.h5')).") from None
    return _to_vggkit(path, convs, denses)


def _open_member(path: Path, name: str) -> io.RawIOBase | io.BytesIO:
    """A zip member as a seekable file for h5py: read in place when stored (as Keras writes ``.keras``),
    else decompressed once into memory. (``ZipFile.open`` rereads the member from its start on every
    backward seek, and h5py seeks back and forth: 24 s instead of 1 s for VGG16.)"""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)  # KeyError: no such member, reported as a damaged file
        if info.compress_type != zipfile.ZIP_STORED:
            return io.BytesIO(archive.read(info))
    return _StoredMember(path, info)


class _StoredMember(io.RawIOBase):
    """The bytes of a stored zip member, read straight from the archive file (seekable, read-only)."""

    def __init__(self, path: Path, info: zipfile.ZipInfo) -> None:
        super().__init__()
        self._file = open(path, "rb")
        self._file.seek(info.header_offset)
        header = self._file.read(30)
        if len(header) < 30 or not header.startswith(b"PK\x03\x04"):
            self._file.close()
            raise zipfile.BadZipFile(f"no local header for {info.filename}")
        # The local header's name and extra field lengths may differ from the central directory's.
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        self._start = info.header_offset + 30 + name_length + extra_length
        self._size = info.file_size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self._size - self._position))
        self._file.seek(self._start + self._position)
        got = self._file.readinto(memoryview(buffer)[:count])
        self._position += got
        return got

    def close(self) -> None:
        self._file.close()
        super().close()


def _keras3_layers(h5, path: Path) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """Keras 3 layout -> ([kernel, bias] of each Conv2D, of each Dense), each list in layer order."""
    found: dict[str, list[tuple[int, list[np.ndarray]]]] = {}
    import h5py

    for name, group in h5["layers"].items():
        if not isinstance(group, h5py.Group):
            continue
        nested = [key for key in group if key != "vars"]
        if nested and _holds_arrays(group, nested):
            raise WeightsError(f"{path} holds a model inside a model (layer {name!r}): vggkit reads a "
                               f"keras.applications VGG16/VGG19 itself. Save that one: "
                               f"keras_model.get_layer('vgg16').save_weights('vgg16.weights.h5').")
        variables = group.get("vars")
        arrays = [variables[key][()] for key in sorted(variables, key=int)] if variables is not None else []
        if arrays:
            match = NAMED_LAYER.match(name)
            found.setdefault(match["kind"], []).append((int(match["index"] or 0), arrays))
    return _split_kinds(path, {kind: [a for _, a in sorted(items, key=lambda item: item[0])]
                               for kind, items in found.items()})


def _holds_arrays(group, keys: list[str]) -> bool:
    import h5py

    seen: list[str] = []
    for key in keys:
        item = group[key]
        if isinstance(item, h5py.Dataset):
            return True
        item.visititems(lambda name, obj: seen.append(name) if isinstance(obj, h5py.Dataset) else None)
    return bool(seen)


def _legacy_layers(h5, path: Path) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """Legacy (Keras 2 and ``model.save("x.h5")``) layout -> (Conv2D, Dense) [kernel, bias] lists in layer order."""
    import h5py

    root = h5["model_weights"] if "model_weights" in h5 else h5
    names = [_text(n) for n in root.attrs["layer_names"]] if "layer_names" in root.attrs else list(root)
    by_kind: dict[str, list[list[np.ndarray]]] = {}
    for name in names:
        group = root[name]
        if not isinstance(group, h5py.Group):
            continue  # a stray array beside the layer groups: not a layer
        if "weight_names" in group.attrs:
            arrays = [group[_text(w)][()] for w in group.attrs["weight_names"]]
        else:  # no list to follow: the group's arrays, the kernel (more dimensions) before the bias
            arrays = sorted(_datasets(group), key=lambda a: -a.ndim)
        if arrays:
            # Without class names in this layout, a 4-D kernel is a Conv2D's, a 2-D one a Dense layer's.
            kind = {4: "conv2d", 2: "dense"}.get(arrays[0].ndim, f"{name} ({arrays[0].ndim}-D kernel)")
            by_kind.setdefault(kind, []).append(arrays)
    return _split_kinds(path, by_kind)


def _datasets(group) -> list[np.ndarray]:
    import h5py

    out: list[np.ndarray] = []
    group.visititems(lambda name, obj: out.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _split_kinds(path: Path, by_kind: dict[str, list[list[np.ndarray]]]) -> tuple[list, list]:
    """(convs, denses), refusing any other layer with weights (batch norm: not a keras.applications VGG)."""
    convs, denses = by_kind.pop("conv2d", []), by_kind.pop("dense", [])
    if by_kind or len(convs) not in CONFIG_BY_CONVS:
        found = ", ".join(f"{len(v)} {k}" for k, v in {"conv2d": convs, "dense": denses, **by_kind}.items() if v)
        raise WeightsError(f"{path} is a Keras weight file but not a keras.applications VGG16 or VGG19 (it has "
                           f"{found or 'no layers with weights'}; VGG16 has 13 conv2d, VGG19 16). vggkit reads "
                           f"only those two; use a file saved from keras.applications.VGG16/VGG19.")
    return convs, denses


def _to_vggkit(path: Path, convs: list[list[np.ndarray]], denses: list[list[np.ndarray]]) -> dict:
    """Keras arrays -> vggkit keys and layouts: conv HWIO -> OIHW, Dense (in, out) -> (out, in)."""
    spec = resolve(CONFIG_BY_CONVS[len(convs)])
    names = [f"conv{b}_{i}" for b, block in enumerate(spec.blocks, start=1) for i in range(1, len(block) + 1)]
    state: dict[str, torch.Tensor] = {}
    channels = 3
    for name, arrays in zip(names, convs):
        kernel, bias = _two(path, arrays, name)
        if kernel.shape[:3] != (3, 3, channels):
            raise WeightsError(f"{path}: the kernel for {name} has shape {kernel.shape}, not (3, 3, {channels}, "
                               f"out) as a channels-last Keras VGG's; re-save it from keras.applications.")
        state[f"features.{name}.weight"] = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous()
        state[f"features.{name}.bias"] = torch.from_numpy(bias)
        channels = kernel.shape[3]
    meta = {"format": "keras", "model_name": spec.name, "spec": spec, "top": bool(denses),
            "preprocess": CAFFE.to_dict(), "keras_file": f"Keras {spec.name.upper()} ({path.name})"}
    if denses:
        state.update(_classifier(path, denses, channels))
        meta["num_classes"] = int(state["classifier.fc8.weight"].shape[0])
    return {**meta, "state_dict": state}


def _two(path: Path, arrays: list[np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    if len(arrays) != 2:
        raise WeightsError(f"{path}: the layer for {name} holds {len(arrays)} arrays, not a kernel and a bias; "
                           f"re-save it from keras.applications.")
    return arrays[0], arrays[1]


def _classifier(path: Path, denses: list[list[np.ndarray]], channels: int) -> dict[str, torch.Tensor]:
    """fc1, fc2, predictions -> classifier.fc6/fc7/fc8 (out, in); fc1's rows from NHWC to NCHW flatten order."""
    shapes = [tuple(arrays[0].shape) for arrays in denses]
    if len(denses) != 3 or shapes[0][0] != 7 * 7 * channels or shapes[1][0] != shapes[0][1] \
            or shapes[2][0] != shapes[1][1]:
        raise WeightsError(f"{path}: its Dense layers {shapes} are not VGG's fc1, fc2, predictions "
                           f"({7 * 7 * channels} -> 4096 -> 4096 -> classes). vggkit reads the keras.applications "
                           f"classifier or none: save the model built with include_top=False instead.")
    (k6, b6), (k7, b7), (k8, b8) = (_two(path, arrays, name) for arrays, name in zip(denses, ("fc1", "fc2", "fc8")))
    hidden = k6.shape[1]
    # Keras flattens pool5 as (h, w, c); vggkit (PyTorch) as (c, h, w): reorder fc1's input rows to match.
    # Rows first (contiguous 4096-float runs), then one 2-D transpose: 7x faster than a single 4-D permute.
    rows = torch.from_numpy(k6).reshape(49, channels, hidden).transpose(0, 1).contiguous().reshape(-1, hidden)
    return {"classifier.fc6.weight": rows.t().contiguous(), "classifier.fc6.bias": torch.from_numpy(b6),
            "classifier.fc7.weight": torch.from_numpy(k7).t().contiguous(), "classifier.fc7.bias": torch.from_numpy(b7),
            "classifier.fc8.weight": torch.from_numpy(k8).t().contiguous(), "classifier.fc8.bias": torch.from_numpy(b8)}
