"""Table 1 of the paper as data: the six configurations, their names and aliases.

A configuration is five blocks; each block is a list of ``(out_channels, kernel_size)``
convolutions followed by a 2x2 max-pool. Config C ends blocks 3-5 with a 1x1 conv.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

Block = tuple[tuple[int, int], ...]


_C3 = lambda c: (c, 3)  # noqa: E731  a 3x3 conv, stride 1, padding 1


_C1 = lambda c: (c, 1)  # noqa: E731  a 1x1 conv, padding 0 (config C only)


# Table 1, column by column.
CONFIG_BLOCKS: dict[str, tuple[Block, ...]] = {
    "A": ((_C3(64),), (_C3(128),), (_C3(256),) * 2, (_C3(512),) * 2, (_C3(512),) * 2),
    "B": ((_C3(64),) * 2, (_C3(128),) * 2, (_C3(256),) * 2, (_C3(512),) * 2, (_C3(512),) * 2),
    "C": (
        (_C3(64),) * 2,
        (_C3(128),) * 2,
        (_C3(256), _C3(256), _C1(256)),
        (_C3(512), _C3(512), _C1(512)),
        (_C3(512), _C3(512), _C1(512)),
    ),
    "D": ((_C3(64),) * 2, (_C3(128),) * 2, (_C3(256),) * 3, (_C3(512),) * 3, (_C3(512),) * 3),
    "E": ((_C3(64),) * 2, (_C3(128),) * 2, (_C3(256),) * 4, (_C3(512),) * 4, (_C3(512),) * 4),
}


CONFIG_BLOCKS["A-LRN"] = CONFIG_BLOCKS["A"]


PAPER_CONFIGS = ("A", "A-LRN", "B", "C", "D", "E")


ALIASES = {"vgg11": "A", "vgg11_lrn": "A-LRN", "vgg13": "B", "vgg16c": "C", "vgg16": "D", "vgg19": "E"}


DEPTHS = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}


# AlexNet's local response normalisation, used after conv1_1 in A-LRN (section 2.3).
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


# Table 2: exact parameter counts with 1000 classes and no batch norm.
PAPER_PARAMETERS = {
    "A": 132_863_336,
    "A-LRN": 132_863_336,
    "B": 133_047_848,
    "C": 133_638_952,
    "D": 138_357_544,
    "E": 143_667_240,
}


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model name: the paper letter and whether convs are batch-normalised."""

    config: str
    batch_norm: bool

    @property
    def name(self) -> str:
        """The canonical alias, e.g. ``vgg16_bn`` for D with batch norm."""
        alias = next(a for a, c in ALIASES.items() if c == self.config)
        return alias + ("_bn" if self.batch_norm else "")

    @property
    def blocks(self) -> tuple[Block, ...]:
        return CONFIG_BLOCKS[self.config]

    @property
    def lrn(self) -> bool:
        return self.config == "A-LRN"


def list_models() -> list[str]:
    """Every accepted model name: the paper letters, then the aliases and their ``_bn`` variants."""
    names = list(PAPER_CONFIGS)
    for alias in ALIASES:
        names += [alias, alias + "_bn"]
    return names


def _lookup_table() -> dict[str, ModelSpec]:
    table: dict[str, ModelSpec] = {}
    for letter in PAPER_CONFIGS:
        for key in {letter.lower(), letter.lower().replace("-", "_")}:
            table[key] = ModelSpec(letter, False)
            table[key + "_bn"] = ModelSpec(letter, True)
    for alias, letter in ALIASES.items():
        table[alias] = ModelSpec(letter, False)
        table[alias + "_bn"] = ModelSpec(letter, True)
    return table


_LOOKUP = _lookup_table()


def resolve(name: str) -> ModelSpec:
    """Resolve a model name, case-insensitively: ``"D"``, ``"vgg16"``, ``"VGG16_BN"``, ``"a-lrn"``.

    An unknown name raises ``ValueError`` that suggests the closest valid names.
    """
    if isinstance(name, ModelSpec):
        return name
    key = str(name).strip().lower().replace("-", "_")
    if key in _LOOKUP:
        return _LOOKUP[key]
    valid = list_models()
    close = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.4) or difflib.get_close_matches(
        key, list(_LOOKUP), n=3, cutoff=0.4
    )
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"Unknown VGG model {name!r}.{hint} Valid names: {', '.join(valid)}.")


def layer_names(name: str) -> list[str]:
    """The named layers of a configuration in forward order: conv1_1 ... pool5, fc6, fc7, fc8."""
    spec = resolve(name)
    names: list[str] = []
    for b, block in enumerate(spec.blocks, start=1):
        names += [f"conv{b}_{i}" for i in range(1, len(block) + 1)]
        if b == 1 and spec.lrn:
            names.append("lrn1")
        names.append(f"pool{b}")
    return names + ["fc6", "fc7", "fc8"]


PRE_ACTIVATION = "_pre"  # conv3_3_pre: conv3_3's ReLU input (after its batch norm where there is one)


def tap_names(name: str) -> list[str]:
    """Every name a backbone can read, in forward order: ``layer_names`` with each conv's
    ``convB_I_pre`` (before its ReLU) just before ``convB_I`` (after it)."""
    names: list[str] = []
    for layer in layer_names(name):
        if layer.startswith("conv"):
            names.append(layer + PRE_ACTIVATION)
        names.append(layer)
    return names


def activation_of(tap: str) -> str:
    """The layer a tap belongs to: ``conv5_4_pre`` -> ``conv5_4``; other names unchanged."""
    return tap[: -len(PRE_ACTIVATION)] if tap.endswith(PRE_ACTIVATION) else tap
