"""Features for other tasks: ``extract_features`` and linear probes, perceptual and style losses, LPIPS."""

from .._lazy import lazy_package

__getattr__ = lazy_package(__name__)
