"""`vggkit info`: the layer table a user reads."""

import subprocess
import sys

from vggkit.cli import main
from vggkit.info import layer_rows


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
