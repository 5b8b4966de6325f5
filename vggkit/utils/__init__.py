"""Plumbing every other subpackage may use and that uses none of them: argument checks, the pixel limit,
path checks, atomic writes, the names the API and CLI accept, and the training plots."""

from .._lazy import lazy_package

__getattr__ = lazy_package(__name__)
