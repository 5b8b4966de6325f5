"""The paper's test protocols (centre crop, dense, multi-crop, several scales), ``evaluate`` on
class folders and ``predict`` on image files."""

from .._lazy import lazy_package

__getattr__ = lazy_package(__name__)
