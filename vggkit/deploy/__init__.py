"""Deployment: ``export`` a model (a name, a checkpoint, a module or an optimized copy) to ONNX or to a
``torch.export`` program (.pt2), each export checked against PyTorch on a photograph."""

from .._lazy import lazy_package

__getattr__ = lazy_package(__name__)
