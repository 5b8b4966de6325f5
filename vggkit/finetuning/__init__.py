"""Transfer learning on a folder of images: ``finetune`` with heads, strategies and a feature cache."""

from .._lazy import lazy_package

__getattr__ = lazy_package(__name__)
