"""``vggkit bench --device cuda``: vggkit's GPU paths against plain PyTorch and torchvision, one GPU, one run.

Rows (the CPU bench's letters where the task is the same):

* (a) inference at batch 256: torchvision's default (float32 NCHW), torchvision with
  bf16 autocast + channels_last (eager and compiled), ``vggkit.optimize`` (default and compiled);
* (f) training step, (g) end-to-end ``vggkit train``, (h) input pipelines (``vggkit.bench.training``);
* (i) evaluation protocols against torchvision's reference loop (``vggkit.bench.evaluation``).

Every figure is steady state (after warm-up and compilation), timed with the
device synchronised, as the best of interleaved rounds. Each row's fraction is of
the bf16 matmul peak measured in the same run: the most the GPU does.

The same functions run on the CPU at toy sizes (``DeviceSettings.tiny``), so the
tests exercise every row without a GPU.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._common import (
    MODEL,
    BenchResult,
    Row,
    _finish,
    agreement,
    cpu_name,
    device_matmul_peak,
    device_name,
    gflops,
    race,
    synchronizer,
)


@dataclass
class DeviceSettings:
    """Sizes of the device bench; ``tiny`` runs every row on a CPU in seconds (for the tests)."""

    batch: int = 256
    image_size: int = 224
    rounds: int = 5
    compile: bool = True
    train_steps: int = 20
    train_images: int = 2048
    eval_images: int = 512

    @classmethod
    def quick(cls) -> "DeviceSettings":
        return cls(batch=128, rounds=3, compile=False, train_steps=10, train_images=512, eval_images=128)

    @classmethod
    def tiny(cls) -> "DeviceSettings":
        return cls(batch=2, image_size=32, rounds=1, compile=False, train_steps=2, train_images=8, eval_images=2)


def _torchvision_vgg(vgg, device: torch.device) -> torch.nn.Module:
    """torchvision's vgg16 holding ``vgg``'s weights, on ``device``."""
    import torchvision

    from ..weights.layouts import export_state_dict

    reference = torchvision.models.vgg16()
    reference.load_state_dict(export_state_dict(vgg, "torchvision"))
    return reference.eval().to(device)


def inference_rows(vgg, settings: DeviceSettings, device: torch.device, log) -> list[Row]:
    """(a) Forward passes of a batch already on the device: torchvision's ways against ``vggkit.optimize``."""
    from ..models.vgg import VGG
    from ..runtime.engine import optimize

    sync = synchronizer(device)
    n, side = settings.batch, settings.image_size
    flop = gflops(lambda: VGG(MODEL), (1, 3, side, side))
    x = torch.randn(n, 3, side, side, device=device)
    x_last = x.contiguous(memory_format=torch.channels_last)
    reference = _torchvision_vgg(vgg, device)
    reference_last = _torchvision_vgg(vgg, device).to(memory_format=torch.channels_last)
    fast = optimize(vgg, device=device)
    autocast_dtype = fast.runtime.dtype if fast.runtime.dtype != torch.float32 else torch.bfloat16

    def plain(module, inputs, autocast: bool):
        def run():
            with torch.inference_mode(), torch.autocast(device.type, autocast_dtype, enabled=autocast):
                return module(inputs)
        return run

    competitors = {"torchvision": plain(reference, x, False),
                   "torchvision_autocast": plain(reference_last, x_last, True),
                   "vggkit": lambda: fast(x)}
    with torch.inference_mode():
        exact = reference(x)
    note = f"logits {agreement([fast(x)], [exact], fast.runtime.precision)}"
    compile_notes = {}
    if settings.compile:
        log("(a) compiling torchvision + autocast + channels_last, and vggkit.optimize(compile=True)")
        compiled_reference = torch.compile(reference_last)
        compiled_fast = optimize(vgg, device=device, compile=True)
        for name, run in (("torchvision_compiled", plain(compiled_reference, x_last, True)),
                          ("vggkit_compiled", lambda: compiled_fast(x))):
            start = time.perf_counter()
            run()
            sync()
            compile_notes[name] = f"first call (compile) {time.perf_counter() - start:.0f} s"
            competitors[name] = run
    log(f"(a) inference, batch {n} of {side} px on {device.type}")
    best = race(competitors, settings.rounds, sync)
    task = f"(a) {MODEL} inference, data on the {device.type}"
    autocast_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]
    rows = [Row(task, "torchvision default (float32 NCHW)", n / best["torchvision"], flop, "fp32", n,
                reference=True),
            Row(task, f"torchvision + {autocast_name} autocast + channels_last", n / best["torchvision_autocast"],
                flop, autocast_name, n),
            Row(task, f"vggkit.optimize default ({fast.runtime.describe()})", n / best["vggkit"], flop,
                fast.runtime.precision, n, note=note)]
    if settings.compile:
        rows += [Row(task, f"torchvision + {autocast_name} autocast + channels_last + torch.compile",
                     n / best["torchvision_compiled"], flop, autocast_name, n,
                     note=compile_notes["torchvision_compiled"]),
                 Row(task, f"vggkit.optimize(compile=True) ({compiled_fast.runtime.describe()})",
                     n / best["vggkit_compiled"], flop, compiled_fast.runtime.precision, n,
                     note=compile_notes["vggkit_compiled"])]
    return rows


def device_sections() -> list[Callable]:
    """The sections after (a), each ``section(settings, device, log, peaks) -> list[Row]``."""
    from .evaluation import eval_rows
    from .training import train_rows

    return [lambda settings, device, log, peaks: train_rows(settings, device, log, peaks),
            lambda settings, device, log, peaks: eval_rows(settings, device, log)]


def run_device_bench(device: str | torch.device = "cuda", quick: bool = False,
                     log: Callable[[str], None] | None = None,
                     settings: DeviceSettings | None = None) -> BenchResult:
    """Every device row in this process. Fractions are of the bf16 matmul peak measured in this run."""
    from ..runtime.engine import choose_runtime
    from ..weights.factory import create_model

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no CUDA GPU that PyTorch can use "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
                         "run `vggkit bench` for the CPU bench.")
    log = log or (lambda message: print(f"bench: {message}", flush=True))
    settings = settings or (DeviceSettings.quick() if quick else DeviceSettings())
    start = time.perf_counter()
    if device.type == "cuda":
        # The GPU rows measure what a well-configured user loop gets; cuDNN picks its
        # fastest kernels for each fixed shape (also what vggkit's training sets).
        torch.backends.cudnn.benchmark = True
    runtime = choose_runtime("auto", device=device)
    machine = {"date": datetime.date.today().isoformat(), "device": device_name(device), "cpu": cpu_name(),
               "cores": os.cpu_count(), "threads": torch.get_num_threads(), "load_average":
               f"{os.getloadavg()[0]:.1f}", "torch": torch.__version__, "cuda": torch.version.cuda or "",
               "runtime": runtime.describe(), "runtime_reason": runtime.reason, "quick": quick}
    log("bf16 and float32 matmul peaks")
    peaks = {"bf16": device_matmul_peak(device, torch.bfloat16), "fp32": device_matmul_peak(device, torch.float32)}
    torch.manual_seed(0)
    vgg = create_model(MODEL).eval()
    rows = inference_rows(vgg, settings, device, log)
    for section in device_sections():
        rows += section(settings, device, log, peaks)
    peaks["bf16"] = max(peaks["bf16"], device_matmul_peak(device, torch.bfloat16))
    return BenchResult(machine, peaks, _finish(rows, peaks, basis="bf16"), seconds=time.perf_counter() - start,
                       peak_basis="bf16")
