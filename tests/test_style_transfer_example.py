"""The style-transfer example runs end to end offline, on random weights, and says they make no picture."""

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "recipes" / "examples" / "style_transfer.py"
PHOTOS = ROOT / "assets" / "examples"


def _load():
    spec = importlib.util.spec_from_file_location("style_transfer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_weights_write_a_png_and_say_it_is_not_meaningful(tmp_path, capsys):
    output = tmp_path / "out" / "stylised.png"
    result = _load().main([str(PHOTOS / "chelsea.jpg"), str(PHOTOS / "coffee.jpg"), "-o", str(output),
                           "--weights", "none", "--width", "0.0625", "--size", "32", "--steps", "6"])
    captured = capsys.readouterr()
    assert "picture will not be meaningful" in captured.out
    assert "stylising" in captured.err  # the progress bar
    with Image.open(output) as picture:
        assert picture.format == "PNG" and min(picture.size) == 32
    assert len(result["losses"]) == 6 and min(result["losses"][1:]) < result["losses"][0]
    assert not list(output.parent.glob(".*partial"))


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    main = _load().main
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.jpg"), str(PHOTOS / "coffee.jpg"), "--weights", "none"])
    assert exit_info.value.code == 2 and "missing.jpg" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(PHOTOS / "chelsea.jpg"), str(PHOTOS / "coffee.jpg"), "-o", str(tmp_path / "x.jpg")])
    assert "give a name ending in .png" in capsys.readouterr().err
