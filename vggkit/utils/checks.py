"""Argument ranges, checked in one place for the Python API and the command line.

Each check raises ``ArgumentError`` (a ``ValueError``) naming the argument, the value
and the range. The API shows ``width=inf: ...``; the CLI shows the same error in its
own spelling (``--width inf: ...``), and uses ``argparse_type`` to refuse a value
while parsing, before any work. No torch here: the CLI imports this module for --help.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterable

MIN_WIDTH = 1 / 64  # conv1's 64 channels become one; thinner networks are all rounding


MAX_WIDTH = 4.0  # vgg16 at width 4 holds 2.2 G parameters; wider is a typo, not an experiment


MIN_SIDE = 32  # the five 2x2 max-poolings need at least 32 px


MAX_SIDE = 2048  # a 2048 px side already needs ~1 GiB per conv1 map in float32; larger is a typo


SIDE_REASON = ("the five 2x2 max-poolings need at least 32 px (224 is the paper's, 384 and up give the dense form; "
               "vggkit info --input-size N shows every layer's size)")


MAX_SEED = 2**32 - 1  # numpy's seed range, the narrowest of the RNGs a run seeds (torch, numpy, Python)


MAX_COUNT = 2**53  # counts with no natural bound (steps, epochs): the largest whole number JSON and float64 hold exactly


RANDOM_INIT_SEED = 0  # random initialisation without a seed of the caller's own: one network per process and run


class ArgumentError(ValueError):
    """An argument outside its range. ``argument`` is its API name, ``requirement`` the range in words."""

    def __init__(self, argument: str, value, requirement: str) -> None:
        self.argument, self.value, self.requirement = argument, value, requirement
        super().__init__(f"{argument}={value!r}: {requirement}.")


def _number(argument: str, value, kind: type = float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise ArgumentError(argument, value, "must be " + ("a whole number" if kind is int else "a number"))
    if not math.isfinite(value):
        raise ArgumentError(argument, value, "must be a finite number")
    return value


def check_int(argument: str, value, minimum: int, maximum: int | None = None, why: str = "") -> int:
    """A whole number in ``[minimum, maximum]``."""
    _number(argument, value, int)
    if value < minimum or (maximum is not None and value > maximum):
        span = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ArgumentError(argument, value, f"must be {span}{' (' + why + ')' if why else ''}")
    return int(value)


def check_positive(argument: str, value, why: str = "") -> float:
    """A finite number above 0 (learning rates, scales of them)."""
    _number(argument, value)
    if not value > 0:
        raise ArgumentError(argument, value, f"must be a finite number above 0{' (' + why + ')' if why else ''}")
    return float(value)


def check_range(argument: str, value, low: float, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False, why: str = "") -> float:
    """A finite number in the interval from ``low`` to ``high`` (closed unless ``low_open``/``high_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentError(argument, value, "must be a number")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):  # nan fails every comparison; inf is named too
        span = (f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}" if math.isfinite(high)
                else f"a finite number {'>' if low_open else '>='} {low:g}")
        raise ArgumentError(argument, value, f"must be {span}{' (' + why + ')' if why else ''}")
    return float(value)


def check_seed(argument: str, value) -> int:
    """A seed every RNG takes: a whole number from 0 to 2**32 - 1, the same rule for the API and the CLI."""
    return check_int(argument, value, 0, MAX_SEED, why="numpy's seed range; any seed in it is as good as another")


def check_path(argument: str, value) -> str | os.PathLike:
    """A file or folder name: a ``str`` or ``os.PathLike`` (``pathlib.Path``), not empty."""
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ArgumentError(argument, value, f"must be a path (a str or pathlib.Path), not "
                                             f"{'an empty str' if value == '' else type(value).__name__}")
    return value


def check_flag(argument: str, value) -> bool:
    """``True`` or ``False``; a str such as "false" would otherwise count as true."""
    if not isinstance(value, bool):
        raise ArgumentError(argument, value, f"must be True or False, not {type(value).__name__}")
    return value


def check_width(argument: str, value) -> float:
    """The channel multiplier: finite, in [1/64, 4]."""
    _number(argument, value)
    if not MIN_WIDTH <= value <= MAX_WIDTH:
        raise ArgumentError(argument, value, f"must be a channel multiplier between 1/64 ({MIN_WIDTH:.4f}: conv1 "
                                             f"keeps one channel) and {MAX_WIDTH:g}, such as 0.25 or 1.0")
    return float(value)


def check_num_classes(argument: str, value, minimum: int = 1) -> int:
    """At least ``minimum`` classes (2 for a classifier that is trained)."""
    why = "a classifier learns to tell at least two classes apart" if minimum >= 2 else ""
    return check_int(argument, value, minimum, why=why)


def check_side(argument: str, value) -> int:
    """An image side in pixels that the network can take: [32, 2048]."""
    _number(argument, value, int)
    if value < MIN_SIDE:
        raise ArgumentError(argument, value, f"is too small: {SIDE_REASON}")
    if value > MAX_SIDE:
        raise ArgumentError(argument, value, f"must be at most {MAX_SIDE} px (a larger side runs out of memory)")
    return int(value)


def check_sides(argument: str, values: Iterable) -> list[int]:
    sides = [check_side(argument, value) for value in values]
    if not sides:
        raise ArgumentError(argument, [], "give at least one scale")
    return sides


def check_fraction(argument: str, value) -> float:
    """A share strictly between 0 and 1."""
    _number(argument, value)
    if not 0 < value < 1:
        raise ArgumentError(argument, value, "must be between 0 and 1 (exclusive), e.g. 0.2: each class keeps "
                                             "images on both sides of the split")
    return float(value)


def check_choice(argument: str, value, choices: Iterable) -> object:
    choices = tuple(choices)
    if value not in choices:
        raise ArgumentError(argument, value, f"must be one of {', '.join(map(str, choices))}")
    return value


def check_device(argument: str, value):
    """A device this machine has: ``cuda`` needs a CUDA GPU. Returns a ``torch.device``."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ArgumentError(argument, value, f"is not a device ({error}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(argument, value, "this machine has no CUDA GPU (or PyTorch was built without CUDA); "
                                                 "use cpu, or leave the device out to pick one")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ArgumentError(argument, value, f"this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def argparse_type(check: Callable, kind: type = float) -> Callable[[str], object]:
    """An argparse ``type=`` that parses ``kind`` and applies ``check(value)``; the message is the range only."""
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}"
                                             ) from None
        try:
            return check(value)
        except ArgumentError as error:
            raise argparse.ArgumentTypeError(f"{text}: {error.requirement}") from None

    parse.__name__ = getattr(check, "__name__", "value")
    return parse
