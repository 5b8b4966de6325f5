"""Published weights by name: torchvision's ImageNet weights, the Caffe ports of the original release
and timm's, fetched into the torch hub cache with their hash checked. Offline, one clear error.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import torch

from ..data.preprocess import CAFFE, IMAGENET, Preprocess
from ..models.configs import ModelSpec
from ..utils.choices import RELEASES
from .checkpoint import WeightsError

# The original Caffe release converted to torchvision keys (BGR, 0-255, Caffe mean).
CAFFE_PORTS = {
    "vgg16": ("vgg16-00b39a1b.pth", "https://web.eecs.umich.edu/~justincj/models/vgg16-00b39a1b.pth"),
    "vgg19": ("vgg19-d01eb7cb.pth", "https://web.eecs.umich.edu/~justincj/models/vgg19-d01eb7cb.pth"),
}


CAFFE_PORT_FILES = {filename for filename, _ in CAFFE_PORTS.values()}


class WeightsUnavailableError(RuntimeError):
    """Published weights that could not be downloaded (offline, blocked) and are not cached."""


def hub_checkpoint_dir() -> Path:
    """Where downloaded weights are cached: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _download(url: str, filename: str, check_hash: bool, progress: bool) -> dict:
    """torch.hub's cached download, with an offline failure that says what to do."""
    cached = hub_checkpoint_dir() / filename
    try:
        return torch.hub.load_state_dict_from_url(
            url, progress=progress, check_hash=check_hash, file_name=filename, weights_only=True,
            map_location="cpu")
    except (urllib.error.URLError, OSError, ConnectionError, TimeoutError) as error:
        reason = getattr(error, "reason", error)
        raise WeightsUnavailableError(
            f"Could not download {filename} ({reason}).\n"
            f"  URL: {url}\n"
            f"  On a machine with internet this happens once; offline, download the file elsewhere "
            f"and place it at {cached}\n"
            f"  (the cache folder is $TORCH_HOME/hub/checkpoints), or pass weights='path/to/{filename}'."
        ) from None


def torchvision_weights_enum(spec: ModelSpec):
    """torchvision's ``VGG16_Weights.IMAGENET1K_V1`` (etc.) for a resolved model; None if there is none."""
    import torchvision.models as tvm

    if spec.config in ("A-LRN", "C"):
        return None
    return getattr(tvm, f"{spec.name.upper()}_Weights").IMAGENET1K_V1


def load_imagenet(spec: ModelSpec, progress: bool = True) -> tuple[dict, Preprocess, dict]:
    """torchvision's ImageNet release for ``spec`` (downloaded once, hash-checked)."""
    weights = torchvision_weights_enum(spec)
    if weights is None:
        raise WeightsError(
            f"There is no published ImageNet release for {spec.name} (config {spec.config}); "
            f"torchvision publishes vgg11, vgg13, vgg16, vgg19 and their _bn variants. "
            f"Train it with `vggkit train` or pass a weight file.")
    url = weights.url
    state = _download(url, url.rsplit("/", 1)[-1], check_hash=True, progress=progress)
    metrics = weights.meta["_metrics"]["ImageNet-1K"]
    info = {"source": f"torchvision {weights}", "url": url, "acc@1": metrics["acc@1"], "acc@5": metrics["acc@5"]}
    return state, IMAGENET, info


def load_caffe(spec: ModelSpec, progress: bool = True) -> tuple[dict, Preprocess, dict]:
    """The original Caffe release (vgg16/vgg19), as the widely used torchvision-keyed port."""
    if spec.batch_norm or spec.name not in CAFFE_PORTS:
        raise WeightsError(f"The Caffe release covers vgg16 and vgg19 (configs D, E) only, not {spec.name}.")
    filename, url = CAFFE_PORTS[spec.name]
    state = _download(url, filename, check_hash=False, progress=progress)
    return state, CAFFE, {"source": f"Caffe release ({filename})", "url": url}


def load_timm(spec: ModelSpec) -> tuple[dict, Preprocess, dict]:
    """timm's ``<name>.tv_in1k`` release, through timm's own hub download."""
    import timm

    timm_name = f"{spec.name}.tv_in1k"
    if spec.config in ("A-LRN", "C"):
        raise WeightsError(f"timm has no weights for {spec.name}; it has vgg11/13/16/19 and their _bn variants.")
    try:
        model = timm.create_model(timm_name, pretrained=True)
    except Exception as error:  # huggingface_hub raises many kinds when offline
        raise WeightsUnavailableError(
            f"Could not get timm's {timm_name} weights ({type(error).__name__}: {str(error).splitlines()[0]}).\n"
            f"  On a machine with internet they are downloaded once into the Hugging Face cache; offline, "
            f"save them elsewhere with torch.save(timm.create_model('{timm_name}', pretrained=True).state_dict(), "
            f"'{spec.name}_timm.pth') and pass weights='{spec.name}_timm.pth'."
        ) from None
    cfg = model.pretrained_cfg
    preprocess = Preprocess(input_size=cfg["input_size"][-1],
                            resize_size=int(round(cfg["input_size"][-1] / cfg.get("crop_pct", 0.875))),
                            mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), name="timm")
    return model.state_dict(), preprocess, {"source": f"timm {timm_name}"}


def _is_release(weights) -> bool:
    return isinstance(weights, str) and weights.lower() in RELEASES


def _read_release(spec: ModelSpec, release: str, progress: bool) -> tuple[dict, Preprocess, dict]:
    if release == "imagenet":
        return load_imagenet(spec, progress=progress)
    if release == "caffe":
        return load_caffe(spec, progress=progress)
    return load_timm(spec)
