"""Images in, tensors out: loading and checking images, scanning class folders and their splits,
the paper's transforms, weights' preprocessing, device decoding, batch augmentation and the training pipeline."""

from .._lazy import lazy_package

__getattr__ = lazy_package(__name__, {"load_image": "images", "ImageError": "images"})
