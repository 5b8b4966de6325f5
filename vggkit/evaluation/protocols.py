"""The paper's test protocols (section 3.2) on one image: centre crop, dense, multi-crop; class score maps.

Every protocol starts from uint8 RGB views that are decoded and rescaled once
(``ProtocolViews``), normalises them with the weights' own ``Preprocess`` on the
device, and runs an ``InferenceNetworks``: the model's classifier and its
fully-convolutional form, which share one set of parameters.

- centre: shortest side to ``preprocess.resize_size``, centre crop 224, classifier.
- dense: shortest side to Q, the fully-convolutional net on the whole image, the
  class score map averaged spatially; softmax averaged over the image and its
  horizontal flip, then over the scales.
- multi-crop: shortest side to Q, a 5x5 grid of 224x224 crops x 2 flips (50 per
  scale), softmax averaged over crops and scales.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import functional as TF

from ..data.device_decode import resize_all
from ..data.images import load_image, rescale_shortest, rescaled_wh
from ..data.preprocess import IMAGENET, Preprocess
from ..data.transforms import grid_offsets
from ..models.vgg import VGG, FullyConvVGG
from ..runtime.engine import OptimizedModel, Runtime, optimize
from ..utils.checks import check_side

CROP = 224  # the training crop: fc6 sees exactly a 7x7 window of pool5


GRID = 5  # multi-crop: a 5x5 grid of crops per scale


PAPER_SCALES = (256, 384, 512)  # Q for scale-jittered training, S in [256, 512] (Tables 4 and 5)


HELD_PASSES = 8  # multi-crop cuts the crops of 8 passes at once (uint8: 150 KB a crop), at least one image's


ImageSource = str | os.PathLike | Image.Image | np.ndarray


@dataclass(frozen=True)
class InferenceNetworks:
    """A VGG in eval mode, its fully-convolutional form (same parameters), its runtime and preprocessing.

    ``dense`` is None for a model with another head than the paper's fc6-fc8 (a
    fine-tuning "linear" or "mlp" head): the centre and multi-crop protocols still run.
    ``run_classifier`` / ``run_dense`` are what the forward passes call: the modules
    themselves, or their ``torch.compile`` where the runtime compiles.
    """

    classifier: VGG
    dense: FullyConvVGG | None
    runtime: Runtime
    preprocess: Preprocess
    run_classifier: Callable[[torch.Tensor], torch.Tensor] | None = None
    run_dense: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        """uint8 RGB (N, 3, H, W) -> the network's float32 input (N, 3, H, W) on the runtime's device."""
        x = rgb.to(self.runtime.device, non_blocking=True).float().div_(255)
        return self.preprocess.normalize(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised crops (N, 3, 224, 224) -> float32 logits (N, classes)."""
        with torch.inference_mode():
            classifier = self.classifier if self.run_classifier is None else self.run_classifier
            return classifier(self.runtime.input(x)).float()

    def require_dense(self) -> FullyConvVGG:
        """The fully-convolutional form, or a clear error for a model without the paper's head."""
        if self.dense is None:
            raise ValueError("This model's head is not the paper's fc6-fc8 classifier, so it has no "
                             "fully-convolutional form: use the centre or multi-crop protocol.")
        return self.dense

    def score_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, 3, H, W), H, W >= 224 -> float32 fc8 maps (N, classes, H/32-6, W/32-6)."""
        dense = self.require_dense() if self.run_dense is None else self.run_dense
        with torch.inference_mode():
            return dense(self.runtime.input(x)).float()


def on_torch(model: nn.Module) -> nn.Module:
    """``model``, or for an onnxruntime ``OptimizedModel`` the torch copy of its source at the same precision:
    the protocols run the dense form and many image sizes, which one fixed-size ONNX session cannot."""
    if isinstance(model, OptimizedModel) and model.runtime.backend != "torch":
        return optimize(model.source, model.runtime.precision, model.runtime.device, backend="torch")
    return model


def as_vgg(model: nn.Module) -> VGG:
    """The VGG inside ``model`` (itself, or an ``OptimizedModel``'s copy); a clear error otherwise."""
    inner = model
    if isinstance(model, OptimizedModel):
        inner = model.model if model.runtime.backend == "torch" else model.source
    if not isinstance(inner, VGG):
        raise TypeError(f"Expected a vggkit VGG (vggkit.create_model) or vggkit.optimize(...) of one, "
                        f"got {type(model).__name__}.")
    return inner


@contextlib.contextmanager
def inference_networks(model: nn.Module, precision: str | None = None, device: str | torch.device | None = None,
                       compile: bool | str = False, long_job: bool = False) -> Iterator[InferenceNetworks]:
    """Run ``model`` for evaluation inside a ``with`` block.

    ``precision=None`` runs the model as it is (its device and dtype, no copy), in eval
    mode for the block only: every module's train/eval flag is restored afterwards.
    ``precision="auto"|"fp32"|"bf16"|"fp16"`` runs an inference copy under
    ``vggkit.runtime`` instead, compiled as ``compile`` says (``"auto"``: a ``long_job``
    on CUDA or a bf16 CPU). A ``vggkit.optimize`` model runs under its own runtime.
    The model's parameters are never changed.
    """
    model = on_torch(model)
    vgg = as_vgg(model)
    if isinstance(model, OptimizedModel):
        runtime = model.runtime
    elif precision is not None:
        fast = optimize(vgg, precision, device, compile, long_job, backend="torch")  # sizes vary per scale
        vgg, runtime = fast.model, fast.runtime
    else:
        parameter = next(vgg.parameters())
        runtime = Runtime(parameter.device, parameter.dtype, channels_last=False)
    flags = {module: module.training for module in vgg.modules()}
    try:
        vgg.eval()
        has_paper_head = all(hasattr(vgg.classifier, layer) for layer in ("fc6", "fc7", "fc8"))
        dense = vgg.to_fully_conv().eval() if has_paper_head else None
        compiled = {}
        if runtime.compile:  # shapes vary (dense sizes, last batches): recompiled once, then dynamic
            compiled = {"run_classifier": torch.compile(vgg),
                        "run_dense": torch.compile(dense) if dense is not None else None}
        yield InferenceNetworks(vgg, dense, runtime, vgg.preprocess or IMAGENET, **compiled)
    finally:
        for module, training in flags.items():
            module.training = training


def check_scales(scales: int | Sequence[int]) -> tuple[int, ...]:
    """One Q or several -> a tuple; each must be an integer >= 224 (the fully-convolutional net's minimum)."""
    scales = (scales,) if isinstance(scales, (int, np.integer)) else tuple(scales)
    if not scales:
        raise ValueError("No test scale given; pass one Q or several, e.g. scales=(256, 384, 512).")
    for scale in scales:
        if not isinstance(scale, (int, np.integer)) or scale < CROP:
            raise ValueError(f"Test scale Q={scale!r} must be an integer >= {CROP} "
                             f"(the shortest side must hold a {CROP} px crop).")
    return tuple(check_side("scales", int(s)) for s in scales)


def rescaled_shape(width: int, height: int, scale: int) -> tuple[int, int]:
    """The tensor shape (H, W) ``rescaled_view`` gives a ``width`` x ``height`` image: the shortest side
    becomes ``scale``, the other keeps the aspect ratio (``data.images.rescaled_wh``, in tensor order)."""
    new_width, new_height = rescaled_wh(width, height, scale)
    return new_height, new_width


def rescaled_view(image: Image.Image, scale: int) -> torch.Tensor:
    """Isotropic rescale to shortest side ``scale`` (small images upscaled) -> uint8 (3, H, W)."""
    return TF.pil_to_tensor(rescale_shortest(image, scale))


def center_view(image: Image.Image, preprocess: Preprocess) -> torch.Tensor:
    """The weights' own resize + centre crop, as ``Preprocess.__call__`` does -> uint8 (3, crop, crop)."""
    return TF.pil_to_tensor(TF.center_crop(rescale_shortest(image, preprocess.resize_size), preprocess.input_size))


class ProtocolViews:
    """RGB PIL image -> ``{"center": uint8 (3, 224, 224) | None, "scaled": [uint8 (3, H_q, W_q) per Q]}``.

    Everything the requested protocols need from one decode of the file.
    """

    def __init__(self, scales: Sequence[int] = (), center: Preprocess | None = None) -> None:
        self.scales = tuple(scales)
        self.center = center

    def __call__(self, image: Image.Image) -> dict:
        return {"center": center_view(image, self.center) if self.center is not None else None,
                "scaled": [rescaled_view(image, scale) for scale in self.scales]}


def device_views(images: Sequence[torch.Tensor], scales: Sequence[int] = (),
                 center: Preprocess | None = None) -> list[dict]:
    """uint8 RGB (3, H, W) images on the device -> ``ProtocolViews``' dict per image, made on the device.

    Images of one size are rescaled together (``device_decode.resize_all``).
    """
    scaled = [resize_all(images, scale) for scale in scales]
    centers = ([TF.center_crop(view, center.input_size) for view in resize_all(images, center.resize_size)]
               if center is not None else [None] * len(images))
    return [{"center": centers[i], "scaled": [per_scale[i] for per_scale in scaled]} for i in range(len(images))]


def grid_crops(image: torch.Tensor, crop: int = CROP, grid: int = GRID, flip: bool = True) -> torch.Tensor:
    """A ``grid`` x ``grid`` regular grid of crops of ``image`` (C, H, W), row by row, then their mirror images.

    -> (grid * grid * (2 if flip else 1), C, crop, crop). A side of exactly ``crop``
    pixels gives the same crop at every position along it.
    """
    return grid_crops_batch(image[None], crop, grid, flip)[0]


def grid_crops_batch(images: torch.Tensor, crop: int = CROP, grid: int = GRID, flip: bool = True) -> torch.Tensor:
    """``grid_crops`` of every image of (N, C, H, W) -> (N, grid * grid * (2 if flip else 1), C, crop, crop).

    One gather on the images' device: no work per crop on the host.
    """
    height, width = images.shape[-2:]
    if min(height, width) < crop:
        raise ValueError(f"Image of {height}x{width} is smaller than the {crop} px crop; rescale it first.")
    span = torch.arange(crop, device=images.device)
    rows = torch.tensor(grid_offsets(height, crop, grid), device=images.device)[:, None] + span  # (grid, crop)
    columns = torch.tensor(grid_offsets(width, crop, grid), device=images.device)[:, None] + span
    # (N, C, grid, grid, crop, crop): crop (i, j) is rows[i] x columns[j]
    crops = images[:, :, rows[:, None, :, None], columns[None, :, None, :]]
    crops = crops.permute(0, 2, 3, 1, 4, 5).reshape(len(images), grid * grid, images.shape[1], crop, crop)
    return torch.cat([crops, crops.flip(-1)], dim=1) if flip else crops


def by_shape(images: Sequence[torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    """Indices of ``images`` grouped by shape, in first-seen order: the buckets that run as one batch."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    return groups


def center_probabilities(nets: InferenceNetworks, crops: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """uint8 centre crops (N, 3, 224, 224) -> softmax (N, classes) on the CPU."""
    return torch.cat([nets.logits(nets.normalize(chunk)).softmax(-1).cpu() for chunk in crops.split(batch_size)])


def flip_score_maps(nets: InferenceNetworks, view: torch.Tensor, flip: bool) -> torch.Tensor:
    """uint8 (3, H, W) -> fc8 maps (1 or 2, classes, h, w) of the image and of its mirror image flipped back."""
    return batch_score_maps(nets, view[None], flip)[:, 0]


def batch_score_maps(nets: InferenceNetworks, views: torch.Tensor, flip: bool) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> fc8 maps (1 or 2, N, classes, h, w): the images', then their mirror images'
    flipped back. The images and their mirror images go through the network as one batch."""
    x = nets.normalize(views)
    if not flip:
        return nets.score_maps(x)[None]
    maps = nets.score_maps(torch.cat([x, x.flip(-1)]))
    return torch.stack([maps[:len(x)], maps[len(x):].flip(-1)])


def dense_probabilities(nets: InferenceNetworks, views: Sequence[torch.Tensor], flip: bool = True) -> torch.Tensor:
    """uint8 rescaled images (3, H_q, W_q), one per Q -> dense softmax (classes,) on the CPU."""
    return dense_probabilities_batch(nets, [views], flip)[0]


def dense_probabilities_batch(nets: InferenceNetworks, views: Sequence[Sequence[torch.Tensor]], flip: bool = True,
                              batch_size: int = 50) -> torch.Tensor:
    """Per image, uint8 rescaled images (3, H_q, W_q), one per Q -> dense softmax (N, classes) on the CPU.

    Per Q the class score map is averaged spatially; softmax averaged over the flips,
    then over Q. Images of one rescaled size run together with their mirror images,
    as many per pass as hold the pixels of ``batch_size`` 224 crops; sizes are never
    padded (padding would change the borders' scores).
    """
    per_scale = torch.zeros(len(views[0]), len(views), nets.num_classes)  # (Q, N, classes)
    for q in range(len(views[0])):
        for shape, members in by_shape([image_views[q] for image_views in views]).items():
            passes = (2 if flip else 1) * shape[1] * shape[2]
            per_pass = max(1, batch_size * CROP * CROP // passes)
            for start in range(0, len(members), per_pass):
                chunk = members[start:start + per_pass]
                maps = batch_score_maps(nets, torch.stack([views[i][q] for i in chunk]), flip)
                per_scale[q, chunk] = maps.mean(dim=(3, 4)).softmax(-1).mean(0).cpu()
    return per_scale.mean(0)


def multicrop_probabilities(nets: InferenceNetworks, views: Sequence[torch.Tensor], flip: bool = True,
                            batch_size: int = 50) -> torch.Tensor:
    """uint8 rescaled images, one per Q -> multi-crop softmax (classes,) on the CPU."""
    return multicrop_probabilities_batch(nets, [views], flip, batch_size)[0]


def multicrop_probabilities_batch(nets: InferenceNetworks, views: Sequence[Sequence[torch.Tensor]],
                                  flip: bool = True, batch_size: int = 50) -> torch.Tensor:
    """Per image, uint8 rescaled images, one per Q -> multi-crop softmax (N, classes) on the CPU.

    50 crops per Q (25 with ``flip=False``), cut on the views' device from every image
    of one size at once, and run ``batch_size`` crops per pass across images; every
    scale has the same number of crops, so the mean over all crops is the mean over Q.
    """
    scales, per_view = len(views[0]), GRID * GRID * (2 if flip else 1)
    per_group = max(1, HELD_PASSES * batch_size // (scales * per_view))
    probabilities = []
    for first in range(0, len(views), per_group):
        group = views[first:first + per_group]
        sample = group[0][0]
        crops = torch.empty(len(group), scales, per_view, 3, CROP, CROP, dtype=sample.dtype, device=sample.device)
        for q in range(scales):
            for members in by_shape([image_views[q] for image_views in group]).values():
                crops[members, q] = grid_crops_batch(torch.stack([group[i][q] for i in members]), flip=flip)
        scores = torch.cat([nets.logits(nets.normalize(chunk)).softmax(-1)
                            for chunk in crops.flatten(0, 2).split(batch_size)])
        probabilities.append(scores.view(len(group), scales * per_view, -1).mean(1).cpu())
    return torch.cat(probabilities)


def dense_score_maps(model: nn.Module, image: ImageSource, scales: int | Sequence[int] = PAPER_SCALES,
                     flip: bool = True) -> list[torch.Tensor]:
    """The fc8 maps of the dense evaluation, computed once: one float32 CPU tensor per Q of
    shape (F, classes, h, w), F = 2 with ``flip`` (the mirror image's map flipped back), else 1.

    ``dense_probabilities_from_maps`` and ``heatmap_from_maps`` turn them into the
    prediction and a class's heatmap with no further forward pass.
    """
    scales, image = check_scales(scales), load_image(image)
    with inference_networks(model) as nets:
        return [flip_score_maps(nets, rescaled_view(image, q), flip).float().cpu() for q in scales]


def dense_probabilities_from_maps(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-Q maps (F, classes, h, w) -> softmax (classes,): spatial mean, softmax, mean over flips, then Q."""
    return torch.stack([m.mean(dim=(2, 3)).softmax(-1).mean(0) for m in maps]).mean(0)


def heatmap_from_maps(maps: Sequence[torch.Tensor], class_index: int, size: tuple[int, int]) -> np.ndarray:
    """Per-Q maps (F, classes, h, w) -> one class's softmax-probability map (H, W) = ``size``, float32.

    Per Q the probability map is averaged over flips and upsampled bilinearly; then averaged over Q.
    """
    classes = maps[0].shape[1]
    if not 0 <= class_index < classes:
        raise ValueError(f"class_index {class_index} is out of range for a {classes}-class model.")
    heatmap = torch.zeros(size)
    for m in maps:
        probability = m.softmax(1)[:, class_index].mean(0)
        heatmap += F.interpolate(probability[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return (heatmap / len(maps)).numpy().astype(np.float32)


def dense_predict(model: nn.Module, image: ImageSource, scales: int | Sequence[int] = PAPER_SCALES,
                  flip: bool = True) -> torch.Tensor:
    """The paper's dense evaluation of one image (PIL, path or array) -> softmax (classes,), float32 CPU.

    ``model`` runs as it is (pass ``vggkit.optimize(model)`` for the fast runtime).
    """
    scales, image = check_scales(scales), load_image(image)
    with inference_networks(model) as nets:
        return dense_probabilities(nets, [rescaled_view(image, q) for q in scales], flip)


def multicrop_predict(model: nn.Module, image: ImageSource, scales: int | Sequence[int] = PAPER_SCALES,
                      flip: bool = True, batch_size: int = 50) -> torch.Tensor:
    """The paper's multi-crop evaluation of one image: 50 crops per Q -> softmax (classes,), float32 CPU."""
    scales, image = check_scales(scales), load_image(image)
    with inference_networks(model) as nets:
        return multicrop_probabilities(nets, [rescaled_view(image, q) for q in scales], flip, batch_size)


def center_predict(model: nn.Module, image: ImageSource) -> torch.Tensor:
    """Single centre crop with the weights' own resize/crop -> softmax (classes,), float32 CPU."""
    image = load_image(image)
    with inference_networks(model) as nets:
        return center_probabilities(nets, center_view(image, nets.preprocess)[None])[0]


def class_score_maps(model: nn.Module, image: ImageSource, scale: int = 384, flip: bool = False) -> torch.Tensor:
    """Raw fc8 class score maps of one image rescaled to shortest side ``scale``.

    -> float32 CPU tensor (classes, h, w) with h, w = floor(side / 32) - 6 of the rescaled
    image. ``flip=True`` averages in the mirror image's map, flipped back.
    """
    (scale,), image = check_scales(scale), load_image(image)
    with inference_networks(model) as nets:
        return flip_score_maps(nets, rescaled_view(image, scale), flip).mean(0).cpu()


def class_heatmap(model: nn.Module, image: ImageSource, class_index: int, scales: int | Sequence[int] = (384,),
                  flip: bool = True) -> torch.Tensor:
    """Where one class is seen: float32 CPU tensor (H, W) at the original image's size, values in [0, 1]
    (a tensor like every other prediction function's result; ``.numpy()`` for an overlay).

    Per Q the class's softmax-probability map (averaged with the flipped-back mirror
    image's when ``flip``), upsampled bilinearly to the image, then averaged over Q.
    """
    image = load_image(image)
    num_classes = as_vgg(model).num_classes
    if not 0 <= class_index < num_classes:
        raise ValueError(f"class_index {class_index} is out of range for a {num_classes}-class model.")
    return torch.from_numpy(heatmap_from_maps(dense_score_maps(model, image, scales, flip), class_index,
                                              (image.height, image.width)))


def protocol_flops(model: nn.Module, height: int, width: int, scales: int | Sequence[int] = PAPER_SCALES,
                   flip: bool = True) -> dict[str, list[int]]:
    """Floating-point operations (2 per multiply-add) of dense and multi-crop for a ``height`` x ``width``
    image, per Q: ``{"dense": [...], "multicrop": [...]}``. Counted on a shape-only copy of the model.
    """
    vgg = as_vgg(model)
    with torch.device("meta"):
        shape_only = VGG(vgg.spec, num_classes=vgg.num_classes, width=vgg.width).eval()
    dense, views = shape_only.to_fully_conv(), 2 if flip else 1

    def flops(network: nn.Module, batch: int, size: tuple[int, int]) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            network(torch.empty(batch, 3, *size, device="meta"))
        return counter.get_total_flops()

    crops = GRID * GRID * views * flops(shape_only, 1, (CROP, CROP))
    sizes = [rescaled_shape(width, height, q) for q in check_scales(scales)]
    return {"dense": [flops(dense, views, size) for size in sizes], "multicrop": [crops] * len(sizes)}
