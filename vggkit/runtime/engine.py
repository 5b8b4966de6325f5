"""Device, precision, memory format and compilation choices, in one place.

vggkit's own jobs (extract, evaluate, predict, finetune's feature cache, the app)
run models through a ``Runtime``; users opt in with ``optimize``.

What is fast depends on the hardware, so ``precision="auto"`` detects it:

* CUDA: bfloat16 where the GPU supports it, else float16.
* A CPU with AMX-bf16 or AVX-512-bf16: bfloat16 *weights* and input in channels_last
  run several times faster than float32 (autocast alone does not: the weights must be
  cast), so the optimised copy holds bf16 weights.
* Any other CPU (AVX2 only, Arm without bf16): float32 in channels_last. There bf16
  has no hardware path and runs several times slower than float32.

channels_last is used for every conv net: oneDNN's convolutions read NHWC without
reordering the activations between layers. ``torch.compile`` pays back its compile
time only on long jobs, and only where it fuses something the eager kernels leave on
the table (CUDA, bf16 CPUs); on float32 CPUs oneDNN's eager convolutions already hold
almost all of the time, so ``compile="auto"`` leaves them eager there.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..utils.choices import PRECISIONS
from .fusion import fuse_for_cpu

LONG_JOB_IMAGES = 10_000  # inference passes this long compile under compile="auto": ~a minute of compiling pays back
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


FAST_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


BF16_ENV = "VGGKIT_CPU_BF16"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags, as /proc/cpuinfo names them.

    Where there is no /proc/cpuinfo (macOS, Windows), the bf16 flags come from
    PyTorch's own CPU detection, and the set holds only those.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    detected = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
                "amx_bf16": torch.cpu._is_amx_tile_supported()}  # every AMX CPU has AMX-bf16
    return frozenset(name for name, present in detected.items() if present)


def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 matmuls natively (AMX-bf16 or AVX-512-bf16).

    The environment variable ``VGGKIT_CPU_BF16=0|1`` overrides the detection.
    """
    override = os.environ.get(BF16_ENV)
    if override in ("0", "1"):
        return override == "1"
    return bool(FAST_BF16_CPU_FLAGS & cpu_flags())


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    """How a forward pass runs: device, dtype, channels_last, torch.compile, the backend, and why."""

    device: torch.device
    dtype: torch.dtype
    channels_last: bool = True
    compile: bool = False
    reason: str = ""
    backend: str = "torch"  # or "onnxruntime" (float32 on the CPU, vggkit.runtime.onnx)

    @property
    def precision(self) -> str:
        return {v: k for k, v in DTYPES.items()}[self.dtype]

    def describe(self) -> str:
        if self.backend != "torch":
            return f"{self.device.type} {self.precision} {self.backend}"
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.device.type} {self.precision} {layout}{' compiled' if self.compile else ''}"

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """A float32 NCHW batch on this runtime's device, dtype and memory format.

        One copy at most (device, dtype and layout change together); none where ``x``
        already is what the runtime wants.
        """
        if self.channels_last and x.dim() == 4:
            return x.to(self.device, self.dtype, non_blocking=True, memory_format=torch.channels_last)
        return x.to(self.device, self.dtype, non_blocking=True)


def choose_runtime(precision: str = "auto", device: str | torch.device | None = None,
                   compile: bool | str = False, long_job: bool = False) -> Runtime:
    """Pick the runtime.

    ``precision="auto"``: bf16 on CUDA with bf16 (else fp16) and on CPUs with
    AMX/AVX-512-bf16, float32 elsewhere; ``"fp32"|"bf16"|"fp16"`` force one (fp16 is
    CUDA only). ``compile="auto"`` compiles only ``long_job``s, and only where
    compilation gains (CUDA, bf16 CPUs).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose from {PRECISIONS}.")
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}.")
    device = torch.device(device) if device is not None else default_device()
    reason = f"precision={precision!r} asked for"
    if precision == "auto":
        if device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            precision = "bf16" if bf16 else "fp16"
            reason = "CUDA with bf16" if bf16 else "CUDA without bf16: fp16"
        elif cpu_has_fast_bf16():
            precision = "bf16"
            reason = (f"{BF16_ENV}=1" if os.environ.get(BF16_ENV) == "1"
                      else "CPU with " + " and ".join(sorted(FAST_BF16_CPU_FLAGS & cpu_flags())))
        else:
            precision = "fp32"
            reason = (f"{BF16_ENV}=0" if os.environ.get(BF16_ENV) == "0"
                      else "CPU without AMX-bf16 or AVX-512-bf16: bf16 would run slower than float32")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 is for CUDA only; on the CPU use 'bf16' or 'fp32'.")
    if compile == "auto":
        compile = long_job and (device.type == "cuda" or precision == "bf16")
    return Runtime(device=device, dtype=DTYPES[precision], channels_last=True, compile=bool(compile),
                   reason=reason)


def _to_float32(out, device: torch.device):
    """Tensors (also inside dicts, lists, tuples) as float32 on ``device``: one copy at most each."""
    if isinstance(out, torch.Tensor):
        return out.to(device, torch.float32)
    if isinstance(out, dict):
        return type(out)((k, _to_float32(v, device)) for k, v in out.items())
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float32(v, device) for v in out)
    return out


def inference_copy(model: nn.Module, runtime: Runtime) -> nn.Module:
    """A copy of ``model`` in eval mode, without gradients, in the runtime's device, dtype and layout.

    Each parameter and floating buffer is converted straight into the copy (one new
    tensor each, never a full float32 copy first); shared parameters stay shared.
    On a float32 CPU runtime, conv [+ batch norm] + ReLU run as one oneDNN call on
    pre-packed weights (``vggkit.runtime.fusion``).
    """
    layout = torch.channels_last if runtime.channels_last else torch.contiguous_format

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        dtype = runtime.dtype if tensor.is_floating_point() else tensor.dtype
        fmt = layout if tensor.dim() == 4 else torch.contiguous_format
        return tensor.detach().to(runtime.device, dtype, memory_format=fmt, copy=True)

    memo: dict[int, torch.Tensor] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = nn.Parameter(convert(parameter), requires_grad=False)
    for buffer in model.buffers():
        memo[id(buffer)] = convert(buffer)
    inference = copy.deepcopy(model, memo).eval()
    if runtime.device.type == "cpu" and runtime.dtype == torch.float32 and runtime.channels_last \
            and not runtime.compile:
        fuse_for_cpu(inference)  # compiled copies get inductor's own version of this rewrite
    return inference.eval()  # the modules the rewrite put in are new, so in training mode


BACKENDS = ("auto", "torch", "onnxruntime")


def choose_backend(backend: str, runtime: Runtime) -> Runtime:
    """``runtime`` run by ``backend``: ``"torch"`` (as it is), ``"onnxruntime"`` (float32 on the CPU only),
    or ``"auto"``: onnxruntime where it is installed and the runtime is float32 eager on the CPU (on a CPU
    without fast bf16 it ran vgg16 faster than the fused oneDNN copy; README, Deployment), else torch.
    """
    from .onnx import INSTALL, onnxruntime_available

    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose from {BACKENDS}.")
    fits = runtime.device.type == "cpu" and runtime.dtype == torch.float32 and not runtime.compile
    if backend == "auto":
        if not fits:
            return runtime
        if not onnxruntime_available():
            return dataclasses.replace(runtime, reason=runtime.reason + f"; torch backend: onnxruntime is not "
                                                                       f"installed ({INSTALL})")
        backend = "onnxruntime"
    if backend == "torch":
        return runtime
    if not fits:
        raise ValueError(f"backend='onnxruntime' runs float32 on the CPU without torch.compile; this runtime is "
                         f"{runtime.describe()}: pass precision='fp32', device='cpu', compile=False.")
    if not onnxruntime_available():
        raise RuntimeError(f"backend='onnxruntime' needs onnxruntime, which is not installed; {INSTALL}.")
    # onnxruntime takes NCHW float32: a channels_last input would only be copied back.
    return dataclasses.replace(runtime, channels_last=False, backend="onnxruntime",
                               reason=runtime.reason + "; onnxruntime: float32 on the CPU")


class OptimizedModel(nn.Module):
    """An inference copy of a model under a ``Runtime``.

    Takes ordinary float32 NCHW input on any device and returns float32 (tensors or dicts
    of tensors) on the device the input came from, so it drops in where the model was:
    a CPU tensor in, a CPU tensor out, even when the copy runs on the GPU. Runs in
    inference mode: ``training`` is False from the start, ``eval()``/``train(False)`` are
    no-ops, and ``train(True)`` warns once and leaves it in inference mode (so tools that
    save and restore the mode, ``m.train(m.training)``, work). ``source`` is the original
    model, unchanged (exporters take it, as ``vggkit.deploy.export.export`` does). ``model`` is the copy:
    an ``nn.Module`` on the torch backend, an ``OnnxModule`` on onnxruntime.
    """

    def __init__(self, model: nn.Module, runtime: Runtime) -> None:
        super().__init__()
        self.training = False
        # Held outside the module tree: no parameters, state dict, .to() or .train() of ours reach the original.
        object.__setattr__(self, "_source", model)
        self._warned_train = False
        self.runtime = runtime
        if runtime.backend == "onnxruntime":
            from .onnx import OnnxModule

            self.model = OnnxModule(inference_copy(model, runtime))
        else:
            self.model = inference_copy(model, runtime)
        self._forward = torch.compile(self.model, dynamic=True) if runtime.compile else self.model
        for attribute in ("preprocess", "class_names", "num_classes", "spec", "feature_info", "weights_info"):
            if hasattr(model, attribute):
                setattr(self, attribute, getattr(model, attribute))

    @property
    def source(self) -> nn.Module:
        """The model this copy was made from, as it was given (float32, its own device and mode)."""
        return self._source

    def forward(self, x: torch.Tensor):
        with torch.inference_mode():
            return _to_float32(self._forward(self.runtime.input(x)), x.device)

    def train(self, mode: bool = True) -> OptimizedModel:
        """A no-op that keeps the copy in inference mode; ``train(True)`` warns once (train ``source``)."""
        if mode and not self._warned_train:
            self._warned_train = True
            warnings.warn("An optimized model is an inference copy and stays in inference mode; train its "
                          "float32 original (.source) instead.", stacklevel=2)
        return super().train(False)


def optimize(model: nn.Module, precision: str = "auto", device: str | torch.device | None = None,
             compile: bool | str = False, long_job: bool = False, backend: str = "auto") -> OptimizedModel:
    """A fast inference copy of ``model``: bf16/channels_last where the hardware runs them fast.

    Input: float32 (N, 3, H, W) on any device; output: float32 on the input's device.
    ``model`` itself is not changed (``.source`` holds it). ``compile="auto"`` compiles only a
    ``long_job``. ``backend``: ``"auto"`` (default: ``choose_backend``, onnxruntime for float32
    eager on the CPU where installed), ``"torch"`` or ``"onnxruntime"`` (float32 on the CPU, exported on
    the first call). An ``OptimizedModel`` given
    here is re-made from its source, not wrapped twice, on the device it was given unless
    ``device`` says otherwise.
    """
    if isinstance(model, OptimizedModel):
        device = model.runtime.device if device is None else device
        model = model.source
    return OptimizedModel(model, choose_backend(backend, choose_runtime(precision, device, compile, long_job)))
