"""``export``: a VGG, its dense form or a backbone as an ONNX file or a ``torch.export`` program (.pt2),
checked in the same run against PyTorch on a real photograph.

What the file takes and gives (float32, NCHW, the weights' normalisation already applied):

* classifier: (N, 3, S, S), S the weights' crop (224) -> ``logits`` (N, classes);
* dense (``dense=True``: ``model.to_fully_conv()``): (N, 3, H, W) -> ``scores`` (N, classes, H/32-6, W/32-6);
* backbone (``layers=[...]``): (N, 3, H, W) -> one output per layer, named by it (``conv3_3``, ...).

The batch is always free. ``dynamic=True`` frees H and W as well (dense form and backbones;
the classifier's fc6 reads the 7x7 pool5 of its S x S crop, so it keeps that size).
Without it the file takes S x S. ``with_preprocess=True`` puts the weights' input transform
into the graph: it takes one uint8 RGB image (H, W, 3) and applies ``/255``, the channel order
and 0-255 scale of Caffe weights, mean and std, as ``model.preprocess`` does. The resize and
centre crop stay outside (an in-graph bilinear resize would not match PIL's antialiased one):
give the classifier its S x S crop, and the dense form or a backbone (with ``dynamic``) any size.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import functional as TF

from ..data.images import load_image, rescale_shortest
from ..data.preprocess import IMAGENET, Preprocess
from ..models.backbone import VGGBackbone
from ..models.configs import resolve
from ..models.vgg import POOL5_GRID, VGG, FullyConvVGG
from ..runtime.engine import OptimizedModel
from ..runtime.onnx import export_onnx, load_session, require_onnxruntime
from ..utils.paths import looks_like_a_path, writable_file
from ..weights.checkpoint import check_checkpoint_file
from ..weights.factory import create_model, load

FORMATS = {".onnx": "ONNX", ".pt2": "torch.export program"}


MIN_OPSET = 17  # the oldest opset asked for (torch.export-based exporters write 18 and convert down to 17)


RANDOM_SEED = 0  # a model name without weights exports the same random network every time


# Largest difference allowed, relative to the outputs' largest magnitude: the runtimes sum in another
# order, which gives about 1e-6 in float32; anything near 1e-4 is a wrong graph, not rounding.
TOLERANCE = 1e-4


PACKAGE = Path(__file__).resolve().parent.parent


PHOTO_FOLDERS = (PACKAGE / "_app" / "assets" / "examples", PACKAGE.parent / "assets" / "examples")


@dataclass
class ExportReport:
    """What ``export`` wrote and how closely the file reproduces the PyTorch model."""

    path: Path
    format: str  # "onnx" or "pt2"
    kind: str  # "classifier", "dense" or "backbone"
    model: str
    exporter: str  # "dynamo" (torch.export-based ONNX), "torchscript" (ONNX) or "torch.export"
    opset: int | None
    input_name: str
    input_shape: tuple  # ints, and names for the free axes
    input_dtype: str
    outputs: dict[str, tuple]
    preprocess: str  # the weights' preprocessing; applied inside the graph with ``with_preprocess``
    with_preprocess: bool
    photo: Path
    checks: list[tuple[str, float]] = field(default_factory=list)  # (what ran, max |ONNX/pt2 - PyTorch|)
    files: list[Path] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max(diff for _, diff in self.checks)

    def summary(self) -> str:
        """A few lines for the terminal: the file, its input and outputs, the checks and their differences."""
        size = sum(f.stat().st_size for f in self.files if f.exists()) / 2 ** 20
        how = f"opset {self.opset}, {self.exporter} exporter" if self.format == "onnx" else "torch.export.save"
        inside = f"; {self.preprocess} preprocessing inside" if self.with_preprocess else ""
        runner = "onnxruntime" if self.format == "onnx" else "the loaded program"
        lines = [(f"wrote {self.path} ({FORMATS['.' + self.format]}, {how}, {size:.1f} MiB): {self.model} "
                  f"{self.kind}{inside}"),
                 f"  input  {self.input_name}: {self.input_dtype} {_shape_text(self.input_shape)}"]
        lines += [f"  output {name}: float32 {_shape_text(shape)}" for name, shape in self.outputs.items()]
        lines.append(f"checked with {runner} against PyTorch on {self.photo.name}:")
        lines += [f"  {what}: max abs difference {diff:.2e}" for what, diff in self.checks]
        lines.append(f"max abs difference {self.max_abs_diff:.2e}")
        return "\n".join(lines)


def _shape_text(shape: tuple) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class WithPreprocess(nn.Module):
    """A network with the weights' input transform in front: uint8 RGB (H, W, 3) -> ``net(x)`` for
    ``x = preprocess.normalize(image / 255)`` as (1, 3, H, W), the same arithmetic as ``Preprocess``."""

    def __init__(self, net: nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.net = net
        self.preprocess = preprocess

    def forward(self, image: torch.Tensor):
        rgb = image.permute(2, 0, 1).to(torch.float32) / 255.0  # TF.to_tensor's scaling
        return self.net(self.preprocess.normalize(rgb).unsqueeze(0))


def check_format(path: str | os.PathLike) -> str:
    """The export format of ``path`` from its suffix (``.onnx`` or ``.pt2``); a one-line error otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"Unknown export format {Path(path).suffix or '(no suffix)'!r} for {path}: name the "
                         f"file .onnx (ONNX, for onnxruntime and other runtimes) or .pt2 (torch.export).")
    return suffix


def _check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset={opset!r}: the ONNX opset must be a whole number >= {MIN_OPSET} (default 18).")
    return opset


def load_network(model_or_checkpoint: nn.Module | str | os.PathLike, weights: str | os.PathLike | None = None
                 ) -> nn.Module:
    """The float32 module to export: an optimized copy's ``source``, a module as given, a vggkit
    checkpoint file, or a model name with ``weights`` (None: random, with a warning)."""
    if isinstance(model_or_checkpoint, OptimizedModel):
        model_or_checkpoint = model_or_checkpoint.source
    if isinstance(model_or_checkpoint, nn.Module):
        if weights is not None:
            raise ValueError("weights= applies to a model name; a module brings its own weights.")
        return model_or_checkpoint
    text = str(model_or_checkpoint)
    if Path(text).exists() or looks_like_a_path(text):
        check_checkpoint_file(text)  # missing, a folder, not a weight file: said first
        if weights is not None:
            raise ValueError(f"{text} is a checkpoint file and brings its own weights; leave out "
                             f"weights={str(weights)!r} (it applies to a model name such as vgg16).")
        return load(text)
    spec = resolve(text)  # a misspelt name fails here, before any warning
    if weights is None:
        warnings.warn(f"Exporting {spec.name} with random weights (seed {RANDOM_SEED}): its outputs mean nothing. "
                      f"Pass weights='imagenet' (or 'caffe', 'timm', a weight file).", stacklevel=3)
        return create_model(spec, seed=RANDOM_SEED)
    return create_model(spec, weights=weights)


def network_to_export(model: nn.Module, dense: bool = False, layers: Sequence[str] | None = None
                      ) -> tuple[nn.Module, str]:
    """(the module to export, its kind): the classifier, its dense form or a backbone of ``layers``."""
    if dense and layers:
        raise ValueError("Choose dense=True (class score maps) or layers=[...] (a backbone), not both.")
    if isinstance(model, VGG):
        if dense:
            if not all(hasattr(model.classifier, fc) for fc in ("fc6", "fc7", "fc8")):
                raise ValueError("The dense form needs the paper's fc6-fc8 head; this model has another head.")
            return model.to_fully_conv(), "dense"
        if layers:
            return VGGBackbone(model, list(layers)), "backbone"
        return model, "classifier"
    if dense or layers:
        raise ValueError(f"dense= and layers= apply to a VGG; this is already a {type(model).__name__}.")
    if isinstance(model, FullyConvVGG):
        return model, "dense"
    if isinstance(model, VGGBackbone):
        return model, "backbone"
    raise TypeError(f"export takes a model name, a vggkit checkpoint, a VGG, its to_fully_conv() form, a "
                    f"backbone or vggkit.optimize(...) of one; got {type(model).__name__}.")


def _cpu_float32(module: nn.Module) -> nn.Module:
    """``module`` itself where it is already float32 on the CPU, else such a copy (the original stays put)."""
    import copy

    tensors = list(module.parameters()) + list(module.buffers())
    if all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors):
        return module
    return copy.deepcopy(module).to("cpu", torch.float32)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the export only: every submodule's flag is restored afterwards."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def example_photo(image: str | os.PathLike | Image.Image | None = None) -> tuple[Image.Image, Path]:
    """The photograph the checks run on (default: the package's chelsea.jpg) and its path."""
    if image is None:
        found = [folder / "chelsea.jpg" for folder in PHOTO_FOLDERS if (folder / "chelsea.jpg").is_file()]
        if not found:
            raise FileNotFoundError("The example photograph chelsea.jpg is not in this installation; "
                                    "pass image= (--image) with a photograph to check the export on.")
        image = found[0]
    name = Path(getattr(image, "filename", "") or "image") if isinstance(image, Image.Image) else Path(image)
    return load_image(image), name


def min_side(net: nn.Module, suffix: str) -> int:
    """The smallest free H or W an export takes. ONNX: 32 (five 2x2 pools), 224 where an unpadded fc6 reads
    7x7 of pool5. A .pt2 program needs every output map at least 2x2 (torch.export specialises a size of
    1): twice the deepest tap's stride for a backbone, 256 for the dense form (64 with ``pad_fc6``)."""
    inner = net.net if isinstance(net, WithPreprocess) else net
    has_fc = isinstance(inner, (FullyConvVGG, DenseGraph)) or getattr(inner, "fc6", None) is not None
    padded = getattr(inner, "pad_fc6", False)
    if suffix == ".onnx":
        return 32 * (POOL5_GRID if has_fc and not padded else 1)
    if has_fc:
        return 32 * (2 if padded else POOL5_GRID + 1)
    return max(32, 2 * max(inner.strides())) if isinstance(inner, VGGBackbone) else 32


class DenseGraph(nn.Module):
    """``FullyConvVGG``'s eval-mode forward for export: fc6 as a 7x7 convolution on the same weight views.

    (N, 3, H, W) -> scores (N, classes, H/32-6, W/32-6), or (N, classes) with ``pool="avg"``. The module's
    own fc6 (im2col + one matmul, fast on the CPU) makes torch.export fix the batch; a convolution
    does not, and onnxruntime runs either as one GEMM.
    """

    def __init__(self, dense: FullyConvVGG) -> None:
        super().__init__()
        self.dense = dense
        self.pad_fc6 = dense.pad_fc6
        self.preprocess, self.spec = dense.preprocess, dense.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dense
        hidden = d.fc7.in_features
        fc6 = F.conv2d(d.features(x), d.conv_weight(d.fc6, d.feature_channels, POOL5_GRID), d.fc6.bias,
                       padding=3 if d.pad_fc6 else 0)
        fc7 = F.conv2d(F.relu(fc6), d.conv_weight(d.fc7, hidden, 1), d.fc7.bias)
        scores = F.conv2d(F.relu(fc7), d.conv_weight(d.fc8, hidden, 1), d.fc8.bias)
        return scores.mean(dim=(2, 3)) if d.pool == "avg" else scores


def check_inputs(photo: Image.Image, preprocess: Preprocess, with_preprocess: bool, dynamic: bool,
                 smallest: int = 32) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(what, the file's input, the PyTorch model's input) for each check; the last is the export example.

    The first check is the weights' own crop (shortest side to the resize size, centre crop), so its
    PyTorch input is exactly ``preprocess(photo)`` (a larger centre crop where the export's
    ``smallest`` side is over it); ``dynamic`` adds the whole rescaled photograph, a second H x W.
    """
    whole = rescale_shortest(photo, max(preprocess.resize_size, smallest))
    side = max(preprocess.input_size, smallest)
    crop = TF.center_crop(whole, side)

    def network_input(picture: Image.Image) -> torch.Tensor:
        return preprocess.normalize(TF.to_tensor(picture))[None]  # Preprocess.__call__'s last two steps

    if with_preprocess:
        def as_uint8(picture: Image.Image) -> torch.Tensor:
            return torch.from_numpy(np.array(picture.convert("RGB"), dtype=np.uint8))

        items = [(f"photo, {side}x{side} crop as uint8", as_uint8(crop), network_input(crop))]
        if dynamic:
            items.append((f"whole photo, {whole.height}x{whole.width} as uint8", as_uint8(whole),
                          network_input(whole)))
        return items
    x = network_input(crop)
    items = [(f"photo, {side}x{side} crop, batch 1", x, x)]
    if dynamic:
        x = network_input(whole)
        label = f"whole photo {whole.height}x{whole.width} and its mirror, batch 2"
    else:
        label = "photo crop and its mirror, batch 2"
    pair = torch.cat([x, x.flip(-1)])
    return items + [(label, pair, pair)]


def _named(out, names: list[str]) -> OrderedDict[str, torch.Tensor]:
    if isinstance(out, dict):
        return OrderedDict((n, out[n]) for n in names)
    values = [out] if isinstance(out, torch.Tensor) else list(out)
    return OrderedDict(zip(names, values))


def _axes(outputs: dict[str, torch.Tensor], with_preprocess: bool, spatial: bool
          ) -> tuple[dict[int, str], dict[str, dict[int, str]]]:
    """The free axes of the input and of each output: the batch (no batch with one uint8 image), H and W."""
    if with_preprocess:
        inp = {0: "height", 1: "width"} if spatial else {}
    else:
        inp = {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"}
    out = {}
    for name, value in outputs.items():
        axes = {} if with_preprocess else {0: "batch"}
        if spatial and value.dim() == 4:
            axes.update({2: f"{name}_height", 3: f"{name}_width"})
        out[name] = axes
    return inp, out


def _symbolic(shape: torch.Size, axes: dict[int, str]) -> tuple:
    return tuple(axes.get(i, d) for i, d in enumerate(shape))


def _stage_onnx(graph: nn.Module, example: torch.Tensor, staged: Path, input_name: str, names: list[str],
                axes: tuple[dict, dict], opset: int) -> tuple[str, Callable]:
    """Export ONNX to ``staged`` and open it in onnxruntime: (exporter, run(x) -> named outputs)."""
    dynamic_axes = {input_name: axes[0], **axes[1]}
    exporter = export_onnx(graph, (example,), staged, [input_name], names, dynamic_axes, opset)
    session = load_session(staged)
    found = [o.name for o in session.get_outputs()]
    if found != names:
        raise RuntimeError(f"The exported ONNX outputs are {found}, expected {names}.")

    def run(x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return _named([torch.from_numpy(a) for a in session.run(None, {input_name: x.numpy()})], names)
    return exporter, run


def written_opset(path: Path) -> int:
    """The default-domain opset an ONNX file declares (an exporter may write another than asked for)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _stage_pt2(graph: nn.Module, example: torch.Tensor, staged: Path, names: list[str], axes: dict[int, str],
               min_side: int) -> tuple[str, Callable]:
    """``torch.export`` to ``staged`` with ``torch.export.save`` and load it back: (exporter, run)."""
    Dim = torch.export.Dim
    dims = {name: Dim(name, min=1) if name == "batch" else Dim(name, min=min_side) for name in axes.values()}
    shapes = ({axis: dims[name] for axis, name in axes.items()},) if axes else None
    try:
        program = torch.export.export(graph, (example,), dynamic_shapes=shapes)
    except Exception as error:  # noqa: BLE001 - torch.export raises many types; the first line says why
        lines = str(error).strip().splitlines()
        raise RuntimeError(f"torch.export failed: {type(error).__name__}: {lines[0] if lines else ''}") from None
    torch.export.save(program, staged)
    loaded = torch.export.load(staged).module()

    def run(x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return _named(loaded(x), names)
    return "torch.export", run


def _compare(run: Callable, net: nn.Module, items: list, fmt: str) -> list[tuple[str, float]]:
    """Max |file - PyTorch| per check; a one-line error where it is beyond float32 rounding."""
    checks = []
    for what, file_input, torch_input in items:
        try:
            got = run(file_input)
        except Exception as error:  # noqa: BLE001 - onnxruntime's errors are pybind types
            raise RuntimeError(f"The exported {fmt} failed on the check '{what}': {str(error).strip()[:300]}") \
                from None
        with torch.no_grad():
            want = _named(net(torch_input), list(got))
        diff = max((got[n] - want[n]).abs().max().item() for n in want)
        scale = max(want[n].abs().max().item() for n in want)
        if not diff <= TOLERANCE * scale + 1e-6:
            raise RuntimeError(f"The exported {fmt} differs from PyTorch by {diff:.2e} (outputs up to {scale:.2e}) "
                               f"on the check '{what}': a wrong graph, not rounding; nothing was written.")
        checks.append((what, diff))
    return checks


def _publish(folder: Path, path: Path) -> list[Path]:
    """Move every staged file (the model and any external data beside it) next to ``path``."""
    moved = []
    for staged in sorted(folder.iterdir()):
        target = path.with_name(staged.name)
        os.replace(staged, target)
        moved.append(target)
    return sorted(moved, key=lambda p: p != path)


def export(model_or_checkpoint: nn.Module | str | os.PathLike, path: str | os.PathLike, dense: bool = False,
           layers: Sequence[str] | None = None, dynamic: bool = False, with_preprocess: bool = False,
           opset: int = 18, weights: str | os.PathLike | None = None,
           image: str | os.PathLike | Image.Image | None = None) -> ExportReport:
    """Export a model to ``path`` (``.onnx``: ONNX for onnxruntime; ``.pt2``: ``torch.export.save``), then
    check the file against the PyTorch model on a photograph (``image``, default chelsea.jpg, through
    the model's own preprocessing) and return what was written with the max abs differences.

    ``model_or_checkpoint``: a model name (with ``weights``: None for random, 'imagenet', 'caffe',
    'timm' or a file), a vggkit checkpoint, a VGG, ``model.to_fully_conv()``, a backbone, or
    ``vggkit.optimize(...)`` of one (its float32 ``source`` is exported). Shapes: see the module
    docstring. Nothing is written unless every check passes.
    """
    path = Path(path)
    suffix = check_format(path)
    if suffix == ".onnx":
        _check_opset(opset)
        require_onnxruntime()
    writable_file(path, example="model" + suffix)
    if dense and layers:
        raise ValueError("Choose dense=True (class score maps) or layers=[...] (a backbone), not both.")
    photo, photo_path = example_photo(image)
    net, kind = network_to_export(load_network(model_or_checkpoint, weights), dense, layers)
    if dynamic and kind == "classifier":
        raise ValueError("dynamic=True frees H and W, which the classifier does not take (fc6 reads the 7x7 pool5 "
                         "of its 224 crop); add dense=True for score maps at any size, or layers=[...].")
    net = _cpu_float32(net)
    preprocess = getattr(net, "preprocess", None) or IMAGENET
    graph = DenseGraph(net) if kind == "dense" else net
    graph = WithPreprocess(graph, preprocess) if with_preprocess else graph
    with _eval_mode(graph):
        return _export_checked(graph, net, kind, path, suffix, opset, dynamic, with_preprocess, preprocess,
                               photo, photo_path)


def _export_checked(graph: nn.Module, net: nn.Module, kind: str, path: Path, suffix: str, opset: int,
                    dynamic: bool, with_preprocess: bool, preprocess: Preprocess, photo: Image.Image,
                    photo_path: Path) -> ExportReport:
    """Stage the export in a folder beside ``path``, check it, then move it into place."""
    smallest = min_side(graph, suffix)
    items = check_inputs(photo, preprocess, with_preprocess, dynamic, smallest)
    example = items[-1][1]
    with torch.no_grad():
        reference = graph(example)
    names = list(reference) if isinstance(reference, dict) else ["scores" if kind == "dense" else "logits"]
    outputs = _named(reference, names)
    input_axes, output_axes = _axes(outputs, with_preprocess, dynamic)
    input_name = "image" if with_preprocess else "input"
    fmt = FORMATS[suffix]
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".vggkit-export-") as folder:
        staged = Path(folder) / path.name
        if suffix == ".onnx":
            exporter, run = _stage_onnx(graph, example, staged, input_name, names, (input_axes, output_axes), opset)
            opset = written_opset(staged)
        else:
            exporter, run = _stage_pt2(graph, example, staged, names, input_axes, smallest)
        checks = _compare(run, net, items, fmt)  # with_preprocess: against net(preprocess(photo)) itself
        files = _publish(Path(folder), path)
    spec = getattr(net, "spec", None)
    return ExportReport(
        path=path, format=suffix[1:], kind=kind, model=spec.name if spec is not None else type(net).__name__,
        exporter=exporter, opset=opset if suffix == ".onnx" else None, input_name=input_name,
        input_shape=_symbolic(example.shape, input_axes), input_dtype="uint8" if with_preprocess else "float32",
        outputs={n: _symbolic(v.shape, output_axes[n]) for n, v in outputs.items()},
        preprocess=preprocess.name, with_preprocess=with_preprocess, photo=photo_path, checks=checks, files=files)
