"""onnxruntime as a CPU inference backend, and the one ONNX export call every vggkit path uses.

``export_onnx`` writes a module to an ``.onnx`` file with whichever exporter this PyTorch
has working: its default first (``torch.export``-based from torch 2.9, TorchScript
before), then TorchScript (``dynamo=False``) where the default fails. ``OnnxModule`` runs a
float32 module through onnxruntime ``InferenceSession``s exported on first use (one per input
size, any batch) and looks like the module to its caller: torch tensors in, float32 torch
tensors (or dicts of them) out, on the input's device. Knows nothing of VGG.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

INSTALL = "pip install 'vggkit[onnx]' (or: pip install onnx onnxruntime onnxscript)"


MAX_EXPORTS = 4  # distinct input sizes exported per module; further sizes run in PyTorch
SESSIONS = 2  # sessions kept per module where the export fixes H and W: each holds a full copy of the weights


def onnxruntime_available() -> bool:
    """True where onnxruntime (and the exporter's onnx) can be imported."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def require_onnxruntime():
    """The ``onnxruntime`` module, or a one-line error naming the pip command."""
    if not onnxruntime_available():
        raise RuntimeError(f"onnxruntime is not installed; {INSTALL}.")
    import onnxruntime

    return onnxruntime


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def export_onnx(module: nn.Module, args: tuple, path: str | os.PathLike, input_names: list[str],
                output_names: list[str], dynamic_axes: dict[str, dict[int, str]], opset: int = 18) -> str:
    """Write ``module(*args)`` as ONNX to ``path``; axes in ``dynamic_axes`` stay symbolic.

    Returns the exporter that worked: ``"dynamo"`` (``torch.export``-based) or ``"torchscript"``.
    Both take ``dynamic_axes``, so one call serves torch 2.4 to today's. Weights go into the
    one file while they fit its 2 GB limit (the exporter writes ``path.data`` beside it above).
    """
    accepted = inspect.signature(torch.onnx.export).parameters
    options = {"input_names": input_names, "output_names": output_names, "dynamic_axes": dynamic_axes,
               "opset_version": opset, "verbose": False}
    if "external_data" in accepted:
        options["external_data"] = False
    default_is_dynamo = "dynamo" in accepted and accepted["dynamo"].default is True
    attempts = [("dynamo" if default_is_dynamo else "torchscript", {})]
    if default_is_dynamo:
        attempts.append(("torchscript", {"dynamo": False}))
    failures = []
    for name, extra in attempts:
        try:
            with warnings.catch_warnings():
                # The exporters' own chatter (TorchScript's deprecation, tracer notes) is not the user's concern.
                for category in (DeprecationWarning, FutureWarning, UserWarning, torch.jit.TracerWarning):
                    warnings.simplefilter("ignore", category)
                torch.onnx.export(module, args, str(path), **options, **extra)
            return name
        except Exception as error:  # noqa: BLE001 - each exporter fails in its own exception types
            failures.append(f"{name}: {_first_line(error)}")
    raise RuntimeError(f"ONNX export of {type(module).__name__} failed ({'; '.join(failures)}).")


def session_options(threads: int | None = None):
    """onnxruntime session options: ``threads`` intra-op threads (default torch's count, so that both
    runtimes use the same cores), one inter-op thread, every graph optimisation."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4  # fatal only: its errors reach the caller as exceptions, its notes need not
    return options


def load_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime ``InferenceSession`` on the CPU for the model file at ``path``."""
    ort = require_onnxruntime()
    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def output_names_of(reference) -> tuple[list[str], str]:
    """ONNX output names for what the module returned, and how to rebuild it: ``"tensor"``,
    ``"dict"`` (names are its keys) or ``"tuple"``."""
    if isinstance(reference, torch.Tensor):
        return ["output"], "tensor"
    if isinstance(reference, dict):
        return [str(k) for k in reference], "dict"
    if isinstance(reference, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in reference):
        return [f"output{i}" for i in range(len(reference))], "tuple"
    raise TypeError(f"The onnxruntime backend runs modules that return tensors, dicts or tuples of them, "
                    f"not {type(reference).__name__}.")


def batch_axes(input_name: str, output_names: list[str]) -> dict[str, dict[int, str]]:
    """Dynamic axes: the batch (axis 0) of the input and of every output."""
    return {name: {0: "batch"} for name in (input_name, *output_names)}


class OnnxModule(nn.Module):
    """A float32 module run by onnxruntime on the CPU: (N, C, H, W) -> what the module returns
    (a tensor, a dict of named tensors, a tuple), as float32 torch tensors on the input's device.

    Exported from ``module`` (kept: a float32, eval-mode copy is expected) on the first call with
    each input size (C, H, W), with a free batch; the last ``SESSIONS`` sizes keep their session.
    H and W stay fixed per session because an export traced at one size can be silently wrong at
    another (a 1x1 map gets specialised). An input the module itself refuses raises its own error.
    """

    def __init__(self, module: nn.Module, threads: int | None = None, opset: int = 18) -> None:
        super().__init__()
        require_onnxruntime()
        self.module = module.eval()
        self.training = False  # an inference copy, as the torch one: tools that save the mode read False
        self.threads, self.opset = threads, opset
        self.exporter: str | None = None
        self._exported: set[tuple[int, ...]] = set()  # every size exported so far (at most MAX_EXPORTS)
        self._in_torch: set[tuple[int, ...]] = set()  # sizes run by the module itself
        self._warned_sizes = False
        self._sessions: OrderedDict[tuple[int, ...], tuple[object, list[str], str]] = OrderedDict()

    def __getstate__(self) -> dict:
        # Sessions are not picklable; a copy exports its own on first use.
        state = dict(self.__dict__)
        state["_sessions"] = OrderedDict()
        return state

    def _export(self, size: tuple[int, ...]) -> tuple[object, list[str], str]:
        """(session, output names, output kind) for inputs of ``size`` (all but the batch)."""
        example = torch.zeros(2, *size)  # batch 2: exporters specialise a batch of 1
        with torch.no_grad():
            reference = self.module(example)  # the module's own checks speak first
        names, kind = output_names_of(reference)
        with tempfile.TemporaryDirectory(prefix="vggkit-onnx-") as folder:
            path = Path(folder) / "model.onnx"
            self.exporter = export_onnx(self.module, (example,), path, ["input"], names,
                                        batch_axes("input", names), self.opset)
            return load_session(path, self.threads), names, kind

    def _session(self, size: tuple[int, ...]) -> tuple[object, list[str], str] | None:
        """The session for inputs of ``size``, exported on first use; None where that size runs in PyTorch."""
        entry = self._sessions.pop(size, None)
        if entry is None:
            if size in self._in_torch:
                return None
            if len(self._exported) >= MAX_EXPORTS:
                # Sizes that keep changing (images at their own size) would pay an export each: PyTorch from here.
                if not self._warned_sizes:
                    self._warned_sizes = True
                    warnings.warn(f"onnxruntime backend: {MAX_EXPORTS} input sizes exported already; new sizes "
                                  f"run in PyTorch (for inputs of many sizes pass backend='torch')", stacklevel=3)
                self._in_torch.add(size)
                return None
            self._exported.add(size)
            try:
                with torch.inference_mode(False):  # the exporters trace; the caller may be in inference mode
                    entry = self._export(size)
            except RuntimeError as error:
                if not str(error).startswith("ONNX export of"):
                    raise  # the module's own refusal of this input
                # A size no exporter takes (a map smaller than adaptive pooling's output, say) runs in torch:
                # optimize()'s default backend must never fail where the model itself runs.
                warnings.warn(f"onnxruntime backend: inputs of size {size} run in PyTorch ({error})", stacklevel=3)
                self._in_torch.add(size)
                return None
            while len(self._sessions) >= SESSIONS:
                self._sessions.popitem(last=False)
        self._sessions[size] = entry  # most recent last
        return entry

    def forward(self, x: torch.Tensor):
        entry = self._session(tuple(x.shape[1:]))
        if entry is None:
            with torch.no_grad():
                return self.module(x.to("cpu", torch.float32))
        session, names, kind = entry
        try:
            arrays = session.run(None, {"input": x.detach().to("cpu", torch.float32).contiguous().numpy()})
        except Exception as error:  # noqa: BLE001 - onnxruntime's errors are its own pybind types
            raise RuntimeError(f"onnxruntime failed on an input of shape {tuple(x.shape)} "
                               f"({_first_line(error)}).") from None
        tensors = [torch.from_numpy(a).to(x.device, torch.float32) for a in arrays]
        if kind == "dict":
            return OrderedDict(zip(names, tensors))
        return tensors[0] if kind == "tensor" else tuple(tensors)

    def extra_repr(self) -> str:
        return f"exporter={self.exporter}, sessions={len(self._sessions)}, threads={self.threads or 'torch'}"
