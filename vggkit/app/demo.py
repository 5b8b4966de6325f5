"""Everything the app shows, computed: app.py only lays these results out.

A ``DemoModel`` holds the network the app explores, the honesty notice for its weights,
and caches of its views keyed on image content, so the same picture with the same
settings is computed once. Model-independent views (receptive-field tables, the
3x3-versus-7x7 comparison, Tables 1 and 2) are plain functions. Images arrive as paths,
PIL images or arrays and go through ``vggkit.data.images.load_image`` (orientation, modes,
``vggkit.utils.limits``' pixel limit, which every rescaled view is checked against too). Tables are pandas DataFrames, figures matplotlib
``Figure``s, pictures PIL images.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from torchvision.transforms import functional as TF

from ..data.images import ImageError, load_image, rescale_shortest, rescaled_wh
from ..evaluation.evaluate import TOP_K
from ..evaluation.protocols import (
    CROP,  # the receptive-field and feature-map views work on the paper's 224 px crop
    check_scales,
    dense_probabilities_from_maps,
    heatmap_from_maps,
    inference_networks,
    rescaled_view,
)
from ..models.backbone import VGGBackbone
from ..models.configs import (
    CONFIG_BLOCKS,
    DEPTHS,
    PAPER_CONFIGS,
    PAPER_PARAMETERS,
    layer_names,
    resolve,
)
from ..models.receptive_field import (
    ReceptiveField,
    effective_receptive_field,
    receptive_field,
)
from ..models.stacks import compared_designs, measure_designs, stack_cost_rows
from ..models.vgg import POOL5_GRID, VGG, count_parameters
from ..runtime.engine import optimize
from ..utils.choices import RELEASES
from ..utils.limits import APP_DENSE_MAX_PIXELS
from ..weights.checkpoint import WeightsError
from ..weights.factory import create_model, load_weights
from ..weights.releases import WeightsUnavailableError
from .plots import (
    plot_feature_grid,
    plot_heatmap_overlay,
    plot_parameter_split,
    plot_receptive_field_growth,
    plot_stack_receptive_fields,
)

DISPLAY_SCALE = 2  # the clickable picture is drawn at twice the crop's size
PICTURE_SIDE = DISPLAY_SCALE * CROP  # clicks on the picture are positions from 0 to this
MAX_SHORT_SIDE = 1024  # larger photographs are scaled down on opening: twice the largest test scale Q
MAX_RESCALED_PIXELS = APP_DENSE_MAX_PIXELS  # the dense views' budget, on the image after rescaling to Q
TIME_BUDGET_S = 120.0  # a view still computing after this long answers with a message instead of going on
ERF_MASS = 0.9  # the effective receptive field is reported as the square holding this share of |gradient|
# The views' settings, checked by the views themselves (a notebook has no sliders) and the app's slider ranges.
STACK_CHANNELS = (1, 512)
STACK_DEPTH = (1, 5)
STACK_SIZE = (8, 112)
CHANNELS_SHOWN = (1, 32)
# The forward timings of the 3x3-versus-7x7 measurement get this share of TIME_BUDGET_S, estimated before they
# run: at the sliders' maxima (512 channels, 11x11 against five 3x3 at 112 px) six runs of each took 150 s
# on a 2-core CPU (470 s on a busy one), so costlier settings are timed on a smaller input (said in the table).
STACK_TIMING_BUDGET_S = 10.0
STACK_PROBE_SIZE = 16  # the input the timing estimate is measured on: 1/49 of the largest size's work
SCORE_MAP_CACHE_BYTES = 64 * 1024 ** 2  # computed class score maps kept, by size: ~15 of 1 MP images at Q = 512


def whole_number(value: object, what: str, bounds: tuple[int, int]) -> int:
    """``value`` as an int when it is a whole number within ``bounds`` (ints, integral floats); else a
    ``ValueError`` naming ``what`` and the range."""
    low, high = bounds
    number = None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        if isinstance(value, (int, np.integer)) or (math.isfinite(value) and float(value).is_integer()):
            number = int(value)
    if number is None or not low <= number <= high:
        raise ValueError(f"{what} must be a whole number from {low} to {high}, not {value!r}.")
    return number


def finite_position(click: object) -> tuple[float, float]:
    """A click (x, y) as two finite floats; a ``ValueError`` otherwise (NaN would pick no unit)."""
    try:
        x, y = (float(v) for v in click)
    except (TypeError, ValueError, OverflowError):
        x = y = math.nan
    if not (math.isfinite(x) and math.isfinite(y)) or isinstance(click, (str, bytes)):
        raise ValueError(f"A click must be a position (x, y) of two finite numbers on the picture, not {click!r}.")
    return x, y


def config_name(config: object) -> str:
    """The model name of a configuration letter or model name; a ``ValueError`` listing the letters otherwise."""
    if not isinstance(config, str) or len(config) > 40:  # nothing longer is a name; spare difflib a megabyte
        raise ValueError(f"The configuration must be one of {', '.join(PAPER_CONFIGS)}, not {config!r}.")
    return resolve(config).name


def open_image(source: str | os.PathLike | Image.Image | np.ndarray | None) -> Image.Image:
    """An upright RGB PIL image from a path, PIL image or array; ``ImageError`` names the file otherwise.

    A shortest side above ``MAX_SHORT_SIDE`` is scaled down to it: every view rescales to at
    most 512 px anyway, and the caches then hold small pictures.
    """
    if source is None:
        raise ValueError("No image: pick an example or upload a photograph.")
    image = load_image(source)  # vggkit.utils.limits.max_pixels(): the library's one limit, on the file and every view
    return rescale_shortest(image, MAX_SHORT_SIDE) if min(image.size) > MAX_SHORT_SIDE else image


def describe_error(error: BaseException) -> str:
    """One line for the app's user about a failed view: vggkit's own message, never a traceback.

    An image error names the file by its own name (an upload's server-side folder means nothing
    to the user); memory and unexpected errors say what to change and that the app goes on serving.
    """
    if isinstance(error, ImageError):
        return f"{Path(error.path).name}: {error.reason}"
    if isinstance(error, (ValueError, TimeoutError)):
        return str(error)
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    if isinstance(error, MemoryError) or "can't allocate" in first_line or "out of memory" in first_line:
        return ("Not enough memory for this view on this machine; pick fewer or smaller test scales, or a "
                "smaller image. The app goes on serving.")
    return (f"This view failed ({type(error).__name__}: {first_line}); the app goes on serving: try another "
            f"image or setting.")


@dataclass(frozen=True, eq=False)
class ImageKey:
    """A PIL image that hashes by its pixels, so caches recognise the same picture however it arrived."""

    image: Image.Image
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.blake2b(self.image.tobytes(), digest_size=16)
        digest.update(repr((self.image.size, self.image.mode)).encode())
        object.__setattr__(self, "digest", digest.hexdigest())

    @classmethod
    def open(cls, source) -> "ImageKey":
        return cls(open_image(source))

    @classmethod
    def crop(cls, source) -> "ImageKey":
        """The key of the image's 224 px centre crop: all the crop views use, and all their caches keep (150 kB,
        where a kept photograph could weigh 100 MB)."""
        return cls(square_crop(open_image(source)))

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageKey) and other.digest == self.digest


def square_crop(image: Image.Image, size: int = CROP) -> Image.Image:
    """The centre square of the image resampled to ``size`` x ``size``.

    The same window as rescale-then-crop, but only the window is resampled, so a 10000 x 2
    image costs a 224 x 224 picture, not a 1,120,000 x 224 one.
    """
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))


def check_rescaled_size(size: tuple[int, int], scales: tuple[int, ...],
                        max_pixels: int = MAX_RESCALED_PIXELS) -> None:
    """Refuse, before anything is allocated, an image (W, H) whose rescale to the largest Q exceeds ``max_pixels``.

    A ``ValueError`` names the rescaled size, the limit, and the largest Q that fits (if any).
    """
    width, height = size
    scale = max(scales)
    new_width, new_height = rescaled_wh(width, height, scale)
    if new_width * new_height <= max_pixels:
        return
    short, long = min(width, height), max(width, height)
    largest = math.isqrt(max_pixels * short // long)  # the Q whose rescaled image just fits, within rounding
    while largest >= CROP and math.prod(rescaled_wh(width, height, largest)) > max_pixels:
        largest -= 1
    advice = (f"pick test scales up to Q = {largest}" if largest >= CROP else
              f"crop it to an aspect ratio of at most 1:{max_pixels // CROP ** 2} (the limit at Q = {CROP})")
    raise ValueError(f"A {width} x {height} image rescaled to Q = {scale} is {new_width} x {new_height} = "
                     f"{new_width * new_height:,} pixels, above the limit of {max_pixels:,} pixels for dense "
                     f"evaluation; {advice}.")


class Deadline:
    """A time budget for one request, checked between the stages of a view."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds, self.what = seconds, what
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        """A ``TimeoutError`` with a message once the budget is spent."""
        if time.monotonic() >= self.end:
            raise TimeoutError(f"{self.what} took longer than its budget of {self.seconds:g} s and was stopped; "
                               f"pick fewer or smaller test scales, or a smaller image.")

    def expect(self, seconds: float) -> None:
        """A ``TimeoutError`` before work estimated to take ``seconds`` would run past the budget."""
        if time.monotonic() + seconds > self.end:
            raise TimeoutError(f"{self.what} would take about {seconds:.0f} s more on this machine, past the budget "
                               f"of {self.seconds:g} s, so they were not computed; pick fewer or smaller test "
                               f"scales, or a smaller image.")


class ByteBoundedCache:
    """A thread-safe least-recently-used mapping to tensors that together hold at most ``max_bytes``.

    Bounded by size, not count: one 1 MP image's class score maps weigh 4.4 MB, a photograph's 0.6 MB.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[object, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key) -> torch.Tensor | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        with self._lock:
            if key in self._items or size > self.max_bytes:
                return
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= dropped.numel() * dropped.element_size()


def draw_unit(picture: Image.Image, box: tuple[int, int, int, int], scale: int = DISPLAY_SCALE) -> Image.Image:
    """``picture`` enlarged ``scale`` times with a receptive-field box (top, left, bottom, right) and its centre."""
    canvas = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    top, left, bottom, right = (v * scale for v in box)
    clipped = (max(left, 0), max(top, 0), min(right, canvas.width) - 1, min(bottom, canvas.height) - 1)
    draw.rectangle(clipped, outline=(255, 255, 255), width=5)
    draw.rectangle(clipped, outline=(230, 30, 30), width=3)
    cy, cx = (top + bottom) / 2, (left + right) / 2
    draw.ellipse((cx - 5, cy - 5, cx + 5, cy + 5), fill=(230, 30, 30), outline=(255, 255, 255), width=2)
    return canvas


def spatial_layers(name: str) -> list[str]:
    """The named layers with a spatial map at any input size: conv, LRN and pool layers (not fc6-fc8)."""
    return [layer for layer in layer_names(name) if not layer.startswith("fc")]


def default_layer(layers: list[str]) -> str:
    """The layer a picker starts on: conv3_3 (a 40 px receptive field in D) where it exists, else the middle one."""
    return "conv3_3" if "conv3_3" in layers else layers[len(layers) // 2]


def map_side(rf: ReceptiveField, input_size: int) -> int:
    """Side of a conv/pool layer's map on a square input: convs keep the size, each pool floors a halving."""
    return input_size // rf.stride


def unit_at(rf: ReceptiveField, side: int, x: float, y: float) -> tuple[int, int]:
    """The unit (row, col) of a ``side`` x ``side`` map whose receptive-field centre is nearest input pixel (x, y)."""
    centre = (rf.receptive_field - 1) / 2 - rf.padding  # centre of unit 0, in input pixels

    def nearest(coordinate: float) -> int:
        return int(min(max(round((coordinate - centre) / rf.stride), 0), side - 1))

    return nearest(y), nearest(x)


def effective_extent(heat: np.ndarray, centre: tuple[float, float], mass: float = ERF_MASS) -> int:
    """Side (px) of the smallest square centred on ``centre`` (y, x) that holds ``mass`` of ``heat``'s total."""
    total = float(heat.sum())
    if total <= 0:
        return 0
    rows, cols = np.indices(heat.shape)
    # Chebyshev distance: the square of side 2r+1 holds exactly the pixels at distance <= r.
    distance = np.ceil(np.maximum(np.abs(rows - centre[0]), np.abs(cols - centre[1]))).astype(int)
    by_radius = np.bincount(distance.ravel(), weights=heat.ravel())
    radius = int(np.searchsorted(np.cumsum(by_radius), mass * total * (1 - 1e-9)))
    return 2 * radius + 1


def receptive_field_table(name: str, input_size: int = CROP) -> pd.DataFrame:
    """Every layer's receptive field, effective stride and padding (input px) and its map size at ``input_size``."""
    table = receptive_field(name)
    rows = []
    for layer, rf in table.items():
        side = map_side(table["pool5"], input_size) - (POOL5_GRID - 1) if layer.startswith("fc") else map_side(rf, input_size)
        rows.append({"layer": layer, "receptive field (px)": rf.receptive_field, "stride": rf.stride,
                     "padding": rf.padding,
                     f"map at {input_size} px": f"{side} x {side}" if side > 0 else f"none (needs {CROP} px)"})
    return pd.DataFrame(rows)


def receptive_field_growth() -> Figure:
    """Receptive field against depth for configurations A-E."""
    return plot_receptive_field_growth(("A", "B", "C", "D", "E"))


def stack_settings(channels: object, depth: object, size: object) -> tuple[int, int, int]:
    """The 3x3-versus-7x7 settings as ints within the sliders' ranges; a ``ValueError`` naming the slider otherwise."""
    return (whole_number(channels, "Channels C", STACK_CHANNELS), whole_number(depth, "Stack depth n", STACK_DEPTH),
            whole_number(size, "Input size", STACK_SIZE))


def stack_comparison(channels: int, depth: int, size: int) -> tuple[pd.DataFrame, Figure]:
    """The paper's comparison for C channels and n stacked 3x3 convs: analytic table and receptive-field drawing."""
    channels, depth, size = stack_settings(channels, depth, size)
    return pd.DataFrame(stack_cost_rows(channels, depth, size)), plot_stack_receptive_fields(depth)


def seconds_per_multiply_add(channels: int, depth: int) -> float:
    """This machine's time per multiply-add for the costlier design, from one first (so slowest) run on a
    ``STACK_PROBE_SIZE`` input: an overestimate for both designs, as a time budget wants."""
    costly = max(compared_designs(channels, depth), key=lambda design: design.weights)
    module = optimize(costly.module(), backend="torch")
    x = torch.randn(1, channels, STACK_PROBE_SIZE, STACK_PROBE_SIZE)
    start = time.perf_counter()
    module(x)
    return (time.perf_counter() - start) / costly.multiply_adds(STACK_PROBE_SIZE)


def stack_timing_plan(channels: int, depth: int, size: int, budget_s: float = STACK_TIMING_BUDGET_S,
                      rate: float | None = None) -> tuple[int, int]:
    """(input size, timed repeats) for ``measure_designs`` whose warm-up and timed runs fit ``budget_s``.

    The requested size with up to 5 repeats when one warm-up and one timed run fit; else the largest
    smaller size (a multiple of 8) where they do. ``rate``: seconds per multiply-add (default: measured).
    """
    rate = seconds_per_multiply_add(channels, depth) if rate is None else rate

    def seconds(side: int) -> float:  # one forward of each design
        return rate * sum(design.multiply_adds(side) for design in compared_designs(channels, depth))

    runs = int(budget_s // max(seconds(size), 1e-9))  # warm-up included
    if runs >= 2:
        return size, min(runs - 1, 5)
    side = size - size % 8
    while side > STACK_SIZE[0] and 2 * seconds(side) > budget_s:
        side -= 8
    return side, 1


def stack_measurement(channels: int, depth: int, size: int) -> pd.DataFrame:
    """Both designs as PyTorch modules on this machine: counted parameters, measured receptive field, time.

    The timings stay within ``STACK_TIMING_BUDGET_S``: settings too costly to time at ``size`` are timed
    on the largest input that fits, and the column says so.
    """
    channels, depth, size = stack_settings(channels, depth, size)
    timed_size, repeats = stack_timing_plan(channels, depth, size)
    table = pd.DataFrame(measure_designs(channels, depth, timed_size, repeats))
    if timed_size != size:
        column = f"forward at {timed_size}x{timed_size} (ms)"
        table = table.rename(columns={column: f"{column[:-1]}; {size} px would take over "
                                               f"{STACK_TIMING_BUDGET_S:g} s to time)"})
    return table


def _grouped(convs: list[str]) -> list[str]:
    """["conv3-256", "conv3-256", "conv1-256"] -> ["conv3-256 x2", "conv1-256"]."""
    groups: list[list] = []
    for conv in convs:
        if groups and groups[-1][0] == conv:
            groups[-1][1] += 1
        else:
            groups.append([conv, 1])
    return [conv if count == 1 else f"{conv} x{count}" for conv, count in groups]


def table1() -> pd.DataFrame:
    """Table 1 of the paper generated from vggkit's configurations: one row per stage, one column per config."""
    rows = [{"": "weight layers", **{c: str(DEPTHS[c]) for c in PAPER_CONFIGS}},
            {"": "input", **{c: "224 x 224 RGB image" for c in PAPER_CONFIGS}}]
    for b in range(5):
        row = {"": f"block {b + 1}"}
        for config in PAPER_CONFIGS:
            layers = _grouped([f"conv{kernel}-{channels}" for channels, kernel in CONFIG_BLOCKS[config][b]])
            if b == 0 and resolve(config).lrn:
                layers.append("LRN")
            row[config] = ", ".join(layers + ["maxpool"])
        rows.append(row)
    for layer, label in (("fc6", "FC-4096"), ("fc7", "FC-4096"), ("fc8", "FC-1000"), ("output", "soft-max")):
        rows.append({"": layer, **{c: label for c in PAPER_CONFIGS}})
    return pd.DataFrame(rows)


@functools.lru_cache(maxsize=16)
def parameter_split(name: str, width: float = 1.0) -> tuple[int, int]:
    """(conv parameters, fc6-fc8 parameters) counted from the built module.

    Built on the meta device: real modules whose tensors have no storage, so even the
    144M-parameter E is counted instantly.
    """
    with torch.device("meta"):
        model = VGG(name, width=width)
    return count_parameters(model.features), count_parameters(model.classifier)


def table2() -> pd.DataFrame:
    """Table 2: parameters per configuration counted from built models, against the paper's exact counts."""
    rows = []
    for config in PAPER_CONFIGS:
        conv, dense = parameter_split(config)
        batch_norm = "-" if resolve(config).lrn else f"{sum(parameter_split(config + '_bn')):,}"
        rows.append({"config": config, "name": resolve(config).name, "weight layers": DEPTHS[config],
                     "parameters (counted)": f"{conv + dense:,}", "Table 2": f"{PAPER_PARAMETERS[config]:,}",
                     "equal": "yes" if conv + dense == PAPER_PARAMETERS[config] else "NO",
                     "in conv layers": f"{conv:,}", "with batch norm": batch_norm})
    return pd.DataFrame(rows)


def parameter_figure() -> Figure:
    """Stacked bars: conv against fully-connected parameters for each configuration."""
    return plot_parameter_split({config: parameter_split(config) for config in PAPER_CONFIGS if config != "A-LRN"})


def imagenet_categories() -> list[str]:
    """torchvision's 1000 ImageNet class names (shipped with torchvision; no download)."""
    from torchvision.models import VGG16_Weights

    return list(VGG16_Weights.IMAGENET1K_V1.meta["categories"])


def untrained_notice(name: str, reason: str) -> str:
    """The banner for random weights: what it means and how to get real ones."""
    return (
        f"**Untrained weights.** {reason} The {resolve(name).name} network below has random weights, so "
        f"its class names, top-5 predictions and class score maps are meaningless; receptive fields, "
        f"layer shapes and parameter counts are exact all the same. To see real ones, start the app once "
        f"on a machine with internet with `python app.py --weights imagenet` (torchvision's release is then "
        f"cached in `$TORCH_HOME/hub/checkpoints`), or pass a weight file you have: "
        f"`python app.py --weights path/to/vgg16-397923af.pth`."
    )


@dataclass
class ReceptiveFieldView:
    """One unit of a layer on the 224 px crop: its theoretical box and its effective receptive field."""

    picture: Image.Image  # the crop at DISPLAY_SCALE with the unit's box: click it to pick another unit
    effective: Figure  # the effective receptive field over the crop, with a colour bar
    heat: np.ndarray  # (224, 224) |d unit / d input| summed over colours, max 1
    unit: tuple[int, int]
    box: tuple[int, int, int, int]  # (top, left, bottom, right) in crop pixels, may pass the edges
    effective_size: int  # side of the square holding ERF_MASS of the gradient
    summary: str

    @property
    def marker(self) -> tuple[float, float]:
        """(x, y) of the unit's receptive-field centre on ``picture`` (where a click selects this unit)."""
        top, left, bottom, right = self.box
        return (left + right - 1) / 2 * DISPLAY_SCALE, (top + bottom - 1) / 2 * DISPLAY_SCALE


@dataclass
class FeatureMapsView:
    """The strongest channels of one layer on the 224 px crop."""

    grid: Figure
    info: pd.DataFrame
    channels: list[int]  # the channels shown, strongest mean activation first


@dataclass
class ScoreMapsView:
    """The paper's dense evaluation of one image and where one class is seen."""

    top5: pd.DataFrame
    overlay: Figure
    sizes: pd.DataFrame
    class_index: int


class DemoModel:
    """The network the app explores, its weights' status, and cached views.

    ``model`` is the float32 module (the effective receptive field needs its gradients);
    inference views run through ``vggkit.runtime.engine.optimize`` copies made on first use.
    Other configurations picked on the receptive-field tab get random weights.
    """

    def __init__(self, model: VGG, notice: str | None = None, cache_size: int = 16) -> None:
        self.model = model.eval()
        self.notice = notice
        self.trained = notice is None
        if model.class_names:
            self.class_names = list(model.class_names)
        elif model.num_classes == 1000:
            self.class_names = imagenet_categories()
        else:
            self.class_names = [f"class {i}" for i in range(model.num_classes)]
        self._fast_features: torch.nn.Module | None = None
        self._fast_model: torch.nn.Module | None = None
        self._lock = threading.Lock()
        # Per-instance caches keyed on ImageKey (the picture's pixels) and the view's settings.
        self._receptive_field_view = functools.lru_cache(cache_size)(self._compute_receptive_field_view)
        self._activations = functools.lru_cache(2)(self._compute_activations)
        self._feature_maps_view = functools.lru_cache(cache_size)(self._compute_feature_maps_view)
        # One dense pass per (image, Q) gives both the top 5 and every class's heatmap, for any set of scales;
        # kept by pixel digest, not by image, so no photograph is held after its request.
        self._score_maps = ByteBoundedCache(SCORE_MAP_CACHE_BYTES)
        self.time_budget = TIME_BUDGET_S
        self._seconds_per_pixel: float | None = None  # of a dense pass on this machine, learned from each pass
        self._network = functools.lru_cache(1)(self._random_network)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def config(self) -> str:
        return self.model.spec.config

    @property
    def layers(self) -> list[str]:
        return spatial_layers(self.name)

    def class_label(self, index: int) -> str:
        """``"281: tabby"``: what a class picker shows, and what ``parse_class`` reads back."""
        return f"{index}: {self.class_names[index]}"

    def parse_class(self, text: str | int | float | None) -> int | None:
        """A class given as an index (``281``, ``"281"``), a label (``"281: tabby"``) or a name (``"tabby"``).

        Blank means None (the top prediction). A name matches case-insensitively, whole or as the only
        class containing it; anything else is a ``ValueError`` saying what is accepted.
        """
        if text is None or (isinstance(text, str) and not text.strip()):
            return None
        if isinstance(text, float) and text.is_integer():
            text = int(text)
        text = str(text).strip()
        head = text.split(":", 1)[0].strip()
        if head.lstrip("-").isdigit():
            index = int(head)
            if not 0 <= index < len(self.class_names):
                raise ValueError(f"Class {index} is out of range: give an index from 0 to "
                                 f"{len(self.class_names) - 1}, or a class name.")
            return index
        wanted = text.lower()
        exact = [i for i, name in enumerate(self.class_names) if name.lower() == wanted]
        partial = exact or [i for i, name in enumerate(self.class_names) if wanted in name.lower()]
        if len(partial) == 1:
            return partial[0]
        if partial:
            shown = ", ".join(self.class_label(i) for i in partial[:5])
            raise ValueError(f"Class {text!r} matches {len(partial)} classes ({shown}{', ...' if len(partial) > 5 else ''}); "
                             f"give its index or its full name.")
        raise ValueError(f"No class is named {text!r}: give an index from 0 to {len(self.class_names) - 1} "
                         f"or a class name (e.g. {self.class_names[0]!r}).")

    def weights_table(self) -> pd.DataFrame:
        """The loaded weights: source, published accuracy, preprocessing, parameters."""
        info = dict(self.model.weights_info)
        rows = [("model", f"{self.name} (config {self.config}), width {self.model.width}"),
                ("weights", info.pop("source", "random init")),
                ("trained", "yes" if self.trained else "no: random weights (see the banner)")]
        for key in ("acc@1", "acc@5"):
            if key in info:
                rows.append((f"published ImageNet {key} (224 centre crop)", f"{info.pop(key)}"))
        rows += [(key, str(value)) for key, value in info.items()]
        preprocess = self.model.preprocess
        rows += [("preprocessing", f"{preprocess.name}: {preprocess.channel_order}, mean {preprocess.mean}, "
                                   f"std {preprocess.std}"),
                 ("parameters", f"{count_parameters(self.model):,}")]
        return pd.DataFrame(rows, columns=["", "value"])

    def network_input(self, picture: Image.Image) -> torch.Tensor:
        """An RGB picture -> (1, 3, H, W) normalised as the weights expect."""
        return self.model.preprocess.normalize(TF.to_tensor(picture)).unsqueeze(0)

    # ----------------------------------------------------------------------- receptive field

    def _random_network(self, config: str) -> VGG:
        return create_model(config, width=self.model.width).eval()

    def network(self, config: str) -> VGG:
        """The loaded model for its own configuration letter; a random-weight one (same width) for another."""
        spec = resolve(config)
        if spec.config == self.config:
            return self.model
        return self._network(spec.name)

    def unit_for_click(self, config: str, layer: str, x: float, y: float) -> tuple[int, int]:
        """The unit of ``layer`` nearest a click at (x, y) on the displayed (``DISPLAY_SCALE`` times) picture."""
        rf = layer_receptive_field(config, layer)
        return unit_at(rf, map_side(rf, CROP), x / DISPLAY_SCALE, y / DISPLAY_SCALE)

    def receptive_field_view(self, image, config: str, layer: str,
                             click: tuple[float, float] | None = None) -> ReceptiveFieldView:
        """The unit of ``config``'s ``layer`` under ``click`` (x, y on the displayed picture; None: the centre).

        The settings are checked before the image is opened.
        """
        name = config_name(config)
        layer_receptive_field(name, layer)
        unit = self.unit_for_click(name, layer, *finite_position(click)) if click is not None else None
        return self._receptive_field_view(ImageKey.crop(image), name, layer, unit)

    def _compute_receptive_field_view(self, key: ImageKey, name: str, layer: str,
                                      unit: tuple[int, int] | None) -> ReceptiveFieldView:
        rf = layer_receptive_field(name, layer)
        side = map_side(rf, CROP)
        row, col = unit if unit is not None else (side // 2, side // 2)
        picture = key.image  # the crop
        box = rf.box(row, col)
        network = self.network(name)
        heat = effective_receptive_field(VGGBackbone(network, [layer]), self.network_input(picture),
                                         position=(row, col)).numpy()
        size = effective_extent(heat, ((box[0] + box[2] - 1) / 2, (box[1] + box[3] - 1) / 2))
        figure = plot_heatmap_overlay(np.asarray(picture), heat, f"effective receptive field, {layer} unit ({row}, {col})",
                                      "|d unit / d input| (max 1)", box=box)
        beyond = max(0, -box[0], -box[1], box[2] - CROP, box[3] - CROP)
        weights = "the loaded weights" if network is self.model else "random weights (the loaded ones are another config)"
        summary = (
            f"**{name} {layer}**, unit ({row}, {col}) of its {side} x {side} map, {weights}. "
            f"Theoretical receptive field: **{rf.receptive_field} x {rf.receptive_field} px** "
            f"(rows {box[0]}..{box[2] - 1}, columns {box[1]}..{box[3] - 1} of the {CROP} px crop"
            + (f"; up to {beyond} px of it lie in the zero padding beyond the edge" if beyond else "")
            + f"). Effective receptive field: {ERF_MASS:.0%} of the gradient lies in a **{size} x {size} px** "
            f"square around its centre, {size / rf.receptive_field:.0%} of the theoretical side."
        )
        return ReceptiveFieldView(draw_unit(picture, box), figure, heat, (row, col), box, size, summary)

    # ----------------------------------------------------------------------- feature maps

    def _compute_activations(self, key: ImageKey) -> dict[str, np.ndarray]:
        """Every spatial layer's activations on the 224 px crop: (C, h, w) float16 arrays."""
        with self._lock:
            if self._fast_features is None:
                self._fast_features = optimize(VGGBackbone(self.model, self.layers), backend="torch")
        maps = self._fast_features(self.network_input(key.image))  # key.image is the crop
        return {layer: value[0].cpu().numpy().astype(np.float16) for layer, value in maps.items()}

    def feature_maps_view(self, image, layer: str, count: int = 16) -> FeatureMapsView:
        """The ``count`` channels of ``layer`` with the largest mean activation on the image's centre crop."""
        layer_receptive_field(self.name, layer)  # a clear error for a wrong name, before any work
        count = whole_number(count, "Channels shown", CHANNELS_SHOWN)
        return self._feature_maps_view(ImageKey.crop(image), layer, count)

    def _compute_feature_maps_view(self, key: ImageKey, layer: str, count: int) -> FeatureMapsView:
        rf = layer_receptive_field(self.name, layer)
        maps = self._activations(key)[layer].astype(np.float32)
        strength = maps.mean(axis=(1, 2))
        order = [int(c) for c in np.argsort(-strength, kind="stable")[:count]]
        channels, height, width = maps.shape
        grid = plot_feature_grid(maps[order], [f"ch {c}: mean {strength[c]:.3g}" for c in order],
                                 f"{layer}: {len(order)} of {channels} channels, strongest first")
        info = pd.DataFrame([
            ("layer", layer),
            ("output shape (C x H x W)", f"{channels} x {height} x {width}"),
            ("receptive field", f"{rf.receptive_field} x {rf.receptive_field} px"),
            ("stride / padding", f"{rf.stride} / {rf.padding} px"),
            ("input", f"{CROP} x {CROP} centre crop"),
            ("channels with mean > 0", f"{int((strength > 0).sum())} of {channels}"),
        ], columns=["", "value"])
        return FeatureMapsView(grid, info, order)

    # ----------------------------------------------------------------------- class score maps

    def fast_model(self) -> torch.nn.Module:
        """The inference copy under vggkit's runtime, made on first use."""
        with self._lock:  # callbacks run in several threads: make one copy, not one per thread
            if self._fast_model is None:
                self._fast_model = optimize(self.model, backend="torch")
        return self._fast_model

    def _compute_score_map(self, image: Image.Image, scale: int) -> torch.Tensor:
        """fc8 maps (2, classes, h, w) of ``image`` at Q = ``scale`` and of its mirror image, flipped back.

        The two run one after the other, not as one batch (as ``dense_score_maps`` does): that halves the
        activations a pass holds (a full-width vgg16 at 1 MP: 0.7 GB, not 1.1 GB) for 15% more time.
        """
        with inference_networks(self.fast_model()) as nets:
            x = nets.normalize(rescaled_view(image, scale)[None])
            return torch.cat([nets.score_maps(x), nets.score_maps(x.flip(-1)).flip(-1)])

    def _score_maps_at(self, key: ImageKey, scales: tuple[int, ...], deadline: Deadline) -> list[torch.Tensor]:
        """Each Q's maps, cached or computed, smallest Q first: the pass time learned on one predicts the rest,
        and what cannot finish within ``deadline`` is refused before it starts."""
        maps = {scale: self._score_maps.get((key.digest, scale)) for scale in scales}
        todo = [scale for scale in scales if maps[scale] is None]
        pixels = {scale: math.prod(rescaled_wh(*key.image.size, scale)) for scale in todo}
        for i, scale in enumerate(todo):
            deadline.check()
            if self._seconds_per_pixel is not None:
                deadline.expect(self._seconds_per_pixel * sum(pixels[q] for q in todo[i:]))
            start = time.monotonic()
            maps[scale] = self._compute_score_map(key.image, scale)
            self._seconds_per_pixel = (time.monotonic() - start) / pixels[scale]
            self._score_maps.put((key.digest, scale), maps[scale])
        return [maps[scale] for scale in scales]

    def score_maps_view(self, image, scales, class_index: int | str | None = None) -> ScoreMapsView:
        """Dense evaluation over ``scales`` and flips: the top 5, and one class's map (default: the top class).

        ``class_index`` is an index or a class name (see ``parse_class``). An image whose rescale to the
        largest Q exceeds ``MAX_RESCALED_PIXELS`` is refused before any pass; passes that the speed of the
        last one says would end past ``time_budget`` seconds are refused before they start, and a view
        still computing then stops between scales (both a ``TimeoutError``).
        """
        scales = chosen_scales(scales)
        class_index = self.parse_class(class_index)
        key = ImageKey.open(image)
        check_rescaled_size(key.image.size, scales)
        deadline = Deadline(self.time_budget, "The class score maps")
        deadline.check()
        maps = self._score_maps_at(key, scales, deadline)
        probabilities = dense_probabilities_from_maps(maps)
        top = probabilities.topk(min(TOP_K, len(probabilities)))
        top5 = pd.DataFrame([{"rank": rank, "class": self.class_names[i], "index": int(i), "probability": round(float(p), 4)}
                             for rank, (p, i) in enumerate(zip(top.values, top.indices), start=1)])
        if class_index is None:
            class_index = int(top.indices[0])
        heat = heatmap_from_maps(maps, class_index, (key.image.height, key.image.width))
        title = (f"{self.class_names[class_index]} (class {class_index}), p = {float(probabilities[class_index]):.3f}"
                 f"{'' if self.trained else ', UNTRAINED weights'}")
        overlay = plot_heatmap_overlay(np.asarray(key.image), heat, title, "softmax probability", vmin=0.0)
        return ScoreMapsView(top5, overlay, score_map_sizes(key.image.size, scales), class_index)


def chosen_scales(scales: object) -> tuple[int, ...]:
    """Test scales Q from ints or digit strings (as the app's checkboxes send them): sorted, each once;
    a ``ValueError`` saying what a scale must be otherwise."""
    if isinstance(scales, (int, str, np.integer)):
        scales = [scales]
    try:
        values = [int(q) if isinstance(q, str) and q.strip().isdigit() else q for q in scales]
    except TypeError:
        raise ValueError(f"Test scales must be a list of integers >= {CROP}, e.g. [256, 384], not {scales!r}.") from None
    return tuple(sorted(set(check_scales(values))))


def layer_receptive_field(name: str, layer: str) -> ReceptiveField:
    """A spatial layer's ``ReceptiveField``; a ``ValueError`` listing the valid names otherwise."""
    if not isinstance(layer, str) or layer not in spatial_layers(name):
        raise ValueError(f"Layer {layer!r} has no spatial map in {resolve(name).name}; "
                         f"choose one of {', '.join(spatial_layers(name))}.")
    return receptive_field(name)[layer]


def score_map_sizes(size: tuple[int, int], scales: tuple[int, ...]) -> pd.DataFrame:
    """Per Q: the rescaled image and its raw class score map, floor(side / 32) - 6 on each side."""
    rows = []
    for scale in scales:
        width, height = rescaled_wh(*size, scale)
        rows.append({"Q": scale, "rescaled image (W x H)": f"{width} x {height}",
                     "class score map (w x h)": f"{math.floor(width / 32) - 6} x {math.floor(height / 32) - 6}"})
    return pd.DataFrame(rows)


def load_demo_model(name: str = "vgg16", weights: str | os.PathLike | None = "imagenet",
                    width: float | None = None) -> DemoModel:
    """The app's network.

    A published release (``"imagenet"``, ``"timm"``, ``"caffe"``) that cannot be had (offline,
    or none exists for ``name``) gives random weights with an honest notice instead of a
    failure; ``None`` or ``"none"`` asks for random weights; a file path must load.
    """
    if weights is None or str(weights).lower() == "none":
        return DemoModel(create_model(name, width=width),
                         untrained_notice(name, "No weights were asked for (`--weights none`)."))
    if str(weights).lower() not in RELEASES:
        return DemoModel(create_model(name, weights=weights, width=width))
    model = create_model(name, width=width)
    try:
        load_weights(model, str(weights).lower(), progress=False)
    except (WeightsUnavailableError, WeightsError) as error:
        reason = str(error).splitlines()[0]
        return DemoModel(model, untrained_notice(name, f"The `{weights}` weights could not be loaded: {reason}"))
    return DemoModel(model)
