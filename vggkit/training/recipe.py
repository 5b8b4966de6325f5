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
from dataclasses import InitVar, dataclass, field
from pathlib import Path

from ..utils.checks import (
    MAX_COUNT,
    ArgumentError,
    check_choice,
    check_int,
    check_range,
    check_seed,
    check_side,
    check_width,
)
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


MAX_CLASSES = 1_000_000  # fc8 then holds 4 G weights; more is a typo, not a data set


MAX_BATCH = 2**20  # a global batch of a million images is already 4,000 of the paper's


MAX_WORKERS = 1024  # loader processes per GPU; each holds a copy of the dataset's file list


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
    source: InitVar[str] = "recipe"  #: where the values come from, for the messages (a file, "recipe")

    def __post_init__(self, source: str) -> None:
        self.validate(source)

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
        """A recipe from nested dicts (a parsed TOML file), validated."""
        return _build(cls, data, source, prefix="", init={"source": source})

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
        """Every value checked, types then ranges: a ``ValueError`` naming the key, the range and the value.

        Construction runs it, so a ``Recipe`` built in Python, a TOML file and ``--set`` are checked alike.
        """
        _check_types(self, source)
        try:
            _check_model_and_data(self, source)
            _check_optimisation(self, source)
        except ArgumentError as error:
            raise ValueError(f"{source}: {error.argument}: {error.requirement}, got {error.value!r}") from None


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
    check_overrides(overrides)
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


def check_overrides(overrides) -> list[str]:
    """``overrides`` as a list of str; a single str (iterated, it would be one override per character) or any
    other type is a one-line ``ValueError`` that shows the list to pass."""
    if isinstance(overrides, str):
        raise ValueError(f"overrides={overrides!r} is a str; pass a list of section.key=value strings: "
                         f"overrides=[{overrides!r}].")
    if not isinstance(overrides, (list, tuple)):
        raise ValueError(f"overrides must be a list of section.key=value strings such as ['optim.lr=0.001'], "
                         f"got {type(overrides).__name__}.")
    for index, item in enumerate(overrides):
        if not isinstance(item, str):
            raise ValueError(f"overrides[{index}]={item!r} ({type(item).__name__}) is not a section.key=value str "
                             f"such as 'optim.lr=0.001'.")
    return list(overrides)


def _build(cls, data: dict, source: str, prefix: str, init: dict | None = None):
    """``cls`` from a dict: unknown keys named with the closest valid one, every value's type checked."""
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
    return cls(**values, **(init or {}))


def _check_type(value, kind, key: str, source: str):
    allowed = typing.get_args(kind) or (kind,)
    for option in allowed:
        base = typing.get_origin(option) or option
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if base is list and isinstance(value, (list, tuple)):  # a tuple from Python, a list from TOML
            item = typing.get_args(option)[0]
            if all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                return list(value)
        elif isinstance(value, base) and (base is bool or not isinstance(value, bool)):
            return value
    wanted = " or ".join(getattr(a, "__name__", str(a)) for a in allowed)
    raise ValueError(f"{source}: {key} must be {wanted}, got {value!r} ({type(value).__name__})")


def _check_types(recipe: Recipe, source: str) -> None:
    """Each section a section (a dict is built into one) and each value of its declared type; ints become
    floats where a float is declared. Raises a ``ValueError`` naming the key and the type wanted."""
    hints = typing.get_type_hints(Recipe)
    for item in dataclasses.fields(recipe):
        value, kind = getattr(recipe, item.name), hints[item.name]
        if not dataclasses.is_dataclass(kind):
            setattr(recipe, item.name, _check_type(value, kind, item.name, source))
            continue
        if isinstance(value, dict):
            value = _build(kind, value, source, prefix=f"{item.name}.")
        elif not isinstance(value, kind):
            raise ValueError(f"{source}: [{item.name}] must be {kind.__name__}(...) or a dict of its keys, got "
                             f"{type(value).__name__}")
        section_hints = typing.get_type_hints(kind)
        for key in dataclasses.fields(kind):  # built in Python, a section skipped _build's checks
            setattr(value, key.name, _check_type(getattr(value, key.name), section_hints[key.name],
                                                 f"{item.name}.{key.name}", source))
        setattr(recipe, item.name, value)


def _check_model_and_data(recipe: Recipe, source: str) -> None:
    """The model, init and data sections' ranges: an ``ArgumentError`` under the recipe's key name, or a
    ``ValueError`` naming ``source`` and the key where the value alone does not say what is wrong."""
    from ..models.configs import resolve

    model, data = recipe.model, recipe.data
    try:
        resolve(model.name)
    except (KeyError, ValueError) as error:
        raise ValueError(f"{source}: model.name: {str(error).strip(chr(39) + chr(34))}") from None
    _check_count("model.num_classes", model.num_classes, 2, MAX_CLASSES,
              why="a classifier tells at least 2 classes apart")
    check_width("model.width", model.width)
    check_range("model.dropout", model.dropout, 0, 1, high_open=True, why="the share of fc6/fc7 units dropped; "
                                                                            "the paper's 0.5")
    if recipe.init.method not in INIT_METHODS:
        raise ValueError(f"{source}: init.method: {recipe.init.method!r} is not one of {INIT_METHODS}")
    if recipe.init.from_a and recipe.init.weights:
        raise ValueError(f"{source}: init: set either from_a (pre-initialise from net A) or weights (start from a "
                         f"checkpoint), not both")
    scale = data.scale
    if isinstance(scale, list) and (len(scale) != 2 or scale[0] > scale[1]):
        raise ValueError(f"{source}: data.scale: {scale} must be one size S or a range [S_min, S_max] with "
                         f"S_min <= S_max, such as [256, 512]")
    s_min, s_max = recipe.scale_range
    for side in (s_min, s_max):
        check_side("data.scale", side)
    check_side("data.crop", data.crop)
    if s_min < data.crop:  # the random crop must fit in the rescaled image
        raise ValueError(f"{source}: data.scale: S={s_min} is smaller than the {data.crop} px crop; set S >= "
                         f"{data.crop} or a smaller data.crop")
    check_side("data.val_scale", data.val_scale)
    if data.val_scale < data.crop:
        raise ValueError(f"{source}: data.val_scale: Q={data.val_scale} is smaller than the {data.crop} px crop; "
                         f"set Q >= {data.crop} or a smaller data.crop")
    check_range("data.pca_std", data.pca_std, 0, 10, why="AlexNet's colour shift is 0.1; 0 turns it off")
    _check_count("data.workers", data.workers, 0, MAX_WORKERS)


def _check_optimisation(recipe: Recipe, source: str) -> None:
    """The optim, schedule, run and target sections' ranges; an ``ArgumentError`` under the key name (a
    ``ValueError`` naming ``source`` for run.compile, whose choices mix a bool and a str)."""
    optim, schedule, run = recipe.optim, recipe.schedule, recipe.run
    _check_count("optim.batch_size", optim.batch_size, 1, MAX_BATCH)
    check_range("optim.lr", optim.lr, 0, low_open=True, why="the paper's is 0.01")
    check_range("optim.momentum", optim.momentum, 0, 1, high_open=True,
                why="the paper's 0.9; at 1 or more the update never forgets a gradient and diverges")
    check_range("optim.weight_decay", optim.weight_decay, 0, why="the paper's 5e-4; 0 turns it off")
    _check_count("schedule.epochs", schedule.epochs, 1, MAX_COUNT)
    check_range("schedule.factor", schedule.factor, 0, 1, low_open=True, high_open=True,
                why="the lr is multiplied by it at a plateau; the paper's 0.1")
    _check_count("schedule.patience", schedule.patience, 0, MAX_COUNT)
    # Validation top-1 accuracy is a share: 1 or more would never count as an improvement.
    check_range("schedule.threshold", schedule.threshold, 0, 1, high_open=True,
                why="a share of top-1 accuracy: 0.001 is 0.1 percentage point")
    _check_count("schedule.max_drops", schedule.max_drops, 0, MAX_COUNT)
    _check_count("schedule.max_steps", schedule.max_steps, 0, MAX_COUNT)
    check_seed("run.seed", run.seed)
    check_choice("run.precision", run.precision, PRECISIONS)
    if run.compile not in (True, False, "auto"):
        raise ValueError(f"{source}: run.compile: {run.compile!r} is not true, false or \"auto\"")
    _check_count("run.max_batch_per_gpu", run.max_batch_per_gpu, 0, MAX_BATCH)
    _check_count("run.checkpoint_every", run.checkpoint_every, 0, MAX_COUNT)
    _check_count("run.loss_every", run.loss_every, 1, MAX_COUNT)
    for key in ("top1_error", "top5_error"):
        check_range(f"target.{key}", getattr(recipe.target, key), 0, 100, why="a percentage; 0 when unknown")


def _check_count(key: str, value: int, minimum: int, maximum: int, why: str = "") -> int:
    """A whole number in ``[minimum, maximum]``, said as recipe keys say it ("must be positive, at most N")."""
    try:
        return check_int(key, value, minimum, maximum)
    except ArgumentError:
        least = {0: ">= 0", 1: "positive"}.get(minimum, f"at least {minimum}")
        raise ArgumentError(key, value, f"must be {least}, at most {maximum:,}{' (' + why + ')' if why else ''}"
                            ) from None


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
