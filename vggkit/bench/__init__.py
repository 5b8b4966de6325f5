"""``vggkit bench``: vggkit beside torchvision, timm and plain PyTorch loops, on the CPU (``cpu``)
and on a GPU (``gpu``, with the training and evaluation rows), against the measured matmul peak."""

from .._lazy import lazy_package

__getattr__ = lazy_package(__name__)
