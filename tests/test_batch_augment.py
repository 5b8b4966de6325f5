"""The batched (GPU) augmentation against the CPU path's TrainTransform: pixels and statistics, on CPU tensors."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from vggkit.data.batch_augment import FLOAT_BUDGET_BYTES, draw_crops, resample_crops
from vggkit.data.transforms import TrainTransform
from vggkit.data.pipeline import GpuAugment, sample_seed

COUNT = 400  # augmented copies per path


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((height // 4, width // 4, 3)) * 255).astype(np.uint8))
    return np.array(coarse.resize((width, height), Image.Resampling.BILINEAR))


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def test_crops_are_pils_pixels_for_the_same_window():
    # Landscape, portrait, square and ImageNet-sized images; downscaled, upscaled and unscaled windows.
    images = [smooth_image(h, w, i) for i, (h, w) in enumerate([(75, 100), (100, 75), (60, 60), (375, 500)])]
    seeds = torch.tensor([sample_seed(0, 0, i) for i in range(4)])
    for crop, scale in ((56, (64, 100)), (56, (56, 56)), (32, (40, 200))):
        draws = draw_crops(seeds, [a.shape[:2] for a in images], scale, crop, flip=True, pca_std=0.1)
        out = resample_crops([chw(a) for a in images], draws.box, draws.flip, crop)
        for i, array in enumerate(images):
            pil = Image.fromarray(array).resize((crop, crop), Image.Resampling.BILINEAR, box=tuple(draws.box[i]),
                                                reducing_gap=None)  # TrainTransform's call
            reference = chw(np.asarray(pil)).float()
            reference = reference.flip(-1) if draws.flip[i] else reference
            # PIL rounds to 8 bits after each of its two passes; the matmuls do not.
            assert (out[i] - reference).abs().max() <= 1.01, (crop, scale, i)


def test_large_photos_are_resampled_in_groups_with_the_same_pixels(monkeypatch):
    images = [chw(smooth_image(h, w, i)) for i, (h, w) in enumerate([(90, 120), (60, 80), (200, 150)])]
    draws = draw_crops(torch.arange(3), [tuple(im.shape[-2:]) for im in images], (48, 64), 40, True, 0.0)
    whole = resample_crops(images, draws.box, draws.flip, 40)
    monkeypatch.setattr("vggkit.data.batch_augment.FLOAT_BUDGET_BYTES", 3 * 4 * 60 * 60)  # one window per group
    assert FLOAT_BUDGET_BYTES > 3 * 4 * 60 * 60
    torch.testing.assert_close(resample_crops(images, draws.box, draws.flip, 40), whole, atol=1e-3, rtol=0)


def cpu_path(transform: TrainTransform, array: np.ndarray) -> torch.Tensor:
    """COUNT augmentations by TrainTransform, seeded as SeededAugment seeds them."""
    image = Image.fromarray(array)
    out = []
    for index in range(COUNT):
        seed = sample_seed(0, 0, index)
        random.seed(seed)
        torch.manual_seed(seed)
        out.append(transform(image))
    return transform.preprocess.denormalize(torch.stack(out))


def batched_path(transform: TrainTransform, array: np.ndarray, epoch: int = 0) -> torch.Tensor:
    seeds = torch.tensor([sample_seed(0, epoch, index) for index in range(COUNT)])
    images, _ = GpuAugment(transform, "cpu")([chw(array)] * COUNT, torch.zeros(COUNT, dtype=torch.int64), seeds,
                                             ["ramp"] * COUNT)
    return transform.preprocess.denormalize(images)


def ramp(height: int = 75, width: int = 100) -> np.ndarray:
    """Red = x, green = y (0..255 across the image), blue flat: a crop's pixels say where it came from."""
    x = np.round(np.arange(width) * 255 / (width - 1))
    y = np.round(np.arange(height) * 255 / (height - 1))
    return np.stack([np.broadcast_to(x, (height, width)), np.broadcast_to(y[:, None], (height, width)),
                     np.full((height, width), 128.0)], -1).astype(np.uint8)


def geometry(rgb: torch.Tensor, height: int = 75, width: int = 100) -> dict[str, torch.Tensor]:
    """Per crop: its window's left/right/top/bottom edges in source pixels, width, and whether it is flipped."""
    first, last = rgb[:, 0, :, 0].mean(1) * (width - 1), rgb[:, 0, :, -1].mean(1) * (width - 1)
    top, bottom = rgb[:, 1, 0, :].mean(1) * (height - 1), rgb[:, 1, -1, :].mean(1) * (height - 1)
    return {"left": torch.minimum(first, last), "width": (last - first).abs(), "top": top,
            "height": bottom - top, "flip": (last < first).float()}


def test_crop_scale_position_and_flip_follow_the_cpu_distribution():
    transform = TrainTransform(scale=(64, 100), crop=48, pca_std=0)
    cpu, batched = geometry(cpu_path(transform, ramp())), geometry(batched_path(transform, ramp()))
    for key in ("left", "width", "top", "height"):
        # S uniform in [64, 100] and the crop uniform over the rescaled image: the same means and spreads.
        assert batched[key].mean() == pytest.approx(cpu[key].mean().item(), rel=0.06, abs=0.5), key
        assert batched[key].std() == pytest.approx(cpu[key].std().item(), rel=0.12, abs=0.3), key
        assert batched[key].min() >= cpu[key].min() - 1.5 and batched[key].max() <= cpu[key].max() + 1.5, key
    assert batched["flip"].mean() == pytest.approx(0.5, abs=0.06) and cpu["flip"].mean() == pytest.approx(0.5, abs=0.06)
    # A window 48 px at S=100 is 36 source px wide on the 75 px short side, 56 at S=64.
    assert batched["height"].min() > 34 and batched["height"].max() < 58


def test_colour_shift_and_mean_pixels_follow_the_cpu_distribution():
    grey = np.full((60, 80, 3), 128, dtype=np.uint8)
    transform = TrainTransform(scale=48, crop=48)
    cpu_shift = cpu_path(transform, grey).mean((2, 3)) - 128 / 255
    batched_shift = batched_path(transform, grey).mean((2, 3)) - 128 / 255
    torch.testing.assert_close(batched_shift.std(0), cpu_shift.std(0), rtol=0.12, atol=2e-4)
    assert batched_shift.mean(0).abs().max() < 0.01 and batched_shift.std(0)[0] > 0.01  # 0.1 x 0.2175 x 0.57 in red
    photo = smooth_image(90, 120, seed=7)
    full = TrainTransform(scale=(64, 128), crop=56)
    cpu, batched = cpu_path(full, photo), batched_path(full, photo)
    torch.testing.assert_close(batched.mean((0, 2, 3)), cpu.mean((0, 2, 3)), atol=0.01, rtol=0)
    torch.testing.assert_close(batched.std((0, 2, 3)), cpu.std((0, 2, 3)), atol=0.01, rtol=0)


def test_reproducible_per_seed_epoch_and_index():
    transform = TrainTransform(scale=(64, 100), crop=48)
    first = batched_path(transform, ramp())
    assert torch.equal(first, batched_path(transform, ramp()))
    assert not torch.allclose(first, batched_path(transform, ramp(), epoch=1))
    seeds = torch.tensor([sample_seed(0, 0, i) for i in range(3)])
    draws = draw_crops(seeds, [(75, 100)] * 3, (64, 100), 48, True, 0.1)
    again = draw_crops(seeds[[2, 0]], [(75, 100)] * 2, (64, 100), 48, True, 0.1)
    assert again.scale.tolist() == draws.scale[[2, 0]].tolist() and np.array_equal(again.box, draws.box[[2, 0]])
