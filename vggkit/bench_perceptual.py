"""``vggkit bench`` row (f): one forward + backward of ``PerceptualLoss("esrgan")`` against the
plain torchvision wrapper that BasicSR's ``VGGFeatureExtractor`` builds, on the same weights.

Both compute L1 between VGG19 conv5_4 (before its ReLU) of a batch of 256x256
"restored" images, which need the gradient, and of their ground truth. Peak memory
is the growth of the peak RSS over one such step, each in a fresh process (a
process's peak RSS only ever rises, so two competitors cannot share one).
"""

from __future__ import annotations

import multiprocessing
import resource
from collections import OrderedDict
from collections.abc import Callable
from queue import Empty

import torch
import torch.nn.functional as F
from torch import nn

from .bench import Row, race
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

SIZE = 256
CONV5_4 = 34  # conv5_4 is features.34 of torchvision's vgg19


class BasicSRVGGFeatureExtractor(nn.Module):
    """BasicSR's ``VGGFeatureExtractor(["conv5_4"], vgg_type="vgg19")`` as it builds it: torchvision's
    vgg19 features cut after conv5_4, ImageNet normalisation in front, frozen, and each tapped
    output cloned. (N, 3, H, W) RGB in [0, 1] -> {"conv5_4": (N, 512, H/16, W/16)}."""

    def __init__(self, vgg19: nn.Module) -> None:
        super().__init__()
        self.vgg_net = nn.Sequential(OrderedDict((str(i), m) for i, m in enumerate(vgg19.features[:CONV5_4 + 1])))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.eval()
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (x - self.mean) / self.std
        output = {}
        for key, layer in self.vgg_net._modules.items():
            x = layer(x)
            if key == str(CONV5_4):
                output["conv5_4"] = x.clone()
        return output


def basicsr_perceptual_loss(extractor: BasicSRVGGFeatureExtractor, output: torch.Tensor,
                            target: torch.Tensor) -> torch.Tensor:
    """BasicSR's ``PerceptualLoss`` with ESRGAN's settings: L1 at conv5_4, weight 1, target detached."""
    return F.l1_loss(extractor(output)["conv5_4"], extractor(target.detach())["conv5_4"].detach())


def _competitors(state: dict[str, torch.Tensor], weights_path: str) -> dict[str, Callable]:
    """name -> (restored, target) -> loss, each on the same vgg19 weights."""
    import torchvision

    from .perceptual import PerceptualLoss

    reference = torchvision.models.vgg19()
    reference.load_state_dict(state)
    extractor = BasicSRVGGFeatureExtractor(reference)
    ours = PerceptualLoss("esrgan", weights=weights_path)
    return {"basicsr": lambda x, y: basicsr_perceptual_loss(extractor, x, y), "vggkit": ours}


def _step(loss: Callable, restored: torch.Tensor, target: torch.Tensor) -> None:
    restored.grad = None
    loss(restored, target).backward()


def _peak_rss_probe(which: str, weights_path: str, batch: int, queue) -> None:
    """In a fresh process: peak RSS growth (MiB) of one forward + backward of ``which``."""
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    loss = _competitors(state, weights_path)[which]
    del state
    restored = torch.rand(batch, 3, SIZE, SIZE, requires_grad=True)
    target = torch.rand(batch, 3, SIZE, SIZE)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _step(loss, restored, target)
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024.0)  # KiB on Linux


def peak_rss_growth(which: str, weights_path: str, batch: int) -> float:
    """MiB the peak RSS of a fresh process rises over one step of ``which`` (``basicsr`` or ``vggkit``)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_rss_probe, args=(which, weights_path, batch, queue))
    process.start()
    try:
        while True:
            try:
                return queue.get(timeout=5)
            except Empty:
                if not process.is_alive():
                    raise RuntimeError(f"The perceptual-loss memory probe ({which}) died with exit code "
                                       f"{process.exitcode} before reporting; run `vggkit bench` again.") from None
    finally:
        process.join(timeout=60)


def step_gflop(batch: int = 1) -> float:
    """GFLOP per image of one step, counted on the meta device: two forwards to conv5_4 and one backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from .backbone import VGGBackbone
    from .model import VGG

    with torch.device("meta"):
        network = VGGBackbone(VGG("vgg19"), ["conv5_4_pre"]).requires_grad_(False)
        restored = torch.empty(batch, 3, SIZE, SIZE, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            loss = F.l1_loss(network(restored)["conv5_4_pre"], network(torch.empty(batch, 3, SIZE, SIZE))[
                "conv5_4_pre"])
            loss.backward()
    return counter.get_total_flops() / 1e9 / batch


def perceptual_rows(settings, log) -> list[Row]:
    """Row (f): images/s and peak memory of the ESRGAN perceptual loss, BasicSR's wrapper as reference."""
    import tempfile
    from pathlib import Path

    import torchvision

    batch = max(1, settings.batch // 4)  # a 256x256 step costs about 4x a 224 forward
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="vggkit-bench-") as folder:
        weights_path = str(Path(folder) / "vgg19.pth")
        state = torchvision.models.vgg19().state_dict()
        torch.save(state, weights_path)
        competitors = _competitors(state, weights_path)
        del state
        restored = torch.rand(batch, 3, SIZE, SIZE, requires_grad=True)
        target = torch.rand(batch, 3, SIZE, SIZE)
        with torch.no_grad():
            values = {name: float(loss(restored, target)) for name, loss in competitors.items()}
        log(f"(f) perceptual loss (esrgan: vgg19 conv5_4 before ReLU, L1) forward + backward, batch {batch} of "
            f"{SIZE} px")
        best = race({name: (lambda loss=loss: _step(loss, restored, target)) for name, loss in competitors.items()},
                    max(1, settings.rounds - 1))
        del competitors
        log("(f) peak memory of one step of each, in fresh processes")
        memory = {name: peak_rss_growth(name, weights_path, batch) for name in best}
    flop = step_gflop()
    task = f"(f) perceptual loss forward + backward, {SIZE} px"
    same = abs(values["vggkit"] - values["basicsr"]) <= 1e-5 * max(1.0, abs(values["basicsr"]))
    return [Row(task, "BasicSR VGGFeatureExtractor (torchvision vgg19, float32 NCHW)", batch / best["basicsr"],
                flop, batch=batch, reference=True, note=f"peak RSS +{memory['basicsr']:.0f} MiB per step"),
            Row(task, 'vggkit.PerceptualLoss("esrgan")', batch / best["vggkit"], flop, batch=batch,
                note=f"peak RSS +{memory['vggkit']:.0f} MiB per step; "
                     + ("same loss as BasicSR" if same else "LOSS DIFFERS"))]
