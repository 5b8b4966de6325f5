"""``vggkit pack``: a class-folder tree -> WebDataset shards (``webdataset.ShardWriter``) or parquet files
(``datasets``), and ``verify_pack``, which reads them back.

The output is written into a temp folder beside ``out`` (``.OUT.tmp<pid>``) and renamed to ``out``
when every file is complete, so ``out`` is a whole pack or absent. Splits (train/, val/, test/)
become file name prefixes (``val-000000.tar``, ``train-00000.parquet``); a tree without them takes
its folder's name when that is a split's (``.../val`` -> ``val-*``), else ``data-*``. Beside the
files: ``classes.txt`` (one class a line, label order) and ``pack.json`` (counts per split).
Unusable files are decoded once while scanning, skipped and reported (``report_skipped``).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..utils.atomic import remove_stale_temps
from ..utils.paths import display_name
from .folders import FolderScan, find_splits, report_skipped, scan_splits
from .images import load_image
from .sources import SPLIT_NAMES, detect, read_classes, scan_split, source_splits

FORMATS = ("wds", "parquet")

KEPT_AS_IS = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}  # other formats become PNG

MANIFEST = "pack.json"

_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(size: int | str) -> int:
    """``"1GB"``, ``"500MB"``, ``"64KiB"`` or a byte count -> bytes (at least 1 KB)."""
    if isinstance(size, int):
        value = size
    else:
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if not found or found.group(2).upper() not in _UNITS:
            raise ValueError(f"Shard size {size!r} is not a size; write it like 1GB, 500MB or 64KiB.")
        value = int(float(found.group(1)) * _UNITS[found.group(2).upper()])
    if value < 1000:
        raise ValueError(f"Shard size {size!r} is under 1 KB; give a size like 1GB.")
    return value


@dataclass
class PackResult:
    """What ``pack`` wrote: the folder, its format, images per split, its files, what was skipped."""

    out: Path
    format: str
    counts: dict[str, int]
    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _split_scans(src: Path) -> dict[str, FolderScan]:
    """``{prefix: scan}``: train/val/test folders, or the tree itself (named by its folder when a split's)."""
    splits = find_splits(src)
    scans = scan_splits(src, splits, True, _subset_of_train)
    if splits:
        return scans
    return {SPLIT_NAMES.get(src.name.lower(), "data"): scans["train"]}


def _subset_of_train(split: Path, train: FolderScan, only_split: list[str], only_train: list[str]) -> str | None:
    if not only_split:
        return None
    return f"{split} has class folder(s) {only_split[:10]} that {train.root} lacks."


def encoded(path: str) -> tuple[bytes, str]:
    """A file's bytes and webdataset extension: JPEG/PNG/WebP as they are, anything else as a lossless PNG of
    what ``load_image`` decodes (upright RGB), so reading the pack gives the folder's pixels."""
    ext = KEPT_AS_IS.get(os.path.splitext(path)[1].lower())
    if ext:
        with open(path, "rb") as f:
            return f.read(), ext
    buffer = io.BytesIO()
    load_image(path).save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def _keys(scan: FolderScan) -> Iterator[tuple[str, str, int]]:
    """(path, unique key, label) per sample: the file's stem, dots made underscores, numbered on a repeat."""
    used: set[str] = set()
    for path, label in scan.samples:
        key = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(path).stem) or "image"
        unique, n = key, 1
        while unique in used:
            unique, n = f"{key}_{n}", n + 1
        used.add(unique)
        yield path, unique, label


def _write_wds(scan: FolderScan, folder: Path, prefix: str, shard_size: int, bar) -> list[str]:
    import webdataset as wds

    pattern = str(folder / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxsize=shard_size, maxcount=10**9, verbose=0) as writer:
        for path, key, label in _keys(scan):
            data, ext = encoded(path)
            meta = {"path": os.path.relpath(path, scan.root), "class": scan.classes[label]}
            writer.write({"__key__": key, ext: data, "cls": str(label).encode(),
                          "json": json.dumps(meta).encode()})
            bar.update(1)
    return sorted(p.name for p in folder.glob(f"{prefix}-*.tar"))


def _write_parquet(scan: FolderScan, folder: Path, prefix: str, shard_size: int, bar) -> list[str]:
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=scan.classes)})
    files: list[str] = []
    rows: dict[str, list] = {"image": [], "label": []}
    size = 0

    def flush() -> None:
        name = f"{prefix}-{len(files):05d}.parquet"
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / name))
        files.append(name)

    for path, key, label in _keys(scan):
        data, ext = encoded(path)
        if rows["label"] and size + len(data) > shard_size:
            flush()
            rows, size = {"image": [], "label": []}, 0
        rows["image"].append({"bytes": data, "path": f"{key}.{ext}"})
        rows["label"].append(label)
        size += len(data)
        bar.update(1)
    if rows["label"]:
        flush()
    return files


def pack(src: str | os.PathLike, out: str | os.PathLike, format: str = "wds", shard_size: int | str = "1GB",
         progress: bool = True) -> PackResult:
    """Convert the class-folder tree ``src`` into WebDataset shards (``format="wds"``) or parquet files
    of at most ``shard_size`` each (one image more than fits starts the next), written to the new folder
    ``out`` atomically. Unusable images are skipped and reported. Returns a ``PackResult``."""
    if format not in FORMATS:
        raise ValueError(f"Unknown pack format {format!r}; choose from {', '.join(FORMATS)}.")
    limit, src, out = parse_size(shard_size), Path(src), Path(out)
    if detect(src) != "folder":
        raise ValueError(f"{display_name(src)} is not a class-folder tree; pack reads SRC/<class>/<images> "
                         f"(or SRC/train|val|test/<class>/<images>).")
    if out.exists():
        raise FileExistsError(f"{display_name(out)} already exists; choose a new output folder or remove it.")
    scans = _split_scans(src)
    skipped = [item for scan in scans.values() for item in scan.skipped]
    report_skipped(skipped)
    if not any(scan.samples for scan in scans.values()):
        raise ValueError(f"No usable images in {display_name(src)}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent, out.name)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        classes = next(iter(scans.values())).classes
        (tmp / "classes.txt").write_text("".join(f"{name}\n" for name in classes), encoding="utf-8")
        write = _write_wds if format == "wds" else _write_parquet
        files: list[str] = []
        with tqdm(total=sum(len(s.samples) for s in scans.values()), unit="img", desc=f"pack {format}",
                  disable=not progress) as bar:
            for prefix, scan in scans.items():
                files += write(scan, tmp, prefix, limit, bar)
        counts = {prefix: len(scan.samples) for prefix, scan in scans.items()}
        manifest = {"format": format, "classes": len(classes), "counts": counts, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PackResult(out, format, counts, files, skipped)


def verify_pack(out: str | os.PathLike) -> list[str]:
    """Read a pack back: every split's count against ``pack.json``, every image decoded (as training would),
    and for shards the samples ``webdataset.WebDataset`` streams. Returns the problems found (none: [])."""
    out = Path(out)
    if not (out / MANIFEST).is_file():
        raise FileNotFoundError(f"{display_name(out)} has no {MANIFEST}; give a folder written by vggkit pack.")
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    kind, splits = source_splits(out)
    problems: list[str] = []
    classes = read_classes(out / "classes.txt")
    if len(classes) != manifest["classes"]:
        problems.append(f"classes.txt lists {len(classes)} classes, {MANIFEST} says {manifest['classes']}")
    for prefix, expected in manifest["counts"].items():
        split = SPLIT_NAMES.get(prefix, "all")
        if split not in splits:
            problems.append(f"split {prefix}: no files")
            continue
        scan = scan_split(kind, splits[split], verify=True)
        problems += [f"{display_name(name)}: {reason}" for name, reason in scan.skipped]
        if len(scan.samples) != expected:
            problems.append(f"split {prefix}: {len(scan.samples)} readable images, {MANIFEST} says {expected}")
        if kind == "webdataset":
            try:
                streamed = _streamed_count(splits[split])
            except (OSError, ValueError, tarfile.TarError) as error:
                problems.append(f"split {prefix}: webdataset cannot stream the shards ({error})")
                continue
            if streamed != expected:
                problems.append(f"split {prefix}: webdataset streams {streamed} samples, {MANIFEST} says {expected}")
    return problems


def _streamed_count(shards: list[str]) -> int:
    """Samples with an image and a label as ``webdataset.WebDataset`` reads them (another reader's view)."""
    import webdataset as wds

    dataset = wds.WebDataset(shards, shardshuffle=False, empty_check=False)
    return sum(1 for sample in dataset if "cls" in sample and any(e in sample for e in KEPT_AS_IS.values()))
