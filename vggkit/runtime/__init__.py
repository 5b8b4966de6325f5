"""Where and how a network runs: device, precision and compile choices, and the fused CPU inference copy
(``optimize``). Knows nothing of VGG."""

from .._lazy import lazy_package

__getattr__ = lazy_package(__name__)
