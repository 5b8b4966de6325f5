"""Every way to get a model from a name or a file: ``create_model``, ``load``, ``backbone``; the weight
layouts (vggkit, torchvision, timm, Caffe; Keras and Lightning files), the releases, and checkpoint reading
and validation."""

from .._lazy import lazy_package

__getattr__ = lazy_package(__name__)
