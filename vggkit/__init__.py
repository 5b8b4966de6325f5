"""vggkit: the VGG networks of Simonyan & Zisserman (2014) as a practical toolkit.

The public API is imported on first use (PEP 562), so ``import vggkit`` and the
``vggkit`` command's ``--help`` answer without loading PyTorch.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module that defines it
    "VGG": "models.vgg", "FullyConvVGG": "models.vgg", "count_parameters": "models.vgg",
    "VGGBackbone": "models.backbone", "PAPER_PARAMETERS": "models.configs", "list_models": "models.configs",
    "resolve": "models.configs", "effective_receptive_field": "models.receptive_field",
    "receptive_field": "models.receptive_field", "Preprocess": "data.preprocess",
    "create_model": "weights.factory", "load": "weights.factory", "backbone": "weights.factory",
    "save_checkpoint": "weights.factory", "export_state_dict": "weights.layouts",
    "WeightsError": "weights.checkpoint", "WeightsUnavailableError": "weights.releases",
    "optimize": "runtime.engine", "export": "deploy.export", "init_from": "training.loop", "train": "training.loop",
    "FinetuneResult": "finetuning.finetune", "finetune": "finetuning.finetune",
    "evaluate": "evaluation.evaluate", "predict": "evaluation.predict", "class_heatmap": "evaluation.protocols",
    "class_score_maps": "evaluation.protocols", "dense_predict": "evaluation.protocols",
    "Features": "features.extract", "extract_features": "features.extract", "probe": "features.extract",
    "LPIPS": "features.lpips_distance", "PerceptualLoss": "features.perceptual", "StyleLoss": "features.perceptual",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # A subpackage (vggkit.models, vggkit.data, ...) is there on first use, whatever else has been
        # imported so far. No subpackage shares a name with a function: vggkit.train is always the function.
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'vggkit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
