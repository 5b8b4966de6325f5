"""Folders of images: class folders scanned once (links and loops counted once, unreadable files skipped
and reported), the train/val/test layout, and the stratified split when there is no val/ folder.
"""

from __future__ import annotations

import os
import random
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from ..utils.paths import display_name
from .images import (
    EMPTY_FILE,
    ImageError,
    check_header,
    check_rescaled,
    describe_non_file,
    is_image_file,
    load_image,
)

SPLITS = ("train", "val", "test")


SCREEN_SAMPLE = 64  # headers read before training from a scan without verify; a bad one has every header read


SKIPPED_NAMED = 10  # files a skip warning names; the rest are counted


RUNTIME_WARNINGS = 5  # unreadable files a dataset names one warning each, per process, before it only counts


@dataclass
class FolderScan:
    """The result of scanning a class-folder tree: classes, (path, label) samples and what was skipped."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts = {c: 0 for c in self.classes}
        for _, label in self.samples:
            counts[self.classes[label]] += 1
        return counts

    def empty_classes(self) -> list[str]:
        """The classes no sample was kept for."""
        return [name for name, count in self.counts().items() if count == 0]


class SeenFiles:
    """Files and folders already counted, by identity (device, inode): a symbolic link to one already
    seen, a hard link to it, or a folder loop is recognised, so every file counts once.

    Share one between the scans of a run's splits to keep them disjoint.
    """

    def __init__(self) -> None:
        self.first: dict[tuple[int, int], str] = {}

    def claim(self, path: str, status: os.stat_result) -> str | None:
        """None the first time a file or folder is seen; afterwards the path it was first seen under."""
        key = (status.st_dev, status.st_ino)
        if key in self.first:
            return self.first[key]
        self.first[key] = path
        return None


def list_folder(folder: str | os.PathLike) -> list[os.DirEntry]:
    """``folder``'s entries; a folder that cannot be read is one ``OSError`` naming it (not a missing
    sub-folder later: with chmod 000 on data/, data/train/ only *looks* absent)."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except PermissionError:
        raise PermissionError(f"Cannot read the folder {display_name(folder)}: permission denied; make it "
                              f"readable (chmod u+rx {display_name(folder)}).") from None
    except OSError as error:
        raise OSError(f"Cannot read the folder {display_name(folder)}: {error.strerror or error}.") from None


def class_folders(root: str | os.PathLike) -> list[str]:
    """The sorted names of ``root``'s visible sub-folders (links to folders included); nothing is walked."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Data folder not found: {root}. Expected one sub-folder per class.")
    return sorted(e.name for e in list_folder(root) if not e.name.startswith(".") and _is_folder(e))


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def scan_folder(root: str | os.PathLike, classes: list[str] | None = None, verify: bool = False,
                seen: SeenFiles | None = None) -> FolderScan:
    """Scan ``root/<class>/**/<image>``: class names sorted, files sorted, hidden and non-image files skipped.

    Links are followed, but every file and folder counts once, by identity: a link or hard link
    to one already seen (in this scan or, with a shared ``seen``, another split's) and folder
    loops are skipped and listed in ``skipped``, as are FIFOs, devices and broken links named
    like images. ``verify=True`` decodes every image once and skips the unreadable ones and those
    too extreme to rescale to 224 px within the pixel limit.
    Raises a clear ``ValueError`` when ``root`` is missing or holds no class folders.
    """
    root = Path(root)
    found = class_folders(root)
    if not found:
        raise ValueError(f"{root} holds no class folders. Expected {root}/<class_name>/<image files>.")
    classes = list(classes) if classes is not None else found
    seen = SeenFiles() if seen is None else seen
    seen.claim(str(root), os.stat(root))  # a link back to the root is a loop, not more data
    samples: list[tuple[str, int]] = []
    skipped: list[tuple[str, str]] = []
    # Every class folder is claimed before any is walked: a link inside one class to another class's
    # folder is then skipped there, not counted as the first class.
    walked = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        first = seen.claim(str(folder), os.stat(folder))
        if first:
            skipped.append((str(folder), f"the same folder as {first} (a link); its files are counted once"))
        else:
            walked.append((label, folder))
    for label, folder in walked:
        for path in image_files(str(folder), seen, skipped):
            if verify:
                try:
                    image = load_image(path)
                    check_rescaled(image.width, image.height, 224, path)  # the smallest scale vggkit uses
                except ImageError as error:
                    skipped.append((path, error.reason))
                    continue
            samples.append((path, label))
    if not verify:
        samples = screen_headers(samples, skipped)
    return FolderScan(root, classes, samples, skipped)


def screen_headers(samples: list[tuple[str, int]], skipped: list[tuple[str, str]]) -> list[tuple[str, int]]:
    """``samples`` less the files whose header does not open as an image (``check_header``), which go to
    ``skipped``. SCREEN_SAMPLE files spread over the list are read first, and only a bad one among them
    has every header read: a clean data set pays 64 small reads; a flood of bad files pays one header
    read each, once, instead of a failed decode and a warning per file in every epoch."""
    stride = max(1, len(samples) // SCREEN_SAMPLE)
    if all(check_header(path) is None for path, _ in samples[::stride][:SCREEN_SAMPLE]):
        return samples
    kept = []
    for path, label in samples:
        reason = check_header(path)
        if reason:
            skipped.append((path, reason))
        else:
            kept.append((path, label))
    return kept


def image_files(folder: str | os.PathLike, seen: SeenFiles, skipped: list[tuple[str, str]]) -> list[str]:
    """Regular image files under ``folder`` counted once each, in ``os.walk``'s top-down sorted order;
    everything left out goes to ``skipped`` with its reason (hidden files and folders silently)."""
    files: list[str] = []
    pending = [str(folder)]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as listing:
                entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as error:
            skipped.append((current, f"cannot list the folder ({error.strerror or error})"))
            continue
        subfolders = []
        for entry in entries:
            try:
                status = os.stat(entry.path)  # follows links
            except OSError:
                reason = describe_non_file(entry.path) if is_image_file(entry.path) else "not an image file"
                skipped.append((entry.path, reason))
                continue
            if stat.S_ISDIR(status.st_mode):
                first = seen.claim(entry.path, status)
                if first:
                    skipped.append((entry.path, f"the same folder as {first} (a link or a loop); "
                                                f"its files are counted once"))
                else:
                    subfolders.append(entry.path)
            elif not is_image_file(entry.path):
                skipped.append((entry.path, "not an image file (by extension)"))
            elif not stat.S_ISREG(status.st_mode):
                skipped.append((entry.path, describe_non_file(entry.path) or "not a regular file"))
            elif status.st_size == 0:  # known from the stat: never opened (20,000 of them cost no decode)
                skipped.append((entry.path, EMPTY_FILE))
            else:
                first = seen.claim(entry.path, status)
                if first:
                    skipped.append((entry.path, f"the same file as {first} (a link or hard link); counted once"))
                else:
                    files.append(entry.path)
        pending += reversed(subfolders)
    return files


def report_skipped(skipped: list[tuple[str, str]], limit: int = SKIPPED_NAMED) -> None:
    """One warning for every skipped file: the first ``limit`` named with why (escaped: a newline in a
    name stays on its line), then "... and N more", so 20,000 bad files are a dozen lines, not 20,000."""
    if not skipped:
        return
    lines = [f"  {display_name(path)}: {display_name(reason)}" for path, reason in skipped[:limit]]
    more = f"\n  ... and {len(skipped) - limit:,} more" if len(skipped) > limit else ""
    warnings.warn(f"Skipped {len(skipped):,} file(s) (unusable, or already counted):\n" + "\n".join(lines) + more,
                  stacklevel=2)


def find_splits(data_dir: str | os.PathLike) -> dict[str, Path]:
    """``{"train": ..., "val": ..., "test": ...}`` for the split folders present in ``data_dir`` (may be empty);
    a ``data_dir`` that cannot be read is an error naming it."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"Data folder not found: {data_dir}")
    present = {e.name for e in list_folder(data_dir) if e.name in SPLITS and _is_folder(e)}
    return {s: data_dir / s for s in SPLITS if s in present}


class ImageListDataset(Dataset):
    """(path, label) samples -> (transform(image), label).

    A file that fails to decode during training is reported once and replaced by
    the next readable sample, so one bad file never stops an epoch.
    """

    def __init__(self, samples: list[tuple[str, int]], transform=None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.failed: dict[str, str] = {}  # in this process: each loader worker holds its own copy

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            if path in self.failed:
                continue
            try:  # the transform too: its rescale may refuse an extreme aspect ratio
                image = load_image(path)
                return (self.transform(image) if self.transform else image), label
            except ImageError as error:
                self.failed[path] = error.reason
                self._warn(path, error.reason)
        raise RuntimeError("No readable image left in the dataset.")

    def _warn(self, path: str, reason: str) -> None:
        """The first RUNTIME_WARNINGS unreadable files one warning each, then one that says the rest are
        skipped quietly: a flood of bad files is a few lines per process, not one per file."""
        count = len(self.failed)
        if count <= RUNTIME_WARNINGS:
            warnings.warn(f"Skipping unreadable image {display_name(path)}: {reason}", stacklevel=3)
        if count == RUNTIME_WARNINGS:
            warnings.warn(f"{count} unreadable images in this loader process; further ones are skipped without a "
                          f"warning. data.verify=true (verify_images for finetune) decodes every file before "
                          f"training and lists them all in one warning.", stacklevel=3)


#: (a split's folder, train's scan, class folders only in the split, classes only in train) -> what
#: is wrong with the split's class folders, or None when they are acceptable.
ClassMismatch = Callable[[Path, FolderScan, list[str], list[str]], str | None]


def scan_splits(data_dir: str | os.PathLike, splits: dict[str, Path], verify: bool, mismatch: ClassMismatch,
                num_classes: int | None = None) -> dict[str, FolderScan]:
    """Scan ``splits["train"]`` (``data_dir`` itself without one) first, then every other split in
    ``splits`` with train's classes, in order: ``{"train": scan, "val": scan, ...}``.

    One ``SeenFiles`` is shared, so a file linked into two splits is used in the first only (a
    validation file linked from train/ is not validated on). A ``num_classes`` that train's folders
    disagree with, or a split whose folders ``mismatch`` refuses, is a ``ValueError`` raised before
    the next (slow, with ``verify``) scan.
    """
    seen = SeenFiles()
    train = scan_folder(splits.get("train", data_dir), verify=verify, seen=seen)
    if num_classes is not None and num_classes != len(train.classes):
        raise ValueError(f"num_classes={num_classes}, but {train.root} holds {len(train.classes)} class folder(s): "
                         f"{', '.join(train.classes)}. Pass num_classes={len(train.classes)} or fix the folders.")
    scans = {"train": train}
    for split, root in splits.items():
        if split == "train":
            continue
        found = class_folders(root)
        error = mismatch(root, train, sorted(set(found) - set(train.classes)), sorted(set(train.classes) - set(found)))
        if error:
            raise ValueError(error)
        scans[split] = scan_folder(root, classes=train.classes, verify=verify, seen=seen)
    return scans


def scan_imagenet(data_dir: str | os.PathLike, verify: bool = False) -> tuple[FolderScan, FolderScan]:
    """Scan ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*``; val must hold the same classes."""
    splits = find_splits(data_dir)
    for split in ("train", "val"):
        if split not in splits:
            raise FileNotFoundError(f"{Path(data_dir) / split} not found. Expected the ImageFolder layout "
                                    f"{data_dir}/train/<wnid>/*.JPEG and {data_dir}/val/<wnid>/*.JPEG.")
    scans = scan_splits(data_dir, {"train": splits["train"], "val": splits["val"]}, verify, _same_classes)
    train_scan, val_scan = scans["train"], scans["val"]
    report_skipped(train_scan.skipped + val_scan.skipped)
    for scan in (train_scan, val_scan):
        if not scan.samples:
            raise ValueError(f"{scan.root} holds no usable images.")
    empty = train_scan.empty_classes()
    if empty:  # a class never seen in training would still get an output unit, trained only to lose
        raise ValueError(f"Class folder(s) {empty[:10]} in {train_scan.root} hold no usable image; add images "
                         f"or remove the folder(s) ({len(empty)} of {len(train_scan.classes)} classes).")
    return train_scan, val_scan


def _same_classes(val: Path, train: FolderScan, only_val: list[str], only_train: list[str]) -> str | None:
    """ImageNet's val/ must hold exactly train's classes: the labels are the folder names."""
    if not (only_val or only_train):
        return None
    return (f"{val} and {train.root} must hold the same class folders: "
            f"only in val: {only_val[:10] or 'none'}, only in train: {only_train[:10] or 'none'}. "
            f"Sort the validation images into one folder per class (wnid), as train/ is.")


Samples = list[tuple[str, int]]


@dataclass
class DataSplits:
    """Class names and the (path, label) samples of each split; what was skipped and why."""

    classes: list[str]
    train: Samples
    val: Samples
    test: Samples = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def stratified_split(samples: Samples, num_classes: int, val_fraction: float, seed: int) -> tuple[Samples, Samples]:
    """Split per class with a fixed seed; every class with two or more images gets at least one val image."""
    rng = random.Random(seed)
    train: Samples = []
    val: Samples = []
    for label in range(num_classes):
        members = [s for s in samples if s[1] == label]
        rng.shuffle(members)
        n_val = min(max(1, round(len(members) * val_fraction)), len(members) - 1) if len(members) >= 2 else 0
        val += members[:n_val]
        train += members[n_val:]
    return sorted(train), sorted(val)


def prepare_splits(data_dir: str | os.PathLike, num_classes: int | None = None, val_fraction: float = 0.2,
                   seed: int = 0, verify: bool = True) -> DataSplits:
    """Scan ``data_dir`` (``train/``, ``val/``, ``test/`` of class folders, or class folders directly).

    Without a ``val/`` folder the training images are split per class (``val_fraction``,
    ``seed``). Raises ``ValueError`` before any training when ``num_classes`` disagrees
    with the folders, or a class has no usable image.
    """
    scans = scan_splits(data_dir, find_splits(data_dir), verify, _known_classes, num_classes)
    train_scan = scans["train"]
    classes = train_scan.classes
    skipped = [item for scan in scans.values() for item in scan.skipped]
    _check_classes(train_scan, skipped)
    if "val" in scans:
        train, val = train_scan.samples, scans["val"].samples
    else:
        train, val = stratified_split(train_scan.samples, len(classes), val_fraction, seed)
        single = [name for name, count in train_scan.counts().items() if count == 1]
        if single:
            warnings.warn(f"Class(es) {single} have a single image: it is used for training only, so validation "
                          f"says nothing about them. Add images or a val/ folder.", stacklevel=3)
    if not val:
        raise ValueError(f"No validation images in {data_dir}: give each class at least two images, "
                         f"or add a val/ folder of class folders.")
    test = scans["test"].samples if "test" in scans else []
    return DataSplits(classes, train, val, test, skipped)


def _known_classes(split: Path, train: FolderScan, only_split: list[str], only_train: list[str]) -> str | None:
    """val/ and test/ may lack some of train's classes, but not have others: their labels would be unknown."""
    if not only_split:
        return None
    return (f"{split} has class folder(s) {only_split} that {train.root} lacks; "
            f"the training classes are: {', '.join(train.classes)}.")


def _check_classes(scan: FolderScan, skipped: list[tuple[str, str]]) -> None:
    empty = scan.empty_classes()
    if not empty:
        return
    if len(empty) == len(scan.classes):
        raise ValueError(f"No usable images in {scan.root} (class folders: {', '.join(scan.classes)}). "
                         f"Expected {scan.root}/<class>/<image files>.")
    why = "".join(f"\n  {path}: {reason}" for path, reason in skipped[:10])
    raise ValueError(f"Class folder(s) {empty} in {scan.root} hold no usable image; add images or remove the "
                     f"folder(s).{' Skipped:' + why if why else ''}")
