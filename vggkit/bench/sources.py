"""Bench row (l): images/s reading and decoding a class folder, WebDataset shards and parquet, same workers.

The same JPEGs (500x375, ImageNet's typical size) are packed by ``vggkit.data.pack``; every reader
decodes each image with ``load_image`` in DataLoader workers, so the rows differ only in how the bytes
are found and read: a file per image, a tar member by offset (``data.sources``), a whole shard
streamed by ``webdataset.WebDataset``, a parquet row through ``datasets``.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ._common import Row, Settings

WORKERS = 2


class _Decoded(Dataset):
    """(sample, label) -> the decoded image's size (so the loader moves no pixels back)."""

    def __init__(self, samples: list) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, int]:
        from ..data.images import load_image

        return load_image(self.samples[index][0]).size


class _Streamed(IterableDataset):
    """``webdataset.WebDataset`` over ``shards`` (it gives each loader worker its own shards), each image decoded
    by ``load_image``."""

    def __init__(self, shards: list[str]) -> None:
        self.shards = shards

    def __iter__(self):
        import webdataset as wds

        from ..data.images import load_image

        for sample in wds.WebDataset(self.shards, shardshuffle=False, empty_check=False):
            yield load_image(Image.open(io.BytesIO(sample["jpg"]))).size


def images_per_second(dataset: Dataset, count: int, workers: int = WORKERS) -> float:
    """Decoded images/s of ``dataset`` read once through a DataLoader with ``workers`` processes."""
    loader = DataLoader(dataset, batch_size=8, num_workers=workers, collate_fn=list)
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch)
    assert seen == count, (seen, count)
    return seen / (time.perf_counter() - start)


PHOTOS = ("chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg")  # the examples the package ships


def write_photos(folder: Path, count: int) -> Path:
    """``count`` 500x375 JPEGs of the bundled example photographs in two class folders."""
    package = Path(__file__).resolve().parents[1]
    found = [next((f / name for f in (package / "_app" / "assets" / "examples", package.parent / "assets" /
                                      "examples") if (f / name).is_file()), None) for name in PHOTOS]
    if None in found:
        raise FileNotFoundError(f"The example photographs {', '.join(PHOTOS)} are not in this installation.")
    sources = [Image.open(path).convert("RGB") for path in found]
    for i in range(count):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        sources[i % 4].resize((500, 375)).save(folder / f"c{i % 2}" / f"photo{i:05d}.jpg", quality=90)
    return folder


def data_sources(settings: Settings, log) -> list[Row]:
    """Rows: the class folder (reference), shards by offset, shards streamed, parquet rows; images/s."""
    import importlib.util

    from ..data.pack import pack
    from ..data.sources import open_scan

    missing = [name for name in ("webdataset", "datasets") if importlib.util.find_spec(name) is None]
    if missing:
        log(f"(l) skipped: {' and '.join(missing)} not installed (pip install 'vggkit[scale]')")
        return []
    count = 4 * settings.pipeline_images
    log(f"(l) reading {count} JPEGs from a class folder, shards and parquet, {WORKERS} workers each")
    with tempfile.TemporaryDirectory(prefix="vggkit-bench-") as folder:
        tree = write_photos(Path(folder) / "val", count)
        pack(tree, Path(folder) / "wds", "wds", shard_size="2MB", progress=False)
        pack(tree, Path(folder) / "parquet", "parquet", shard_size="2MB", progress=False)
        shards = sorted(str(p) for p in (Path(folder) / "wds").glob("*.tar"))
        readers = {"class folder, a file per image (reference)": _Decoded(open_scan(tree).samples),
                   "WebDataset shards, members read by offset (vggkit.data.sources)":
                       _Decoded(open_scan(Path(folder) / "wds").samples),
                   "WebDataset shards streamed by webdataset.WebDataset": _Streamed(shards),
                   "parquet rows through datasets (vggkit.data.sources)":
                       _Decoded(open_scan(Path(folder) / "parquet").samples)}
        for dataset in readers.values():  # warm the page cache and the workers' imports alike
            images_per_second(dataset, count)
        rates = {how: max(images_per_second(dataset, count) for _ in range(max(1, settings.rounds)))
                 for how, dataset in readers.items()}
    task = f"(l) reading data, {WORKERS} workers"
    return [Row(task, how, rate, None, batch=None, reference=i == 0, note=f"{count} 500x375 JPEGs, load_image decode")
            for i, (how, rate) in enumerate(rates.items())]
