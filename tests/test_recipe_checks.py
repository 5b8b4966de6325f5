"""Recipe values and train()'s arguments: every value range-checked in one place (Recipe construction), the
same rule and message for the API, ``--set``, the CLI flags and TOML files; resume and NaN advice that work."""

import dataclasses
import re
import typing

import numpy as np
import pytest
import torch
from PIL import Image

from vggkit.cli import main
from vggkit.training.loop import train
from vggkit.training.recipe import OptimSection, Recipe, apply_overrides, find_recipe, list_recipes
from vggkit.training.step import NonFiniteLossError
from vggkit.utils.checks import MAX_SEED

TINY = ["model.num_classes=2", "model.width=0.0625", "data.crop=32", "data.scale=36", "data.val_scale=36",
        "data.workers=0", "optim.batch_size=4", "schedule.epochs=1", "run.precision='fp32'", "run.device='cpu'"]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """2 classes x 8 train, 2 x 2 val images of 40 px whose dominant channel is the class."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        for label, name in enumerate(("n01", "n02")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (40, 40, 3))
                pixels[..., label] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def one_line_error(kind, call, *args, **kwargs) -> str:
    with pytest.raises(kind) as raised:
        call(*args, **kwargs)
    message = str(raised.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("override, message", [
    ("optim.momentum=inf", r"optim\.momentum: must be in \[0, 1\) .*got inf"),
    ("optim.momentum=1", r"optim\.momentum: must be in \[0, 1\)"),
    ("optim.weight_decay=nan", r"optim\.weight_decay: must be a finite number >= 0 .*got nan"),
    ("optim.weight_decay=-1e-4", r"optim\.weight_decay: must be a finite number >= 0"),
    ("optim.lr=inf", r"optim\.lr: must be a finite number > 0"),
    ("data.pca_std=nan", r"data\.pca_std: must be in \[0, 10\] .*got nan"),
    ("schedule.threshold=nan", r"schedule\.threshold: must be in \[0, 1\) .*got nan"),
    ("schedule.threshold=-1", r"schedule\.threshold: must be in \[0, 1\) .*got -1"),
    ("run.seed=99999999999999999999", r"run\.seed: must be between 0 and 4294967295 .*got 99999999999999999999"),
    ("run.seed=-1", r"run\.seed: must be between 0 and 4294967295"),
    ("data.scale=[512, 256]", r"data\.scale: \[512, 256\] must be one size S or a range .*S_min <= S_max"),
    ("data.crop=288", r"data\.scale: S=256 is smaller than the 288 px crop; set S >= 288"),
    ("data.val_scale=200", r"data\.val_scale: Q=200 is smaller than the 224 px crop"),
    ("data.scale=[256, 99999]", r"data\.scale: must be at most 2048 px"),
    ("schedule.epochs=1e3", r"schedule\.epochs must be int, got 1000\.0 \(float\)"),
    ("model.num_classes='3'", r"model\.num_classes must be int, got '3' \(str\)"),
    ("model.num_classes=1", r"model\.num_classes: must be at least 2, at most 1,000,000"),
    ("run.loss_every=0", r"run\.loss_every: must be positive"),
    ("target.top1_error=101", r"target\.top1_error: must be in \[0, 100\]"),
])
def test_a_value_out_of_range_is_one_line_naming_the_key(override, message):
    error = one_line_error(ValueError, Recipe.load, "A", [override])
    assert error.startswith(str(find_recipe("A")) + ": ") and re.search(message, error), error


def section_fields():
    for section in dataclasses.fields(Recipe):
        kind = typing.get_type_hints(Recipe)[section.name]
        if dataclasses.is_dataclass(kind):
            for key, hint in typing.get_type_hints(kind).items():
                yield f"{section.name}.{key}", hint


@pytest.mark.parametrize("key, hint", [(k, h) for k, h in section_fields() if h in (int, float)])
def test_every_number_is_checked_for_type_finiteness_and_range(key, hint):
    # Every int key has a floor >= 0 and a ceiling below 2**64; every float key refuses what is not finite.
    bad = ["nan", "inf", "-inf", "'1'"] if hint is float else ["-1", str(2**64), "'7'", "7.5", "true"]
    for raw in bad:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            Recipe.load("A", [f"{key}={raw}"])


def test_every_entry_point_runs_the_same_validate(tmp_path, capsys):
    expected = "run.seed: must be between 0 and 4294967295"
    with pytest.raises(ValueError, match=r"recipe: optim\.momentum: must be in \[0, 1\)"):
        Recipe(optim=OptimSection(momentum=float("inf")))  # built in Python
    with pytest.raises(ValueError, match=r"recipe: optim\.lr must be float, got '0\.1' \(str\)"):
        Recipe(optim=OptimSection(lr="0.1"))
    with pytest.raises(ValueError, match=r"recipe: \[optim\] must be OptimSection\(\.\.\.\) or a dict"):
        Recipe(optim=0.1)
    assert Recipe(optim={"lr": 1}).optim.lr == 1.0 and isinstance(Recipe().optim.lr, float)
    toml = tmp_path / "bad.toml"
    toml.write_text("[run]\nseed = -1\n")
    assert one_line_error(ValueError, Recipe.load, toml).endswith(f"bad.toml: {expected} (numpy's seed range; "
                                                                  f"any seed in it is as good as another), got -1")
    api = one_line_error(ValueError, train, "A", tmp_path / "data", tmp_path / "run", overrides=["run.seed=-1"])
    assert main(["train", "--recipe", "A", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "r2"),
                 "--seed", "-1"]) == 2
    cli = capsys.readouterr().err.strip().splitlines()
    assert len(cli) == 1 and api.split(": ", 1)[1] in cli[0], (api, cli)  # one rule, one message
    for seed in (0, MAX_SEED):
        assert Recipe.load("A", [f"run.seed={seed}"]).run.seed == seed
    assert all(Recipe.load(name) for name in list_recipes())


def test_wrong_argument_types_are_one_line_before_any_folder_is_made(tmp_path):
    run = tmp_path / "run"
    message = one_line_error(ValueError, train, "A", tmp_path, run, overrides="optim.lr=0.1")
    assert message == "overrides='optim.lr=0.1' is a str; pass a list of section.key=value strings: " \
                      "overrides=['optim.lr=0.1']."
    assert "overrides[1]=0.1 (float)" in one_line_error(ValueError, apply_overrides, {}, ["optim.lr=1", 0.1])
    assert "is a str" in one_line_error(ValueError, Recipe.load, "A", "optim.lr=0.1")
    assert "data_dir=123: must be a path" in one_line_error(ValueError, train, "A", 123, run)
    assert "output_dir=None: must be a path" in one_line_error(ValueError, train, "A", tmp_path, None)
    assert "recipe=7: must be a path" in one_line_error(ValueError, train, 7, tmp_path, run)
    assert "resume='yes': must be True or False" in one_line_error(ValueError, train, "A", tmp_path, run,
                                                                   resume="yes")
    assert "stop_after_steps='5': must be a whole number" in one_line_error(ValueError, train, "A", tmp_path,
                                                                            run, stop_after_steps="5")
    assert not run.exists()


def test_resume_with_another_model_shape_is_one_line_and_a_lower_lr_takes_effect(imagenet, tmp_path):
    run = tmp_path / "run"
    train("A", imagenet, run, overrides=TINY, stop_after_steps=1, progress=False)
    message = one_line_error(ValueError, train, None, imagenet, run, resume=True,
                             overrides=["model.width=0.125", "model.name=B"])
    assert "model.name='vgg13' (last.pt: 'vgg11'), model.width=0.125 (last.pt: 0.0625)" in message, message
    # The optimizer state in last.pt carries the old lr: a --set on resume must still win.
    train(None, imagenet, run, resume=True, overrides=["optim.lr=0.001"], stop_after_steps=1, progress=False)
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == [pytest.approx(0.001)]
    assert state["recipe"]["optim"]["lr"] == 0.001 and state["global_step"] == 2


def test_nan_advice_names_resume_only_when_a_checkpoint_exists(imagenet, tmp_path, monkeypatch):
    calls, cross_entropy = [], torch.nn.functional.cross_entropy

    def poisoned(logits, labels, **kwargs):  # the 3rd step's loss is NaN
        calls.append(1)
        loss = cross_entropy(logits, labels, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    message = one_line_error(NonFiniteLossError, train, "A", imagenet, tmp_path / "first", overrides=TINY,
                             progress=False)
    assert "nothing to resume: start the run again with --set optim.lr=0.001 (the recipe's is 0.01" in message
    assert "--resume" not in message and not (tmp_path / "first" / "last.pt").exists()
    calls.clear()
    message = one_line_error(NonFiniteLossError, train, "A", imagenet, tmp_path / "second",
                             overrides=TINY + ["run.checkpoint_every=2"], progress=False)
    assert "continue with --resume --set optim.lr=0.001" in message, message
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    result = train(None, imagenet, tmp_path / "second", resume=True, overrides=["optim.lr=0.001"], progress=False)
    assert result.completed and np.isfinite(result.step_losses).all() and len(result.step_losses) == 2
