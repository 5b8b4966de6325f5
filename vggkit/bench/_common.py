"""The bench's shared parts: a result row, the race of competitors timed in turns, the matmul peaks
that every figure is a fraction of, FLOP counts, output agreement and fresh-process probes.
"""

from __future__ import annotations

import json
import multiprocessing
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from queue import Empty

import torch
from torch.utils.flop_counter import FlopCounterMode


MODEL = "vgg16"


TAPS = ("conv3_3", "conv4_3", "conv5_3")


RSS_BATCH = 32


@dataclass
class Row:
    """One measurement: ``images_per_s`` of ``how`` on ``task``, against the task's reference row."""

    task: str
    how: str
    images_per_s: float
    gflop_per_image: float | None
    dtype: str = "fp32"
    batch: int | None = None
    reference: bool = False
    ratio: float | None = None
    peak_fraction: float | None = None
    note: str = ""


@dataclass
class Settings:
    """How much work each section does; ``quick`` trades precision for a short run."""

    rounds: int = 3
    batch: int = 8
    crops_measured: int = 10
    finetune_images: int = 8
    pipeline_images: int = 48
    slow_rows: bool = True  # forced bf16 and torch.compile, both slow to run here

    @classmethod
    def quick(cls) -> "Settings":
        return cls(rounds=1, batch=4, crops_measured=4, finetune_images=4, pipeline_images=16, slow_rows=False)


@dataclass
class BenchResult:
    machine: dict
    peaks_gflops: dict
    rows: list[Row]
    extraction_peak_rss_mib: dict = field(default_factory=dict)
    seconds: float = 0.0
    peak_basis: str | None = None  # every row's fraction is of this dtype's peak (the GPU bench: bf16)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "rows": [asdict(r) for r in self.rows]}, indent=2)

    def markdown(self) -> str:
        m, p = self.machine, self.peaks_gflops
        host = (f"{m['cpu']} ({m['cores']} cores, {m['threads']} torch threads, load average "
                f"{m['load_average']} at start), torch {m['torch']}")
        if "device" in m:  # the device bench: the GPU first, the host after it
            host = f"{m['device']}, CUDA {m['cuda']}; host {host}"
        lines = [f"vggkit bench, {m['date']}: {host}; vggkit default: {m['runtime']} ({m['runtime_reason']}).",
                 f"Matmul peak measured in this run: {p['fp32']:.1f} GFLOP/s float32, {p['bf16']:.2f} GFLOP/s "
                 f"bfloat16. {MODEL} is {self.rows[0].gflop_per_image:.1f} GFLOP per 224 image.", "",
                 f"| task | how | batch | images/s | vs reference | % of {self.peak_basis or 'its dtype'}'s peak "
                 f"| note |",
                 "|---|---|---:|---:|---:|---:|---|"]
        for r in self.rows:
            ratio = "reference" if r.reference else (f"{r.ratio:.2f}x" if r.ratio is not None else "")
            peak = "" if r.peak_fraction is None else f"{100 * r.peak_fraction:.0f}% ({r.dtype})"
            lines.append(f"| {r.task} | {r.how} | {r.batch or ''} | {_rate(r.images_per_s)} | {ratio} | "
                         f"{peak} | {r.note} |")
        rss = self.extraction_peak_rss_mib
        if rss:
            lines += ["", f"Peak RSS of {MODEL} extraction at {', '.join(TAPS)}, batch {RSS_BATCH} of 224 px, "
                          f"in a fresh process: {rss['imported']:.0f} MiB with torch and vggkit imported, "
                          f"{rss['model_loaded']:.0f} MiB with the model loaded, "
                          f"{rss['after_extraction']:.0f} MiB after extraction "
                          f"(input {rss['input']:.0f} MiB, outputs {rss['outputs']:.0f} MiB)."]
        lines += ["", f"Whole bench: {self.seconds:.0f} s."]
        return "\n".join(lines)


def _rate(value: float) -> str:
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def race(competitors: dict[str, Callable[[], object]], rounds: int,
         sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Best wall-clock seconds of each callable over ``rounds`` interleaved rounds, after one warm-up call each.

    ``sync`` waits for queued device work (``torch.cuda.synchronize`` on a GPU), so a
    timing holds the work it launched and none of the work before it.
    """
    for run in competitors.values():
        run()
    sync()
    best = dict.fromkeys(competitors, float("inf"))
    for _ in range(rounds):
        for name, run in competitors.items():
            start = time.perf_counter()
            run()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


# Relative L2 error a precision's own rounding gives VGG's maps and logits: float32 paths
# differ from torchvision only in summation order; bf16 keeps 8 bits of mantissa, and
# 13-16 layers of it give about 1% (measured 0.7-0.9% on AVX-512-bf16 CPUs).
AGREEMENT_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}


def agreement(ours: list[torch.Tensor], theirs: list[torch.Tensor], precision: str) -> str:
    """A note comparing outputs at the tolerance of the precision they ran in (relative L2 error, worst map)."""
    error = max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
                for a, b in zip(ours, theirs))
    tolerance = AGREEMENT_TOLERANCE[precision]
    verdict = "same as torchvision" if error <= tolerance else "DIFFERS from torchvision"
    return f"{verdict} within {precision} (relative error {error:.1e}, tolerance {tolerance:.0e})"


def matmul_peak(dtype: torch.dtype, seconds: float = 0.02, rounds: int = 12) -> float:
    """Best GFLOP/s of a square-ish matmul in ``dtype``, sized so one takes about ``seconds``.

    Three kernels compete: ``a @ b`` and ``a @ b.T`` (BLAS) and a 1x1 convolution on
    channels_last input (the same GEMM through oneDNN, the library VGG's convs use).
    Many short calls rather than a few long ones: on a shared machine the best of
    them is the one that ran alone.
    """
    from ..runtime.fusion import PackedConv2d

    size = 128
    while size < 1024:
        a = torch.randn(size, size, dtype=dtype)
        a @ a  # the first call of a size sets up threads and kernels
        start = time.perf_counter()
        a @ a
        if time.perf_counter() - start > seconds / 8:
            break
        size *= 2
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    side = int(size ** 0.5)
    image = torch.randn(1, size, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
    conv = PackedConv2d(torch.nn.Conv2d(size, size, 1, bias=False, dtype=dtype), relu=False).eval()
    conv.requires_grad_(False)
    with torch.inference_mode():
        timings = race({"nn": lambda: a @ b, "nt": lambda: a @ b.T, "conv1x1": lambda: conv(image)}, rounds)
    flops = {"nn": 2 * size ** 3, "nt": 2 * size ** 3, "conv1x1": 2 * size * size * side * side}
    return max(flops[kernel] / timings[kernel] for kernel in flops) / 1e9


class MatmulPeaks:
    """The machine's float32 and bfloat16 matmul peaks in GFLOP/s: the best of several measurements,
    taken between the bench's sections so that one busy moment does not set them."""

    def __init__(self) -> None:
        self.gflops = {"fp32": 0.0, "bf16": 0.0}

    def measure(self) -> dict[str, float]:
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            self.gflops[precision] = max(self.gflops[precision], matmul_peak(dtype))
        return self.gflops


def gflops(build: Callable[[], torch.nn.Module], shape: tuple[int, ...]) -> float:
    """GFLOP of one forward of the module ``build()`` makes, counted on the meta device (no compute)."""
    with torch.device("meta"):
        module = build()
        with FlopCounterMode(display=False) as counter:
            module(torch.empty(shape))
    return counter.get_total_flops() / 1e9 / shape[0]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _finish(rows: list[Row], peaks: dict[str, float], basis: str | None = None) -> list[Row]:
    """Fill in each row's ratio to its task's reference and its fraction of the matmul peak:
    of its own dtype's peak, or of ``peaks[basis]`` for every row where ``basis`` is given."""
    references = {r.task: r.images_per_s for r in rows if r.reference}
    for r in rows:
        if r.task in references and not r.reference:
            r.ratio = r.images_per_s / references[r.task]
        if r.gflop_per_image is not None:
            r.peak_fraction = r.images_per_s * r.gflop_per_image / peaks[basis or r.dtype]
    return rows


def run_probe(target: Callable, args: tuple, what: str):
    """Run ``target(*args, queue)`` in a fresh (spawned) process and return what it puts on the queue.

    A probe that dies before reporting is one clear error naming ``what``, not a wait forever.
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    try:
        while True:
            try:
                return queue.get(timeout=5)
            except Empty:
                if not process.is_alive():
                    raise RuntimeError(f"The {what} (a child process) died with exit code "
                                       f"{process.exitcode} before reporting; run `vggkit bench` again.") from None
    finally:
        process.join(timeout=60)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work; a no-op on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def device_matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 8192,
                       rounds: int = 10) -> float:
    """Best GFLOP/s of a ``size`` x ``size`` matmul in ``dtype`` on ``device`` (the CPU bench's own probe on a CPU)."""
    if device.type != "cuda":
        return matmul_peak(dtype)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = race({"matmul": lambda: a @ b}, rounds, synchronizer(device))["matmul"]
    return 2 * size ** 3 / seconds / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB, {props.multi_processor_count} SMs)"
    return cpu_name()
