"""FCN-8s on a vggkit backbone, trained for a few steps on generated shapes.

Long et al.'s FCN-8s reads pool3 (stride 8), pool4 (stride 16) and fc7 (stride 32,
fc6/fc7 as convs), scores each with a 1x1 conv, and fuses them coarse to fine.
The data are rendered here: squares (class 1) and discs (class 2) on a noisy
background (class 0), so the example runs anywhere, offline, in seconds.

    python recipes/examples/fcn8s_segmentation.py --steps 200 --width 0.25
    python recipes/examples/fcn8s_segmentation.py --weights imagenet --width 1   # with internet
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import vggkit


class FCN8s(nn.Module):
    """(N, 3, H, W) -> per-pixel class scores (N, num_classes, H, W); H, W multiples of 32."""

    def __init__(self, num_classes: int, name: str = "vgg16", weights: str | None = None, width: float = 1.0):
        super().__init__()
        self.backbone = vggkit.backbone(name, layers=["pool3", "pool4", "fc7"], weights=weights,
                                        pad_fc6=True, width=None if weights else width)
        info = self.backbone.feature_info
        self.score = nn.ModuleDict({n: nn.Conv2d(info[n].channels, num_classes, 1) for n in info})
        for conv in self.score.values():  # start as the coarse FCN-32s: finer scores begin at zero
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.backbone(x)
        scores = self.score["fc7"](taps["fc7"])
        for name in ("pool4", "pool3"):
            finer = self.score[name](taps[name])
            scores = F.interpolate(scores, size=finer.shape[-2:], mode="bilinear", align_corners=False) + finer
        return F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)


def render_shapes(batch: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, size, size) in [0, 1] and masks (N, size, size): 0 background, 1 square, 2 disc."""
    images = torch.rand(batch, 3, size, size, generator=generator) * 0.3
    masks = torch.zeros(batch, size, size, dtype=torch.long)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(batch):
        for label in (1, 2):
            r = int(torch.randint(size // 8, size // 4, (1,), generator=generator))
            cy, cx = (int(v) for v in torch.randint(r, size - r, (2,), generator=generator))
            if label == 1:
                inside = ((rows - cy).abs() <= r) & ((cols - cx).abs() <= r)
            else:
                inside = (rows - cy) ** 2 + (cols - cx) ** 2 <= r * r
            colour = torch.rand(3, 1, generator=generator) * 0.5 + 0.5
            images[i][:, inside] = colour
            masks[i][inside] = label
    return images, masks


def mean_iou(scores: torch.Tensor, masks: torch.Tensor, num_classes: int) -> float:
    predicted = scores.argmax(1)
    ious = []
    for c in range(num_classes):
        union = ((predicted == c) | (masks == c)).sum()
        if union > 0:
            ious.append((((predicted == c) & (masks == c)).sum() / union).item())
    return sum(ious) / len(ious)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--weights", default=None, help="None (random), imagenet, or a weight file")
    parser.add_argument("--width", type=float, default=0.25, help="channel multiplier when training from scratch")
    parser.add_argument("--size", type=int, default=64, help="image side, a multiple of 32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = FCN8s(3, args.model, args.weights, args.width)
    normalize = model.backbone.preprocess.normalize
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    history = []
    for step in range(1, args.steps + 1):
        images, masks = render_shapes(args.batch, args.size, generator)
        scores = model(normalize(images))
        loss = F.cross_entropy(scores, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  mean IoU {mean_iou(scores, masks, 3):.3f}")
    model.eval()
    with torch.no_grad():
        images, masks = render_shapes(16, args.size, torch.Generator().manual_seed(1))
        iou = mean_iou(model(normalize(images)), masks, 3)
    print(f"held-out mean IoU {iou:.3f}")
    return {"losses": history, "mean_iou": iou}


if __name__ == "__main__":
    main()
