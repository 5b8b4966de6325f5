"""A new user's first hour: ranges checked once (API and CLI), one voice, defaults that learn, a light CLI.

CLI cases run the real ``vggkit`` entry point in a subprocess, with this tree first on the path.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vggkit
from vggkit.utils.checks import ArgumentError

from image_folders import make_photo_crops, make_shapes

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "vgg11_bn", "--width", "0.125", "--image-size", "32"]


def vggkit_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "vggkit", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit 2 and a last line saying what is wrong, never a traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "error:" in line
    for text in expected:
        assert text in line, line
    return line


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), per_class=8, size=40)


# --------------------------------------------------------------------------- a light command line


def test_cli_module_does_not_import_torch():
    """--help and --version answer at once because nothing heavy is imported to parse arguments."""
    code = ("import sys, vggkit, vggkit.cli; vggkit.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'gradio', 'vggkit.weights.factory') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip()
    assert out == "[]"


def test_version_and_every_help():
    assert vggkit_cli("--version").stdout.strip() == f"vggkit {vggkit.__version__}"
    for command in ("info", "train", "evaluate", "finetune", "extract", "predict", "bench"):
        result = vggkit_cli(command, "--help")
        assert result.returncode == 0, result.stderr
        # Every option says what it does: argparse prints an option without help on a line of its own.
        from vggkit.cli import build_parser

        sub = build_parser()._subparsers._group_actions[0].choices[command]
        undocumented = [a.option_strings for a in sub._actions if a.option_strings and not a.help]
        assert not undocumented, (command, undocumented)


def test_public_api_still_resolves_after_submodule_imports():
    """``vggkit.train`` stays the function although ``vggkit/train.py`` is a module of the same name."""
    import vggkit.finetuning.finetune  # noqa: F401
    import vggkit.training.loop  # noqa: F401

    assert callable(vggkit.train) and callable(vggkit.finetune) and callable(vggkit.evaluate)
    assert set(vggkit.__all__) <= set(dir(vggkit))


def test_cli_protocol_choices_match_the_library():
    """The parser's choices are the library's names, and the library takes every one the parser lets through."""
    from vggkit.cli import build_parser
    from vggkit.evaluation.evaluate import PROTOCOLS, check_protocols
    from vggkit.utils.choices import DECODERS, PRECISIONS

    commands = build_parser()._subparsers._group_actions[0].choices

    def choices(command: str, flag: str) -> tuple:
        (action,) = [a for a in commands[command]._actions if flag in a.option_strings]
        return tuple(action.choices)

    assert choices("evaluate", "--protocol") == PROTOCOLS
    assert check_protocols(list(choices("evaluate", "--protocol"))) == list(PROTOCOLS)
    for protocol in choices("evaluate", "--protocol"):
        assert check_protocols(protocol) == [protocol]
    for command in ("evaluate", "extract"):
        assert choices(command, "--decode") == DECODERS, command
    for command in ("evaluate", "extract", "predict"):
        assert choices(command, "--precision") == PRECISIONS, command


# --------------------------------------------------------------------------- ranges, once


@pytest.mark.parametrize("args, flag", [
    (["finetune", "DATA", "--weights", "none", "--epochs", "0"], "--epochs"),
    (["finetune", "DATA", "--epochs", "-3"], "--epochs"),
    (["finetune", "DATA", "--width", "inf"], "--width"),
    (["finetune", "DATA", "--width", "1e-9"], "--width"),
    (["finetune", "DATA", "--val-fraction", "1.5"], "--val-fraction"),
    (["finetune", "DATA", "--val-fraction", "0"], "--val-fraction"),
    (["finetune", "DATA", "--patience", "0"], "--patience"),
    (["finetune", "DATA", "--image-size", "16"], "--image-size"),
    (["finetune", "DATA", "--lr", "nan"], "--lr"),
    (["finetune", "DATA", "--lr", "inf"], "--lr"),
    (["finetune", "DATA", "--num-classes", "0"], "--num-classes"),
    (["evaluate", "--model", "vgg11", "--data", "DATA", "--workers", "-1"], "--workers"),
    (["extract", "DATA", "--scales", "0"], "--scales"),
    (["extract", "DATA", "--scales", "100000"], "--scales"),
    (["extract", "DATA", "--width", "inf"], "--width"),
    (["train", "--recipe", "A", "--data", "DATA", "--output", "OUT", "--stop-after-steps", "-1"],
     "--stop-after-steps"),
    (["info", "--input-size", "0"], "--input-size"),
])
def test_out_of_range_arguments_are_refused_while_parsing(args, flag, shapes, tmp_path):
    args = [str(shapes) if a == "DATA" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert_one_line_error(vggkit_cli(*args), flag)
    assert not (tmp_path / "out").exists()


def test_network_size_errors_reuse_the_info_explanation(shapes):
    line = assert_one_line_error(vggkit_cli("finetune", str(shapes), "--image-size", "16"), "--image-size")
    assert "2x2 max-poolings need at least 32 px" in line and "vggkit info --input-size" in line


@pytest.mark.parametrize("kwargs, argument", [
    ({"width": math.inf}, "width"), ({"width": 1e-9}, "width"), ({"width": 100.0}, "width"),
    ({"num_classes": 0}, "num_classes"), ({"num_classes": -3}, "num_classes"),
    ({"layout": "bogus", "weights": "any.pth"}, "layout"),
])
def test_api_ranges_name_the_argument(kwargs, argument):
    with pytest.raises(ArgumentError) as error:
        vggkit.create_model("vgg11", **kwargs)
    assert error.value.argument == argument and str(error.value).startswith(f"{argument}=")


@pytest.mark.parametrize("kwargs, argument", [
    ({"lr": float("nan")}, "lr"), ({"lr": -1.0}, "lr"), ({"epochs": 0}, "epochs"), ({"patience": 0}, "patience"),
    ({"val_fraction": 1.5}, "val_fraction"), ({"val_fraction": 0.0}, "val_fraction"),
    ({"num_workers": -1}, "num_workers"), ({"image_size": 8}, "image_size"), ({"num_classes": 1}, "num_classes"),
])
def test_finetune_api_refuses_before_any_work(kwargs, argument, shapes, tmp_path):
    with pytest.raises(ArgumentError) as error:
        vggkit.finetune(shapes, weights=None, output_dir=tmp_path / "run", progress=False, **kwargs)
    assert error.value.argument == argument
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_one_line(shapes, tmp_path):
    assert_one_line_error(vggkit_cli("finetune", str(shapes), "--weights", "none", "--device", "cuda", *TINY),
                          "--device cuda", "no CUDA GPU")
    make_shapes(tmp_path / "data" / "train", per_class=2, size=40)
    make_shapes(tmp_path / "data" / "val", per_class=1, size=40)
    assert_one_line_error(vggkit_cli("train", "--recipe", "A", "--data", str(tmp_path / "data"), "--output",
                                     str(tmp_path / "run"), "--set", "model.num_classes=2", "--set",
                                     "run.device=cuda"), "run.device", "no CUDA GPU")


def test_recipe_values_use_the_same_ranges(tmp_path):
    make_shapes(tmp_path / "data" / "train", per_class=2, size=40)
    make_shapes(tmp_path / "data" / "val", per_class=1, size=40)
    for setting, key in (("data.crop=8", "data.crop"), ("model.width=inf", "model.width"),
                         ("optim.lr=nan", "optim.lr")):
        assert_one_line_error(vggkit_cli("train", "--recipe", "A", "--data", str(tmp_path / "data"), "--output",
                                         str(tmp_path / "run"), "--set", setting), key)


def test_single_class_finetuning_is_refused(tmp_path):
    make_shapes(tmp_path / "one", per_class=4, size=40)
    (tmp_path / "one" / "square").rename(tmp_path / "square_elsewhere")
    line = assert_one_line_error(vggkit_cli("finetune", str(tmp_path / "one"), "--weights", "none", *TINY,
                                            "--output", str(tmp_path / "run")), "at least two classes")
    assert "circle" in line


# --------------------------------------------------------------------------- one voice


def test_cli_voice_speaks_flags():
    from vggkit.cli import cli_voice

    assert cli_voice("pass weights='path/x.pth' or num_classes=3") == "pass --weights path/x.pth or --num-classes 3"
    assert cli_voice("pass model='D' (--model D).") == "pass --model D."
    assert cli_voice("set model.width=0.5 in the recipe") == "set model.width=0.5 in the recipe"


def test_checkpoint_errors_speak_cli_flags(shapes, tmp_path):
    checkpoint = vggkit.save_checkpoint(vggkit.create_model("vgg11", width=1 / 16, num_classes=2), tmp_path / "m.pth")
    for args in (["evaluate", "--model", str(checkpoint), "--data", str(shapes), "--weights", "imagenet"],
                 ["extract", str(shapes), "--model", str(checkpoint), "--weights", "none"]):
        line = assert_one_line_error(vggkit_cli(*args), "--weights")
        assert "weights=" not in line
    line = assert_one_line_error(vggkit_cli("extract", str(shapes), "--model", str(checkpoint), "--width", "0.125"),
                                 "--width 0.125", "brings its own width")


def test_evaluate_random_weights_says_so_in_flags(shapes):
    result = vggkit_cli("evaluate", "--model", "vgg11", "--weights", "none", "--data", str(shapes), "--protocol",
                        "center", "--no-progress", "--workers", "0")
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warning and "randomly initialised" in warning[0] and "No weights given" not in warning[0]
    assert "weights=" not in warning[0] and "--weights imagenet" in warning[0]


# --------------------------------------------------------------------------- random weights


def test_random_init_is_reproducible_across_extract_calls(shapes):
    kwargs = dict(layer="pool5", scales=(32,), weights=None, width=1 / 16, precision="fp32", device="cpu",
                  progress=False)
    first = vggkit.extract_features("vgg11", shapes, **kwargs)
    torch.manual_seed(1234)  # the caller's RNG state does not matter
    second = vggkit.extract_features("vgg11", shapes, **kwargs)
    np.testing.assert_array_equal(first.features, second.features)


def test_finetune_from_scratch_with_defaults_learns_real_photographs(tmp_path):
    """Crops of two scikit-image photographs; with weights=None the defaults train everything."""
    data = make_photo_crops(tmp_path / "photos", per_class=40, crop=64)
    with pytest.warns(UserWarning, match="strategy='full', optimizer='adamw', backbone_lr_scale=1.0"):
        result = vggkit.finetune(data, 2, weights=None, model="vgg11_bn", width=1 / 8, image_size=32, epochs=10,
                                 output_dir=tmp_path / "run", progress=False)
    assert result.config["strategy"] == "full" and result.config["optimizer"] == "adamw"
    assert max(row["val_acc"] for row in result.history) >= 0.9
    assert result.metrics["accuracy"] >= 0.9


def test_head_strategy_on_random_weights_is_called_out(shapes, tmp_path):
    with pytest.warns(UserWarning, match="chance-level"):
        vggkit.finetune(shapes, weights=None, strategy="head", model="vgg11", width=1 / 16, image_size=32, epochs=1,
                        output_dir=tmp_path / "run", progress=False)


def test_patience_counts_epochs_without_better_accuracy(shapes, tmp_path):
    """A learning rate too small to change anything: accuracy is flat, so the run stops after ``patience``."""
    result = vggkit.finetune(shapes, weights=None, model="vgg11", width=1 / 16, image_size=32, epochs=10,
                             patience=2, lr=1e-12, output_dir=tmp_path / "run", progress=False)
    assert len(result.history) == 3
    assert result.history[-1]["lr"] == 1e-12  # the schedule did not divide it towards nothing meanwhile


# --------------------------------------------------------------------------- feedback on long work


def test_finetune_no_progress_still_prints_epoch_lines(shapes, tmp_path):
    result = vggkit_cli("finetune", str(shapes), "--weights", "none", *TINY, "--epochs", "2", "--no-progress",
                        "--output", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    epochs = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2
    assert "strategy full" in result.stderr.replace("--", "")


def test_extract_progress_counts_images(shapes, tmp_path):
    result = vggkit_cli("extract", str(shapes), "--weights", "none", "--model", "vgg11", "--width", "0.0625",
                        "--layer", "pool5", "--scales", "32", "--batch-size", "16", "-o", str(tmp_path / "f.npz"))
    assert result.returncode == 0, result.stderr
    assert "16/16" in result.stderr and "image" in result.stderr


def test_toy_run_epoch_lines_do_not_compare_with_the_paper():
    from vggkit.training.recipe import Recipe
    from vggkit.training.loop import epoch_summary, target_gap

    row = {"epoch": 1, "train_loss": 1.0, "val_top1_error": 50.0, "val_top5_error": 10.0, "lr": 0.01,
           "images_per_s": 1.0}
    toy = Recipe.load("A", ["model.num_classes=3"])
    assert target_gap(toy, row) == {} and "paper" not in epoch_summary(toy, row)
    imagenet = Recipe.load("A")
    assert "paper" in epoch_summary(imagenet, {**row, **target_gap(imagenet, row)})


# --------------------------------------------------------------------------- packaging


def wheel_building_env() -> dict[str, str]:
    """This environment, with the newest setuptools on ``sys.path`` first when it can build wheels (70.1 and
    later hold bdist_wheel): in a venv, the 65.5 that Python 3.11's ensurepip put there shadows the base
    Python's newer one and cannot build a wheel without the ``wheel`` package."""
    from importlib import metadata

    found = []
    for dist in metadata.distributions():
        if (dist.metadata["Name"] or "").lower() == "setuptools":
            version = tuple(int(part) for part in dist.version.split(".")[:2] if part.isdigit())
            found.append((version, str(dist.locate_file(""))))
    env = dict(os.environ)
    newest = max(found, default=None)
    if newest and newest[0] >= (70, 1):
        env["PYTHONPATH"] = os.pathsep.join([newest[1]] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@pytest.mark.slow
def test_non_editable_install_ships_recipes_and_app(tmp_path):
    """pip install . (not editable) into a fresh venv: recipes and the app come with the package."""
    import shutil

    source = tmp_path / "src"  # a copy: building in place would write build/ into the tree under test
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "app.py"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("vggkit", "recipes", "assets"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # What pip install . does, in two steps: the wheel is built with a setuptools installed here (a fresh
    # venv's bundled one may lack bdist_wheel, and the tests do not reach the network for another).
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300,
                           env=wheel_building_env())
    assert build.returncode == 0, build.stderr
    venv = tmp_path / "venv"
    # A venv's --system-site-packages is the base Python's, not the running one's: when the suite itself
    # runs in a venv (torch installed there), the new venv would find no torch. A .pth file adds the running
    # interpreter's site-packages after the new venv's own (plain paths: their .pth files, an editable
    # vggkit among them, are not run), so a system Python and a venv both work.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    inner = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    outer = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    (Path(inner) / "vggkit-test-running-site.pth").write_text("".join(f"{p}\n" for p in outer))
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q",
                              *map(str, (tmp_path / "dist").glob("vggkit-*.whl"))], capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stderr
    shutil.rmtree(source)  # nothing may come from the source tree any more
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "vggkit"), *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)

    where = subprocess.run([str(python), "-c", "import vggkit; print(vggkit.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, check=True).stdout
    assert str(venv) in where
    recipes = run("train", "--list-recipes")
    assert recipes.returncode == 0 and "D-256-512" in recipes.stdout.split()
    assert run("train", "--recipe", "A", "--help").returncode == 0
    app_help = run("app", "--help")
    assert app_help.returncode == 0 and "--port" in app_help.stdout
    found = subprocess.run([str(python), "-c", "from vggkit.app.launch import load_app; app = load_app(); "
                            "print(app.__file__, len(app.EXAMPLES))"], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=120)
    assert found.returncode == 0, found.stderr
    path, examples = found.stdout.split()
    assert path.startswith(str(venv)) and int(examples) >= 4
