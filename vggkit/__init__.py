"""vggkit: the VGG networks of Simonyan & Zisserman (2014) as a practical toolkit.

The public API is imported on first use (PEP 562), so ``import vggkit`` and the
``vggkit`` command's ``--help`` answer without loading PyTorch.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module that defines it
    "VGG": "model", "FullyConvVGG": "model", "VGGBackbone": "backbone", "backbone": "backbone",
    "PAPER_PARAMETERS": "configs", "list_models": "configs", "resolve": "configs",
    "evaluate": "evaluate", "Features": "extract", "extract_features": "extract", "probe": "extract",
    "FinetuneResult": "finetune", "finetune": "finetune", "load": "predict", "predict": "predict",
    "Preprocess": "preprocess", "class_heatmap": "protocols", "class_score_maps": "protocols",
    "dense_predict": "protocols", "optimize": "runtime", "init_from": "train", "train": "train",
    "effective_receptive_field": "receptive_field", "receptive_field": "receptive_field",
    "WeightsError": "weights", "WeightsUnavailableError": "weights", "count_parameters": "weights",
    "create_model": "weights", "export_state_dict": "weights", "save_checkpoint": "weights",
    "LPIPS": "lpips_distance", "PerceptualLoss": "perceptual", "StyleLoss": "perceptual",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # A submodule (vggkit.heads, vggkit.data, ...) is there on first use, as when every module
        # was imported up front, whatever else has been imported so far.
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'vggkit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Keeps ``vggkit.train`` (and finetune, evaluate, ...) the function when its submodule is imported:
    the import system binds a loaded submodule to the package attribute of the same name."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
