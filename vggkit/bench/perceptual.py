"""``vggkit bench`` row (j): one forward + backward of ``PerceptualLoss("esrgan")`` against the
plain torchvision wrapper that BasicSR's ``VGGFeatureExtractor`` builds, on the same weights.

Both compute L1 between VGG19 conv5_4 (before its ReLU) of a batch of 256x256
"restored" images, which need the gradient, and of their ground truth. Peak memory
is how far one such step lifts the peak resident set above the loaded model, each
competitor in a fresh process (memory one frees, the allocator may keep).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from ._common import Row, race, run_probe

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


def _competitor(which: str, state: dict[str, torch.Tensor], weights_path: str) -> Callable:
    """``basicsr`` or ``vggkit``: (restored, target) -> loss, on the vgg19 weights in ``state``/``weights_path``."""
    import torchvision

    from ..features.perceptual import PerceptualLoss

    if which == "vggkit":
        return PerceptualLoss("esrgan", weights=weights_path)
    reference = torchvision.models.vgg19()
    reference.load_state_dict(state)
    extractor = BasicSRVGGFeatureExtractor(reference)
    return lambda x, y: basicsr_perceptual_loss(extractor, x, y)


def _step(loss: Callable, restored: torch.Tensor, target: torch.Tensor) -> None:
    restored.grad = None
    loss(restored, target).backward()


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (``VmRSS``: resident now; ``VmHWM``: peak since the last reset)."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field + ":")).split()[1])


def _peak_rss_probe(which: str, weights_path: str, batch: int, queue) -> None:
    """In a fresh process: how far one forward + backward of ``which`` lifts the resident set (MiB).

    Loading the weights peaks higher than the step, so the peak is reset (Linux's
    clear_refs) after a warm-up step; None where the kernel does not allow that.
    """
    state = torch.load(weights_path, map_location="cpu", weights_only=True) if which == "basicsr" else {}
    loss = _competitor(which, state, weights_path)
    del state
    restored = torch.rand(batch, 3, SIZE, SIZE, requires_grad=True)
    target = torch.rand(batch, 3, SIZE, SIZE)
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
    except OSError:
        queue.put(None)
        return
    _step(loss, restored, target)  # a warm-up step first: a training loop's steady state is what counts
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _status_kib("VmRSS")
    _step(loss, restored, target)
    queue.put((_status_kib("VmHWM") - before) / 1024.0)


def peak_rss_growth(which: str, weights_path: str, batch: int) -> float | None:
    """MiB the peak RSS of a fresh process rises over one step of ``which`` (``basicsr`` or ``vggkit``)."""
    return run_probe(_peak_rss_probe, (which, weights_path, batch), f"perceptual-loss memory probe ({which})")


def step_gflop(batch: int = 1) -> float:
    """GFLOP per image of one step, counted on the meta device: two forwards to conv5_4 and one backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..models.backbone import VGGBackbone
    from ..models.vgg import VGG

    with torch.device("meta"):
        network = VGGBackbone(VGG("vgg19"), ["conv5_4_pre"]).requires_grad_(False)
        restored = torch.empty(batch, 3, SIZE, SIZE, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            loss = F.l1_loss(network(restored)["conv5_4_pre"], network(torch.empty(batch, 3, SIZE, SIZE))[
                "conv5_4_pre"])
            loss.backward()
    return counter.get_total_flops() / 1e9 / batch


def perceptual_rows(settings, log) -> list[Row]:
    """Row (j): images/s and peak memory of the ESRGAN perceptual loss, BasicSR's wrapper as reference."""
    import tempfile
    from pathlib import Path

    import torchvision

    batch = max(1, settings.batch // 4)  # a 256x256 step costs about 4x a 224 forward
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="vggkit-bench-") as folder:
        weights_path = str(Path(folder) / "vgg19.pth")
        state = torchvision.models.vgg19().state_dict()
        torch.save(state, weights_path)
        competitors = {which: _competitor(which, state, weights_path) for which in ("basicsr", "vggkit")}
        del state
        restored = torch.rand(batch, 3, SIZE, SIZE, requires_grad=True)
        target = torch.rand(batch, 3, SIZE, SIZE)
        with torch.no_grad():
            values = {name: float(loss(restored, target)) for name, loss in competitors.items()}
        log(f"(j) perceptual loss (esrgan: vgg19 conv5_4 before ReLU, L1) forward + backward, batch {batch} of "
            f"{SIZE} px")
        best = race({name: (lambda loss=loss: _step(loss, restored, target)) for name, loss in competitors.items()},
                    max(1, settings.rounds - 1))
        del competitors
        log("(j) peak memory of one step of each, in fresh processes")
        memory = {name: peak_rss_growth(name, weights_path, batch) for name in best}
    flop = step_gflop()
    task = f"(j) perceptual loss forward + backward, {SIZE} px"
    same = abs(values["vggkit"] - values["basicsr"]) <= 1e-5 * max(1.0, abs(values["basicsr"]))
    peak = {name: "peak memory not measurable here (no /proc/self/clear_refs)" if mib is None
            else f"peak RSS +{mib:.0f} MiB over the loaded model" for name, mib in memory.items()}
    return [Row(task, "BasicSR VGGFeatureExtractor (torchvision vgg19, float32 NCHW)", batch / best["basicsr"],
                flop, batch=batch, reference=True, note=peak["basicsr"]),
            Row(task, 'vggkit.PerceptualLoss("esrgan")', batch / best["vggkit"], flop, batch=batch,
                note=f"{peak['vggkit']}; " + ("same loss as BasicSR" if same else "LOSS DIFFERS"))]
