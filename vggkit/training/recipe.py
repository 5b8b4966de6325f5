"""Training recipes: plain TOML files that hold one experiment, validated against a schema.

A recipe has the sections ``model``, ``init``, ``data``, ``optim``, ``schedule``,
``run`` and ``target`` (the paper's errors the run is measured against). Every key
has a default (section 3.1 of the paper), so a file names only what it changes.
An unknown key is an error that names it and suggests the closest valid one;
``--set section.key=value`` overrides any value from the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..utils.choices import PRECISIONS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


# An installed package carries the recipes inside it (pyproject maps recipes/ to vggkit/recipes/);
# a clone has only the top-level recipes/ that users read and edit.
_PACKAGE = Path(__file__).resolve().parents[1]  # vggkit/


RECIPE_DIR = next((d for d in (_PACKAGE / "recipes" / "imagenet", _PACKAGE.parent / "recipes" / "imagenet")
                   if d.is_dir()), _PACKAGE.parent / "recipes" / "imagenet")


INIT_METHODS = ("paper", "glorot", "kaiming")


@dataclass
class ModelSection:
    name: str = "A"  #: a configuration of Table 1 (A, A-LRN, B, C, D, E or an alias)
    num_classes: int = 1000
    width: float = 1.0  #: channel multiplier (1.0 is the paper's network)
    dropout: float = 0.5  #: on fc6 and fc7


@dataclass
class InitSection:
    method: str = "paper"  #: random init of the layers not loaded: paper N(0, 0.01), glorot, kaiming
    from_a: str = ""  #: trained net A: conv1_1, conv2_1, conv3_1, conv3_2, fc6-fc8 are copied (init_from)
    weights: str = ""  #: a checkpoint of this configuration to start from (S=384 from S=256, ...)


@dataclass
class DataSection:
    scale: int | list[int] = 256  #: training scale S, or [S_min, S_max] for scale jittering
    crop: int = 224  #: random crop side
    flip: bool = True
    pca_std: float = 0.1  #: AlexNet's colour shift; 0 turns it off
    val_scale: int = 256  #: Q of the per-epoch validation (centre crop of side ``crop``)
    workers: int = 8  #: DataLoader worker processes per GPU/process
    gpu_decode: bool = False  #: decode JPEGs on the GPU (nvJPEG) and augment there
    verify: bool = False  #: decode every file before training and skip unreadable ones up front


@dataclass
class OptimSection:
    batch_size: int = 256  #: global: summed over all processes and accumulation steps
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class ScheduleSection:
    epochs: int = 74
    factor: float = 0.1  #: the lr is multiplied by this when validation top-1 accuracy plateaus
    patience: int = 5  #: epochs without improvement before a drop
    threshold: float = 0.001  #: an improvement is at least this much top-1 accuracy (absolute, 0.001 = 0.1 pp)
    max_drops: int = 3
    max_steps: int = 0  #: stop after this many optimizer steps in all (0: no limit); for smoke tests


@dataclass
class RunSection:
    seed: int = 0
    device: str = ""  #: "" picks cuda:LOCAL_RANK where there is a GPU, else cpu
    precision: str = "auto"  #: auto = bf16 autocast on GPUs with bf16, fp32 on this kind of CPU
    channels_last: bool = True
    compile: bool | str = "auto"  #: torch.compile the training step; "auto": on CUDA, for runs of many steps
    max_batch_per_gpu: int = 0  #: largest micro-batch a device holds; gradients are accumulated beyond it
    checkpoint_every: int = 0  #: also checkpoint every N optimizer steps (0: at epoch ends only)
    loss_every: int = 50  #: read the loss back (progress bar, NaN check) every N steps; the GPU never waits between


@dataclass
class TargetSection:
    top1_error: float = 0.0  #: the paper's top-1 error (%), Table 3
    top5_error: float = 0.0
    source: str = ""  #: where the numbers come from


@dataclass
class Recipe:
    """One training experiment. ``Recipe.load(path, overrides)`` reads and validates a file."""

    name: str = ""
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    init: InitSection = field(default_factory=InitSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    run: RunSection = field(default_factory=RunSection)
    target: TargetSection = field(default_factory=TargetSection)

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> "Recipe":
        """Read a TOML recipe (a path, or the name of a file in recipes/imagenet/), apply
        ``section.key=value`` overrides, validate."""
        path = find_recipe(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path} is not valid TOML: {error}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a TOML recipe (not UTF-8 text); give a .toml file or a recipe name "
                             f"(vggkit train --list-recipes).") from None
        return cls.from_dict(apply_overrides(data, overrides), source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "recipe") -> "Recipe":
        recipe = _build(cls, data, source, prefix="")
        recipe.validate(source)
        return recipe

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The full recipe, every key written out, as TOML a user can copy and edit."""
        lines = [f"{k} = {_toml_value(v)}" for k, v in self.to_dict().items() if not isinstance(v, dict)]
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        return "\n".join(lines) + "\n"

    @property
    def scale_range(self) -> tuple[int, int]:
        """(S_min, S_max); equal for a fixed training scale."""
        scale = self.data.scale
        return (scale, scale) if isinstance(scale, int) else (scale[0], scale[1])

    def validate(self, source: str = "recipe") -> None:
        """Values that parse but make no sense: a ``ValueError`` naming the key and the fix."""
        from ..models.configs import resolve
        from ..utils.checks import ArgumentError, check_positive, check_side, check_width

        def fail(key: str, message: str) -> None:
            raise ValueError(f"{source}: {key}: {message}")

        try:
            resolve(self.model.name)
        except (KeyError, ValueError) as error:
            fail("model.name", str(error).strip("'\""))
        if self.init.method not in INIT_METHODS:
            fail("init.method", f"{self.init.method!r} is not one of {INIT_METHODS}")
        if self.run.compile not in (True, False, "auto"):
            fail("run.compile", f"{self.run.compile!r} is not true, false or \"auto\"")
        if self.run.loss_every < 1:
            fail("run.loss_every", f"must be at least 1, got {self.run.loss_every}")
        if self.run.precision not in PRECISIONS:
            fail("run.precision", f"{self.run.precision!r} is not one of {PRECISIONS}")
        scale = self.data.scale
        if isinstance(scale, list) and (len(scale) != 2 or scale[0] > scale[1]):
            fail("data.scale", f"{scale} must be one size S or a range [S_min, S_max] with S_min <= S_max")
        if self.scale_range[0] < self.data.crop:
            fail("data.scale", f"S={self.scale_range[0]} is smaller than the {self.data.crop} px crop")
        if self.data.val_scale < self.data.crop:
            fail("data.val_scale", f"Q={self.data.val_scale} is smaller than the {self.data.crop} px crop")
        # The ranges the API and the CLI share (vggkit.utils.checks), under the recipe's key names.
        try:
            check_width("model.width", self.model.width)
            check_positive("optim.lr", self.optim.lr)
            check_side("data.crop", self.data.crop)
            for scale in self.scale_range + (self.data.val_scale,):
                check_side("data.scale" if scale != self.data.val_scale else "data.val_scale", scale)
        except ArgumentError as error:
            fail(error.argument, f"{error.requirement}, got {error.value}")
        positive = {"model.num_classes": self.model.num_classes, "optim.batch_size": self.optim.batch_size,
                    "schedule.epochs": self.schedule.epochs}
        for key, value in positive.items():
            if value <= 0:
                fail(key, f"must be positive, got {value}")
        non_negative = {"data.workers": self.data.workers, "schedule.max_steps": self.schedule.max_steps,
                        "schedule.max_drops": self.schedule.max_drops, "schedule.patience": self.schedule.patience,
                        "run.max_batch_per_gpu": self.run.max_batch_per_gpu,
                        "run.checkpoint_every": self.run.checkpoint_every, "data.pca_std": self.data.pca_std,
                        "optim.weight_decay": self.optim.weight_decay, "optim.momentum": self.optim.momentum}
        for key, value in non_negative.items():
            if value < 0:
                fail(key, f"must be >= 0, got {value}")
        if not 0 <= self.model.dropout < 1:
            fail("model.dropout", f"must be in [0, 1), got {self.model.dropout}")
        if not 0 < self.schedule.factor < 1:
            fail("schedule.factor", f"must be in (0, 1), got {self.schedule.factor}")
        if self.init.from_a and self.init.weights:
            fail("init", "set either from_a (pre-initialise from net A) or weights (start from a checkpoint), not both")


def find_recipe(path: str | os.PathLike) -> Path:
    """A recipe file: the path itself, else ``recipes/imagenet/<name>.toml``."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    named = RECIPE_DIR / f"{candidate.name.removesuffix('.toml')}.toml"
    if named.is_file():
        return named
    known = ", ".join(list_recipes()) or "none found"
    raise FileNotFoundError(f"Recipe not found: {path}. Give a TOML file, or one of the paper's recipes: {known}.")


def list_recipes() -> list[str]:
    """Names of the recipes shipped in recipes/imagenet/."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml")) if RECIPE_DIR.is_dir() else []


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """``["optim.lr=0.001", "data.scale=[256, 512]", "model.name=D"]`` applied to a recipe dict.

    A value is read as TOML (numbers, booleans, lists, quoted strings) and otherwise
    taken as a plain string. Keys are checked when the recipe is validated.
    """
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"Override {item!r} is not of the form section.key=value (e.g. optim.lr=0.001).")
        try:
            value = tomllib.loads(f"value = {raw.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        *sections, leaf = key.split(".")
        target = data
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ValueError(f"Override {item!r}: {section} is a value, not a section.")
        target[leaf] = value
    return data


def _build(cls, data: dict, source: str, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, dict):
        raise ValueError(f"{source}: [{prefix.rstrip('.')}] must be a table of keys, got {data!r}")
    values = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ValueError(f"{source}: unknown key '{prefix}{key}'{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = _build(kind, value, source, prefix=f"{prefix}{key}.")
        else:
            values[key] = _check_type(value, kind, f"{prefix}{key}", source)
    return cls(**values)


def _check_type(value, kind, key: str, source: str):
    allowed = typing.get_args(kind) or (kind,)
    for option in allowed:
        base = typing.get_origin(option) or option
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if base is list and isinstance(value, list):
            item = typing.get_args(option)[0]
            if all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                return value
        elif isinstance(value, base) and (base is bool or not isinstance(value, bool)):
            return value
    wanted = " or ".join(getattr(a, "__name__", str(a)) for a in allowed)
    raise ValueError(f"{source}: {key} must be {wanted}, got {value!r} ({type(value).__name__})")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
