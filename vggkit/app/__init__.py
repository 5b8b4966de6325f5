"""The teaching demo's computations (``demo``), its plots, ``vggkit info``, and finding and starting ``app.py``."""

from .._lazy import lazy_package

__getattr__ = lazy_package(__name__)
