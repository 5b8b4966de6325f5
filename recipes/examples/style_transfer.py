"""Neural style transfer (Gatys et al. 2016) with vggkit's perceptual losses.

The picture itself is optimised: starting from the content image, Adam moves its
pixels to lower the content loss at VGG19 conv4_2 plus the Gram-matrix style loss
at conv1_1 ... conv5_1 (``PerceptualLoss("gatys")``). Only trained weights make a
meaningful picture; with random weights (``--weights none``) the script still runs
end to end, which is what its test checks.

    python recipes/examples/style_transfer.py content.jpg style.jpg -o stylised.png
    python recipes/examples/style_transfer.py photo.jpg painting.jpg --weights caffe --size 512 --steps 500
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

import vggkit
from vggkit.data.images import ImageError, load_image

RANDOM_WEIGHTS_WARNING = ("Random weights (--weights none): the losses are real but VGG has learnt nothing, "
                          "so the picture will not be meaningful. Use --weights imagenet or caffe for a real one.")


def read_rgb(path: str, size: int) -> torch.Tensor:
    """An image file -> (1, 3, h, w) RGB in [0, 1], the shorter side rescaled to ``size``."""
    image = TF.resize(load_image(path), size, antialias=True)
    return TF.to_tensor(image).unsqueeze(0)


def stylise(content: torch.Tensor, style: torch.Tensor, loss: vggkit.PerceptualLoss, steps: int,
            lr: float, progress: bool = True) -> tuple[torch.Tensor, list[float]]:
    """Optimise the pixels of a copy of ``content`` (1, 3, h, w) in [0, 1]; returns it and the losses."""
    content_targets, style_targets = loss.targets(content), loss.targets(style)
    picture = content.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([picture], lr=lr)
    history = []
    bar = tqdm(range(steps), desc="stylising", unit="step", disable=not progress)
    for _ in bar:
        optimizer.zero_grad(set_to_none=True)
        value = loss(picture, content_targets, style=style_targets)
        value.backward()
        optimizer.step()
        with torch.no_grad():
            picture.clamp_(0, 1)  # stay a picture: the loss expects [0, 1]
        history.append(value.item())
        bar.set_postfix(loss=f"{history[-1]:.4g}")
    return picture.detach(), history


def save_png(picture: torch.Tensor, path: Path) -> Path:
    """(1, 3, h, w) in [0, 1] -> a PNG, written atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    TF.to_pil_image(picture[0].clamp(0, 1)).save(partial, format="PNG")
    partial.replace(path)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("content", help="content image (its layout is kept)")
    parser.add_argument("style", help="style image (its textures and colours are taken)")
    parser.add_argument("-o", "--output", default="stylised.png", help="PNG to write (default stylised.png)")
    parser.add_argument("--weights", default="imagenet",
                        help="VGG19 weights: imagenet, caffe (Gatys et al. used these), a file, or none (random)")
    parser.add_argument("--size", type=int, default=384, help="shorter side in pixels, at least 16 (default 384)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.02, help="Adam step on pixels in [0, 1]")
    parser.add_argument("--style-weight", type=float, default=None,
                        help="style against content weight (default the preset's 1e3, alpha/beta = 1e-3)")
    parser.add_argument("--width", type=float, default=None, help="channel multiplier, random weights only")
    args = parser.parse_args(argv)
    if args.size < 16:
        parser.error(f"--size must be at least 16 (VGG19 halves the image four times before conv5_1), got {args.size}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if not args.output.lower().endswith(".png"):
        parser.error(f"--output {args.output}: the picture is written as PNG; give a name ending in .png")
    try:
        content, style = read_rgb(args.content, args.size), read_rgb(args.style, args.size)
    except (ImageError, FileNotFoundError) as error:
        parser.error(str(error))

    random_weights = args.weights.lower() == "none"
    if random_weights:
        print(RANDOM_WEIGHTS_WARNING)
    torch.manual_seed(0)
    loss = vggkit.PerceptualLoss("gatys", weights=None if random_weights else args.weights,
                                 style_weight=args.style_weight, width=args.width if random_weights else None)
    picture, history = stylise(content, style, loss, args.steps, args.lr)
    path = save_png(picture, Path(args.output))
    print(f"loss {history[0]:.4g} -> {history[-1]:.4g} in {args.steps} steps; wrote {path}")
    if random_weights:
        print(RANDOM_WEIGHTS_WARNING)
    return {"losses": history, "output": path}


if __name__ == "__main__":
    main()
