"""Device, precision, memory format and compilation choices, in one place.

vggkit's own jobs (extract, evaluate, predict, the app) run models through a
``Runtime``; users opt in with ``optimize``. On a CPU with AMX or AVX-512-bf16,
bfloat16 weights in channels_last run several times faster than float32; autocast
alone does not (the weights must be cast), so an optimised copy holds bf16 weights.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 matmuls natively (AMX-bf16 or AVX-512-bf16)."""
    if os.environ.get("VGGKIT_CPU_BF16") in ("0", "1"):
        return os.environ["VGGKIT_CPU_BF16"] == "1"
    flags = cpu_flags()
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    """How a forward pass runs: device, dtype, channels_last, torch.compile."""

    device: torch.device
    dtype: torch.dtype
    channels_last: bool = True
    compile: bool = False

    @property
    def precision(self) -> str:
        return {v: k for k, v in DTYPES.items()}[self.dtype]

    def describe(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.device.type} {self.precision} {layout}{' compiled' if self.compile else ''}"

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """Move a float32 NCHW batch to this runtime's device, dtype and memory format."""
        x = x.to(self.device, self.dtype, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def choose_runtime(precision: str = "auto", device: str | torch.device | None = None,
                   compile: bool | str = False, long_job: bool = False) -> Runtime:
    """Pick the runtime: ``precision="auto"`` is bf16 on CUDA with bf16 and on CPUs with
    AMX/AVX-512-bf16, float32 elsewhere. ``compile="auto"`` compiles only for ``long_job``s,
    where the compile time pays back.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose from {PRECISIONS}.")
    device = torch.device(device) if device is not None else default_device()
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 is for CUDA only; on the CPU use 'bf16' or 'fp32'.")
    if compile == "auto":
        compile = long_job
    return Runtime(device=device, dtype=DTYPES[precision], channels_last=True, compile=bool(compile))


def _to_float32(out):
    if isinstance(out, torch.Tensor):
        return out.float()
    if isinstance(out, dict):
        return type(out)((k, _to_float32(v)) for k, v in out.items())
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float32(v) for v in out)
    return out


class OptimizedModel(nn.Module):
    """An inference copy of a model under a ``Runtime``.

    Takes ordinary float32 NCHW input on any device, returns float32 (tensors or dicts
    of tensors) on the runtime's device; runs in inference mode. The original model
    is left untouched.
    """

    def __init__(self, model: nn.Module, runtime: Runtime) -> None:
        super().__init__()
        self.runtime = runtime
        inner = copy.deepcopy(model).eval().requires_grad_(False)
        inner = inner.to(runtime.device, runtime.dtype)
        if runtime.channels_last:
            inner = inner.to(memory_format=torch.channels_last)
        self.model = inner
        self._forward = torch.compile(inner, dynamic=True) if runtime.compile else inner
        for attribute in ("preprocess", "class_names", "num_classes", "spec", "feature_info", "weights_info"):
            if hasattr(model, attribute):
                setattr(self, attribute, getattr(model, attribute))

    def forward(self, x: torch.Tensor):
        with torch.inference_mode():
            return _to_float32(self._forward(self.runtime.input(x)))

    def train(self, mode: bool = True) -> "OptimizedModel":
        if mode:
            raise RuntimeError("An optimized model is an inference copy; train the original float32 model.")
        return super().train(False)


def optimize(model: nn.Module, precision: str = "auto", device: str | torch.device | None = None,
             compile: bool | str = False) -> OptimizedModel:
    """A fast inference copy of ``model``: bf16/channels_last where the hardware runs them fast.

    Input: float32 (N, 3, H, W); output: float32. ``model`` itself is not changed.
    """
    return OptimizedModel(model, choose_runtime(precision, device, compile))
