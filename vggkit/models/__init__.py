"""The networks as ``nn.Module``: Table 1's configurations, ``VGG`` and its dense form, backbones, heads,
receptive fields and the 3x3-versus-7x7 stacks. Building from a name with random weights; no files."""

from .._lazy import lazy_package

__getattr__ = lazy_package(__name__)
