"""The paper's ImageNet training: recipes (TOML), the loop (one process or torchrun DDP), the step."""

from .._lazy import lazy_package

__getattr__ = lazy_package(__name__)
