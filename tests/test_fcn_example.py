"""The FCN-8s example trains: the backbone in use for segmentation."""

import importlib.util
from pathlib import Path

import torch

EXAMPLE = Path(__file__).parents[1] / "recipes" / "examples" / "fcn8s_segmentation.py"


def _load():
    spec = importlib.util.spec_from_file_location("fcn8s_segmentation", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fcn8s_output_is_full_resolution():
    fcn = _load().FCN8s(3, width=1 / 16)
    assert fcn(torch.randn(2, 3, 64, 96)).shape == (2, 3, 64, 96)


def test_a_few_steps_reduce_the_loss():
    result = _load().main(["--steps", "40", "--width", "0.0625", "--size", "64", "--batch", "4", "--lr", "3e-3"])
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
