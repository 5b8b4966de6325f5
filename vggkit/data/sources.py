"""Where images come from: a class-folder tree, WebDataset shards, or a Hugging Face dataset.

``open_scan(data)`` says which of the three ``data`` is and scans it into the same ``FolderScan``
(classes, (sample, label) samples, skipped) a class-folder tree gives. A sample in shards or a
table is an ``EncodedImage``: a ``str`` naming it (``val-000003.tar:n01440764_123.jpg``) that reads
its bytes on demand, so ``load_image`` decodes it with a file's checks (pixel limit, corrupt data)
and datasets, samplers and per-sample seeded augmentation built on (path, label) lists work unchanged.

- WebDataset: a brace pattern (``/d/val-{000000..000049}.tar``), a list of ``.tar`` files, one
  ``.tar`` or a folder of them. A sample is ``<key>.jpg|jpeg|png|webp`` + ``<key>.cls`` (an integer
  label) + an optional ``<key>.json``; keys are split as ``webdataset`` splits them. The shards are
  indexed once from their tar headers, then every member is read by offset (random access).
  Class names: ``classes`` (a file, one name a line), else ``classes.txt`` beside the shards, else
  ``class_0000``, ``class_0001``, ...
- Hugging Face: a folder written by ``datasets.save_to_disk`` (a Dataset, or a DatasetDict with
  train/validation/test), or ``.parquet`` files (a file, a folder, or a folder's ``data/``) with an
  image column (``{"bytes", "path"}``) and a label column; class names from the label's
  ``ClassLabel`` feature. Read with ``datasets`` (memory-mapped Arrow; random access by row).
"""

from __future__ import annotations

import functools
import glob
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..utils.paths import display_name
from .folders import (
    DataSplits,
    FolderScan,
    list_folder,
    report_skipped,
    screen_headers,
    stratified_split,
)
from .folders import prepare_splits as prepare_folder_splits
from .folders import scan_imagenet as scan_imagenet_folders
from .images import EncodedImage, ImageError, check_rescaled, load_image

KINDS = ("a class-folder tree", "WebDataset shards (.tar: a brace pattern, a list, or a folder of them)",
         "a Hugging Face dataset (a save_to_disk folder, or .parquet files)")

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}

DataInput = str | os.PathLike | Sequence[str | os.PathLike]


class TarMember(EncodedImage):
    """A member of a tar shard, read by its offset: ``TarMember("val-000003.tar:x.jpg", shard, offset, size)``."""

    def __new__(cls, name: str, shard: str, offset: int, size: int) -> "TarMember":
        member = super().__new__(cls, name)
        member.shard, member.offset, member.size = shard, offset, size
        return member

    def __reduce__(self):
        return type(self), (str(self), self.shard, self.offset, self.size)

    def read_bytes(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{display_name(self.shard)} is truncated")
        return data


@dataclass(frozen=True)
class TableRef:
    """One split of a Hugging Face dataset: ``files`` (a save_to_disk folder, or parquet files), its image column."""

    kind: str  # "disk" or "parquet"
    files: tuple[str, ...]
    split: str | None
    image: str


class TableRow(EncodedImage):
    """A row of a Hugging Face dataset: its image cell's bytes (or the file its ``path`` names)."""

    def __new__(cls, name: str, table: TableRef, row: int) -> "TableRow":
        item = super().__new__(cls, name)
        item.table, item.row = table, row
        return item

    def __reduce__(self):
        return type(self), (str(self), self.table, self.row)

    def read_bytes(self) -> bytes:
        cell = open_table(self.table)[self.row][self.table.image]
        if isinstance(cell, dict) and cell.get("bytes"):
            return cell["bytes"]
        if isinstance(cell, dict) and cell.get("path"):
            with open(cell["path"], "rb") as f:
                return f.read()
        return b""


@functools.lru_cache(maxsize=8)
def open_table(table: TableRef):
    """The ``datasets.Dataset`` of ``table`` with its image column undecoded (once per process)."""
    import datasets

    datasets.disable_progress_bars()  # vggkit's own bar counts the images
    if table.kind == "disk":
        dataset = datasets.load_from_disk(table.files[0])
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[table.split]
    else:
        dataset = datasets.Dataset.from_parquet(list(table.files))
    return dataset.cast_column(table.image, datasets.Image(decode=False))


# --------------------------------------------------------------------------- which kind


def shard_list(data: DataInput) -> list[str] | None:
    """``data`` as WebDataset shard files (brace patterns expanded, a folder's ``*.tar`` sorted), or None."""
    from webdataset.shardlists import expand_urls

    if isinstance(data, (list, tuple)):
        items = [str(d) for d in data]
        return items if items and all(item.endswith(".tar") for item in items) else None
    text = str(data)
    if "{" in text and ".." in text and text.endswith(".tar"):
        return expand_urls(text)
    if text.endswith(".tar") and Path(text).is_file():
        return [text]
    if Path(text).is_dir():
        shards = sorted(glob.glob(os.path.join(glob.escape(text), "*.tar")))
        return shards or None
    return None


def parquet_files(data: DataInput) -> list[str] | None:
    """``data`` as parquet files (a file, a list, a folder's or its ``data/``'s ``*.parquet``), or None."""
    if isinstance(data, (list, tuple)):
        items = [str(d) for d in data]
        return items if items and all(item.endswith(".parquet") for item in items) else None
    path = Path(data)
    if path.is_file() and path.suffix == ".parquet":
        return [str(path)]
    for folder in (path, path / "data"):
        if folder.is_dir():
            files = sorted(glob.glob(os.path.join(glob.escape(str(folder)), "*.parquet")))
            if files:
                return files
    return None


def is_saved_dataset(data: DataInput) -> bool:
    """True for a folder written by ``datasets.save_to_disk`` (a Dataset or a DatasetDict)."""
    if isinstance(data, (list, tuple)):
        return False
    path = Path(data)
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def detect(data: DataInput) -> str:
    """"folder", "webdataset" or "huggingface"; anything else is one ``ValueError`` naming what was tried."""
    if isinstance(data, (list, tuple)) and len(data) == 1:
        data = data[0]
    if not isinstance(data, (list, tuple)) and Path(data).is_dir():
        list_folder(data)  # a folder that cannot be read is one error naming it, before anything looks inside
    if is_saved_dataset(data) or parquet_files(data):
        return "huggingface"
    if shard_list(data):
        return "webdataset"
    if not isinstance(data, (list, tuple)):
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(f"Data folder not found: {display_name(path)}")
        if path.is_dir() and any(not e.name.startswith(".") and e.is_dir() for e in path.iterdir()):
            return "folder"
    if not isinstance(data, (list, tuple)) and Path(data).is_dir():
        raise ValueError(f"{display_name(data)} holds no class folders, no WebDataset shards (*.tar) and no Hugging "
                         f"Face dataset (save_to_disk files or *.parquet); tried {'; '.join(KINDS)}.")
    shown = display_name(str(data)) if not isinstance(data, (list, tuple)) else f"the {len(data)} paths given"
    raise ValueError(f"{shown} is none of the data kinds vggkit reads; tried {'; '.join(KINDS)}.")


def _split_of(name: str) -> str | None:
    """The split a shard or parquet file's name starts with (``val-000003.tar`` -> "val"), or None."""
    prefix = re.split(r"[-_.]", os.path.basename(name), maxsplit=1)[0].lower()
    return SPLIT_NAMES.get(prefix)


def group_splits(files: list[str]) -> dict[str, list[str]]:
    """Files by split (train/val/test from their names); without such names all are one split "all"."""
    groups: dict[str, list[str]] = {}
    for file in files:
        groups.setdefault(_split_of(file) or "all", []).append(file)
    return groups if "all" not in groups else {"all": files}


# --------------------------------------------------------------------------- class names


def read_classes(path: str | os.PathLike) -> list[str]:
    """A classes file: one class name a line, label order; blank lines ignored."""
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{display_name(path)} lists no class names (expected one name a line).")
    return names


def numbered_classes(count: int) -> list[str]:
    """``class_0000``, ``class_0001``, ... for data that names no classes."""
    return [f"class_{i:04d}" for i in range(count)]


def _class_names(beside: Path, classes: str | os.PathLike | None, labels: list[int],
                 num_classes: int | None) -> list[str]:
    """``classes`` (a file), else ``classes.txt`` in ``beside``, else numbered (``num_classes`` or max label + 1)."""
    if classes is not None:
        return read_classes(classes)
    if (beside / "classes.txt").is_file():
        return read_classes(beside / "classes.txt")
    return numbered_classes(num_classes or (max(labels, default=-1) + 1))


def _check_labels(samples: list[tuple[str, int]], classes: list[str],
                  skipped: list[tuple[str, str]]) -> list[tuple[str, int]]:
    """``samples`` less those whose label is not a class index (to ``skipped``)."""
    kept = []
    for name, label in samples:
        if 0 <= label < len(classes):
            kept.append((name, label))
        else:
            skipped.append((name, f"label {label} is not one of the {len(classes)} classes (0 to {len(classes) - 1})"))
    return kept


# --------------------------------------------------------------------------- WebDataset


def index_shard(shard: str) -> tuple[list[tuple[TarMember, int]], list[tuple[str, str]]]:
    """One tar shard -> ((member, label) samples in tar order, skipped): its headers and ``.cls`` members read."""
    from webdataset.tariterators import base_plus_ext

    base, groups, skipped = os.path.basename(shard), {}, []
    size = os.path.getsize(shard)
    try:
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                key, ext = base_plus_ext(info.name) if info.isfile() else (None, None)
                if key is None:
                    continue
                if info.offset_data + info.size > size:
                    raise tarfile.ReadError(f"truncated: {info.name} ends past the file's {size:,} bytes")
                members = groups.setdefault(key, {})
                members[ext.lower()] = info
                if ext.lower() == "cls":
                    members["label"] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        skipped.append((shard, f"not a readable tar shard ({error}); the samples before the damage are kept"))
    samples = []
    for key, members in groups.items():
        ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in members), None)
        if ext is None:
            skipped.append((f"{base}:{key}", "no image member (.jpg, .jpeg, .png or .webp)"))
            continue
        name = f"{base}:{key}.{ext}"
        try:
            label = int(members["label"].decode("utf-8").strip())
        except KeyError:
            skipped.append((name, "no .cls label member"))
            continue
        except (UnicodeDecodeError, ValueError):
            skipped.append((name, f"its .cls is not an integer label ({members['label'][:20]!r})"))
            continue
        info = members[ext]
        samples.append((TarMember(name, shard, info.offset_data, info.size), label))
    return samples, skipped


def wds_splits(data: DataInput) -> dict[str, list[str]]:
    """Shards by split: a folder's ``train-*``/``val-*``/``test-*`` shards apart, else one split "all"."""
    shards = shard_list(data) or []
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"Shard not found: {display_name(missing[0])}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if not isinstance(data, (list, tuple)) and Path(data).is_dir():
        return group_splits(shards)
    return {"all": shards}


def scan_shards(shards: list[str], classes: str | os.PathLike | None = None,
                num_classes: int | None = None) -> FolderScan:
    """WebDataset shards -> ``FolderScan`` (samples in shard order, then tar order)."""
    samples, skipped = [], []
    for shard in shards:
        found, bad = index_shard(shard)
        samples += found
        skipped += bad
    names = _class_names(Path(shards[0]).parent, classes, [label for _, label in samples], num_classes)
    root = Path(shards[0]).parent if len(shards) > 1 else Path(shards[0])
    return FolderScan(root, names, _check_labels(samples, names, skipped), skipped)


# --------------------------------------------------------------------------- Hugging Face


def hf_splits(data: DataInput) -> dict[str, TableRef]:
    """The splits of a save_to_disk folder or of parquet files (by file name: ``train-0000.parquet``)."""
    import datasets

    datasets.disable_progress_bars()
    if is_saved_dataset(data):
        location = str(data)
        loaded = datasets.load_from_disk(location)
        if isinstance(loaded, datasets.DatasetDict):
            return {SPLIT_NAMES.get(s, s): TableRef("disk", (location,), s, _image_column(loaded[s], location))
                    for s in loaded}
        return {"all": TableRef("disk", (location,), None, _image_column(loaded, location))}
    groups = group_splits(parquet_files(data) or [])
    return {split: TableRef("parquet", tuple(files), split,
                            _image_column(datasets.Dataset.from_parquet(files), files[0]))
            for split, files in groups.items()}


def _image_column(dataset, where: str) -> str:
    import datasets

    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in ("image", "img", "jpg", "png", "webp"):
        if name in dataset.features:
            return name
    raise ValueError(f"{display_name(where)} has no image column (an Image feature, or one named image); "
                     f"its columns: {', '.join(dataset.features)}.")


def _label_column(dataset, where: str) -> str:
    import datasets

    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    for name in ("label", "labels", "cls", "class"):
        if name in dataset.features:
            return name
    raise ValueError(f"{display_name(where)} has no label column (a ClassLabel feature, or one named label); "
                     f"its columns: {', '.join(dataset.features)}.")


def scan_table(table: TableRef, classes: str | os.PathLike | None = None,
               num_classes: int | None = None) -> FolderScan:
    """One split of a Hugging Face dataset -> ``FolderScan`` (samples in row order)."""
    import datasets

    dataset, where = open_table(table), table.files[0]
    label_column = _label_column(dataset, where)
    labels = list(dataset[label_column])
    feature = dataset.features[label_column]
    base = (os.path.basename(where.rstrip("/")) + ":" if table.kind == "disk" else "") + (table.split or "rows")
    samples, skipped, row = [], [], 0
    for chunk in dataset.data.column(table.image).chunks:
        no_bytes, paths = chunk.field("bytes").is_null().to_pylist(), chunk.field("path").to_pylist()
        for empty, path in zip(no_bytes, paths):
            name = f"{base}[{row}]" + (f":{os.path.basename(path)}" if path else "")
            if empty and not path:
                skipped.append((name, "no image (its image cell holds neither bytes nor a path)"))
            elif labels[row] is None:
                skipped.append((name, "no label"))
            else:
                samples.append((TableRow(name, table, row), int(labels[row])))
            row += 1
    if classes is None and isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:
        names = _class_names(Path(where).parent if table.kind == "parquet" else Path(where), classes,
                             [label for _, label in samples], num_classes)
    return FolderScan(Path(where), names, _check_labels(samples, names, skipped), skipped)


# --------------------------------------------------------------------------- one interface


def source_splits(data: DataInput) -> tuple[str, dict[str, object]]:
    """(kind, {split: what ``scan_split`` scans}) for shards or a Hugging Face dataset."""
    kind = detect(data)
    if kind == "webdataset":
        return kind, wds_splits(data)
    if kind == "huggingface":
        return kind, hf_splits(data)
    return kind, {}


def scan_split(kind: str, split: object, classes: str | os.PathLike | None = None,
               num_classes: int | None = None, verify: bool = False) -> FolderScan:
    """One split of shards (a shard list) or of a Hugging Face dataset (a ``TableRef``), unusable samples skipped:
    every one decoded with ``verify``, else their headers screened (``folders.screen_headers``)."""
    scan = (scan_shards(split, classes, num_classes) if kind == "webdataset"
            else scan_table(split, classes, num_classes))
    if verify:
        kept = []
        for sample, label in scan.samples:
            try:
                image = load_image(sample)
                check_rescaled(image.width, image.height, 224, sample)
                kept.append((sample, label))
            except ImageError as error:
                scan.skipped.append((sample, error.reason))
        scan.samples = kept
    else:
        scan.samples = screen_headers(scan.samples, scan.skipped)
    return scan


EVALUATION_SPLITS = ("val", "test", "all")


def open_scan(data: DataInput, split: str | None = None, classes: str | os.PathLike | None = None,
              num_classes: int | None = None, verify: bool = False) -> FolderScan:
    """Scan ``data``, whichever of the three kinds it is (``detect``), into a ``FolderScan``.

    A class-folder tree is ``folders.scan_folder``'s. Shards or a dataset with several splits give
    ``split`` (default: val, else test; a single split is taken whatever its name). ``classes``
    names the classes of shards (a file, one a line) when ``classes.txt`` is not beside them;
    ``num_classes`` is how many numbered classes to make when nothing names them.
    """
    from .folders import scan_folder

    kind, splits = source_splits(data)
    if kind == "folder":
        return scan_folder(data, verify=verify)
    if split is None:
        split = next(iter(splits)) if len(splits) == 1 else next((s for s in EVALUATION_SPLITS if s in splits), None)
    if split not in splits:
        raise ValueError(f"{display_name(str(data))} has no {split or 'val or test'} split; its splits: "
                         f"{', '.join(splits)}.")
    return scan_split(kind, splits[split], classes, num_classes, verify)


def prepare_splits(data_dir: DataInput, num_classes: int | None = None, val_fraction: float = 0.2,
                   seed: int = 0, verify: bool = True) -> DataSplits:
    """``folders.prepare_splits`` for any kind of data: train (``train``, or the only split), val
    (``val``/``validation``, else a stratified ``val_fraction`` of train), test when present."""
    kind, splits = source_splits(data_dir)
    if kind == "folder":
        return prepare_folder_splits(data_dir, num_classes, val_fraction, seed, verify)
    train_split = "train" if "train" in splits else next(iter(splits))
    train = scan_split(kind, splits[train_split], num_classes=num_classes, verify=verify)
    if num_classes is not None and num_classes != len(train.classes):
        raise ValueError(f"num_classes={num_classes}, but {display_name(str(data_dir))} names "
                         f"{len(train.classes)} classes. Pass num_classes={len(train.classes)}.")
    scans = {s: scan_split(kind, splits[s], num_classes=len(train.classes), verify=verify)
             for s in ("val", "test") if s in splits and s != train_split}
    skipped = train.skipped + [item for scan in scans.values() for item in scan.skipped]
    if not train.samples:
        raise ValueError(f"No usable images in {display_name(str(data_dir))}.")
    if "val" in scans:
        train_samples, val = train.samples, scans["val"].samples
    else:
        train_samples, val = stratified_split(train.samples, len(train.classes), val_fraction, seed)
    if not val:
        raise ValueError(f"No validation images in {display_name(str(data_dir))}: give each class at least two "
                         f"images, or add a val split.")
    test = scans["test"].samples if "test" in scans else []
    return DataSplits(train.classes, train_samples, val, test, skipped)


def scan_imagenet(data_dir: DataInput, verify: bool = False) -> tuple[FolderScan, FolderScan]:
    """``folders.scan_imagenet`` for any kind of data: shards or a dataset need a train and a val split."""
    kind, splits = source_splits(data_dir)
    if kind == "folder":
        return scan_imagenet_folders(data_dir, verify)
    missing = [s for s in ("train", "val") if s not in splits]
    if missing:
        raise ValueError(f"{display_name(str(data_dir))} has no {' and no '.join(missing)} split (splits found: "
                         f"{', '.join(splits)}); name shards train-*.tar and val-*.tar, or give a DatasetDict "
                         f"with train and validation.")
    train = scan_split(kind, splits["train"], verify=verify)
    val = scan_split(kind, splits["val"], num_classes=len(train.classes), verify=verify)
    report_skipped(train.skipped + val.skipped)
    for scan in (train, val):
        if not scan.samples:
            raise ValueError(f"{scan.root} holds no usable images.")
    return train, val

