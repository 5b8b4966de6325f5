"""`vggkit info`: the layer table a user reads."""

import subprocess
import sys

import pytest

from vggkit.cli import build_parser, main
from vggkit.app.info import layer_rows
from vggkit.models.vgg import VGG


def test_info_table_for_vgg16(capsys):
    assert main(["info", "vgg16"]) == 0
    out = capsys.readouterr().out
    assert "| conv5_3 | 512 x 14 x 14 | 2,359,808 |" in out
    assert "| pool5 | 512 x 7 x 7 | 0 | 0.0M | 212 | 32 | 90 |" in out
    assert "parameters: 138,357,544 (Table 2: 138,357,544)" in out
    assert "(30.94 GFLOPs) at 224x224" in out  # the 30.9 GFLOP of a vgg16 forward


def test_info_rows_at_384_give_the_dense_map():
    rows = {r["layer"]: r for r in layer_rows("vgg16", input_size=384, width=1 / 16)}
    assert rows["fc8"]["shape"] == (1000, 6, 6) and rows["fc6"]["receptive_field"] == 404


def test_unknown_model_exits_2_with_a_one_line_error(capsys):
    assert main(["info", "vgg61"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vggkit info: error: Unknown VGG model 'vgg61'") and "Traceback" not in err


def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "vggkit", "info", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--input-size" in out.stdout and "receptive" in out.stdout


def test_too_small_input_and_non_positive_width_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exit_:  # refused while parsing, with the same range the API checks
        main(["info", "vgg16", "--input-size", "10"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and err.startswith("vggkit info: error: argument --input-size: 10: is too small")
    assert "at least 32 px" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["info", "vgg16", "--width", "0"])
    assert exit_.value.code == 2 and "--width: 0: must be a channel multiplier" in capsys.readouterr().err
    with pytest.raises(ValueError, match="width=-1: must be a channel multiplier"):
        VGG("vgg11", width=-1)


def test_help_gives_examples_and_the_top_level_help_says_where_to_look():
    parser = build_parser()
    assert "vggkit COMMAND --help" in parser.format_help() and "``" not in parser.format_help()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("info", "train", "evaluate", "finetune", "extract", "predict", "bench"):
        assert "example" in commands[name].format_help(), name


def test_warnings_print_as_one_line_without_source_code(capsys, monkeypatch):
    import warnings

    def warn_then_fail(args):
        warnings.warn("Skipped 1 file(s)")
        raise PermissionError(13, "Permission denied", "/root/out")

    monkeypatch.setattr("vggkit.cli._info", warn_then_fail)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["info"]) == 2  # an OSError is an exit code 2 with its message, not a traceback
    err = capsys.readouterr().err
    assert err.splitlines() == ["vggkit info: warning: Skipped 1 file(s)",
                                "vggkit info: error: [Errno 13] Permission denied: '/root/out'"]
