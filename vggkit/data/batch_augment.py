"""Section 3.1's augmentation for a whole batch at once, as tensor work on any device.

``draw_crops`` picks every image's scale S, crop position, flip and colour shift
from its sample seed with a counter-based hash (vectorised, no per-image
generator), with the distribution of ``TrainTransform``: S uniform in
[S_min, S_max], the crop uniform over the rescaled image, flip with probability
1/2, alpha ~ N(0, pca_std) per eigenvector.

``resample_crops`` resamples each crop window, chosen in the original image's
coordinates, straight to ``crop x crop`` as two batched matmuls
(``rows @ image @ columns^T``) whose weights are PIL's antialiased bilinear filter,
the one ``TrainTransform`` uses: the same pixels as rescaling to S then cropping,
without rescaling whole images, and without a per-image Python loop of kernels.
A flip is the column weights in reverse order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# splitmix64's constants (Steele, Lea & Flood 2014): a seed and a counter -> 64 well-mixed bits.
GOLDEN, MIX1, MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


FLOAT_BUDGET_BYTES = 1 << 30  # the float32 windows of one resampling call; bigger batches are split


def uniforms(seeds: torch.Tensor, count: int) -> np.ndarray:
    """(N,) int64 sample seeds -> (N, count) float64 uniforms in [0, 1), the same for the same seed."""
    with np.errstate(over="ignore"):
        z = seeds.numpy().astype(np.uint64)[:, None] + np.arange(1, count + 1, dtype=np.uint64)[None] * GOLDEN
        z = (z ^ (z >> np.uint64(30))) * MIX1
        z = (z ^ (z >> np.uint64(27))) * MIX2
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass
class CropDraws:
    """One batch's augmentation parameters (CPU). ``scale``: S; ``top``/``left``: the crop's corner in
    the image rescaled to S; ``box``: the crop window (x0, y0, x1, y1) in original pixels."""

    scale: np.ndarray  # (N,) int
    top: np.ndarray  # (N,) int
    left: np.ndarray  # (N,) int
    flip: np.ndarray  # (N,) bool
    alpha: np.ndarray  # (N, 3) float: the PCA colour shift's coefficients
    box: np.ndarray  # (N, 4) float


def draw_crops(seeds: torch.Tensor, sizes: list[tuple[int, int]], scale: tuple[int, int], crop: int, flip: bool,
               pca_std: float) -> CropDraws:
    """Per-image draws for images of ``sizes`` [(height, width)], from their (N,) int64 sample seeds."""
    u = uniforms(seeds, 8)
    heights, widths = np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes])
    s = scale[0] + np.minimum(np.floor(u[:, 0] * (scale[1] - scale[0] + 1)), scale[1] - scale[0]).astype(np.int64)
    # Shortest side -> S, the other int(S * long / short): torchvision's rule, as data.images.rescaled_wh.
    wide = widths >= heights
    new_w = np.where(wide, (s * widths / heights).astype(np.int64), s)
    new_h = np.where(wide, s, (s * heights / widths).astype(np.int64))
    top = np.minimum(np.floor(u[:, 1] * (new_h - crop + 1)), new_h - crop).astype(np.int64)
    left = np.minimum(np.floor(u[:, 2] * (new_w - crop + 1)), new_w - crop).astype(np.int64)
    flips = (u[:, 3] < 0.5) & flip
    # Box-Muller: two pairs of uniforms -> four standard normals, three used.
    radius = np.sqrt(-2.0 * np.log1p(-u[:, 4:6]))
    normals = np.concatenate([radius * np.cos(2 * np.pi * u[:, 6:8]), radius * np.sin(2 * np.pi * u[:, 6:8])], 1)
    x_scale, y_scale = widths / new_w, heights / new_h
    box = np.stack([left * x_scale, top * y_scale, (left + crop) * x_scale, (top + crop) * y_scale], 1)
    return CropDraws(s, top, left, flips, normals[:, :3] * pca_std, box)


def _filter_weights(start: torch.Tensor, step: torch.Tensor, origin: torch.Tensor, length: torch.Tensor,
                    out: int, size: int, reverse: torch.Tensor) -> torch.Tensor:
    """PIL's antialiased bilinear weights, one (out, size) matrix per image -> (N, out, size).

    Output pixel j samples around ``start + (j + 0.5) * step`` (original pixels); source pixel
    ``origin + x`` weighs ``max(0, 1 - |origin + x + 0.5 - centre| / max(step, 1))``, only for
    x < ``length`` (pixels past the image's edge do not exist); rows sum to 1.
    """
    j = torch.arange(out, device=start.device, dtype=torch.float32)
    j = torch.where(reverse[:, None], out - 1 - j, j)  # a flip reads the columns right to left
    centre = start[:, None] + (j + 0.5) * step[:, None]  # (N, out)
    x = torch.arange(size, device=start.device, dtype=torch.float32)
    source = origin[:, None, None] + x + 0.5  # (N, 1, size)
    support = step.clamp(min=1)[:, None, None]
    weights = (1 - (source - centre[:, :, None]).abs() / support).clamp(min=0)
    weights = weights * (x < length[:, None, None])
    return weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)


def resample_crops(images: list[torch.Tensor], box: np.ndarray, flip: np.ndarray, crop: int) -> torch.Tensor:
    """(3, H_i, W_i) uint8 images (one device) and their crop windows -> (N, 3, crop, crop) float in [0, 255].

    Each window (plus the filter's reach) is copied into one zero-padded batch; the resampling
    is then two batched matmuls. Batches whose padded windows would pass FLOAT_BUDGET_BYTES
    (a few very large photos) are resampled in several groups of similar window size.
    """
    device = images[0].device
    heights = np.array([im.shape[-2] for im in images])
    widths = np.array([im.shape[-1] for im in images])
    reach_x = np.maximum((box[:, 2] - box[:, 0]) / crop, 1.0)  # the filter's support in source pixels
    reach_y = np.maximum((box[:, 3] - box[:, 1]) / crop, 1.0)
    x0 = np.clip(np.floor(box[:, 0] - reach_x - 1), 0, widths).astype(np.int64)
    x1 = np.clip(np.ceil(box[:, 2] + reach_x + 1), 0, widths).astype(np.int64)
    y0 = np.clip(np.floor(box[:, 1] - reach_y - 1), 0, heights).astype(np.int64)
    y1 = np.clip(np.ceil(box[:, 3] + reach_y + 1), 0, heights).astype(np.int64)
    out = torch.empty(len(images), 3, crop, crop, device=device)
    for group in _groups(y1 - y0, x1 - x0):
        h, w = int((y1 - y0)[group].max()), int((x1 - x0)[group].max())
        windows = torch.zeros(len(group), 3, h, w, dtype=torch.uint8, device=device)
        for k, i in enumerate(group.tolist()):  # copies only: the arithmetic below is batched
            windows[k, :, : y1[i] - y0[i], : x1[i] - x0[i]] = images[i][:, y0[i] : y1[i], x0[i] : x1[i]]
        # Per-image scalars in one host-to-device copy: no synchronisation with the device.
        scalars = np.stack([box[group, 0], box[group, 1], (box[group, 2] - box[group, 0]) / crop,
                            (box[group, 3] - box[group, 1]) / crop, x0[group], y0[group], (widths - x0)[group],
                            (heights - y0)[group], flip[group]], 1)
        s = torch.from_numpy(scalars.astype(np.float32)).to(device, non_blocking=True)
        columns = _filter_weights(s[:, 0], s[:, 2], s[:, 4], s[:, 6], crop, w, s[:, 8] > 0)
        rows = _filter_weights(s[:, 1], s[:, 3], s[:, 5], s[:, 7], crop, h, torch.zeros_like(s[:, 8], dtype=bool))
        pixels = windows.float() @ columns.transpose(1, 2)[:, None]  # (n, 3, h, crop)
        out[torch.from_numpy(group).to(device)] = rows[:, None] @ pixels  # (n, 3, crop, crop)
    return out


def _groups(heights: np.ndarray, widths: np.ndarray) -> list[np.ndarray]:
    """Indices in groups whose zero-padded float32 windows fit FLOAT_BUDGET_BYTES (one group usually)."""
    order = np.argsort(heights * widths, kind="stable")
    groups, current = [], []
    for i in order.tolist():
        candidate = current + [i]
        padded = len(candidate) * 3 * 4 * heights[candidate].max() * widths[candidate].max()
        if current and padded > FLOAT_BUDGET_BYTES:
            groups.append(np.array(current))
            candidate = [i]
        current = candidate
    groups.append(np.array(current))
    return groups if len(groups) > 1 else [np.arange(len(heights))]


def colour_shift(alpha: np.ndarray, eigval: torch.Tensor, eigvec: torch.Tensor, device) -> torch.Tensor:
    """(N, 3) PCA coefficients -> (N, 3, 1, 1) RGB shifts eigvec @ (alpha * eigval), on ``device``."""
    shift = (torch.from_numpy(alpha.astype(np.float32)) * eigval) @ eigvec.T
    return shift.view(-1, 3, 1, 1).to(device, non_blocking=True)
