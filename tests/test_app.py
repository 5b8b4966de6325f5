"""app.py: every callback called as a function, then the served app called endpoint by endpoint."""

import os
import socket

import gradio as gr
import httpx
import pytest
from gradio_client import Client, handle_file
from matplotlib.figure import Figure
from PIL import Image

from app_server import EXAMPLES, TEST_WIDTH, load_app_module, served

app_module = load_app_module()
CAT = str(EXAMPLES / "chelsea.jpg")
COFFEE = str(EXAMPLES / "coffee.jpg")
ENDPOINTS = {"/receptive_field", "/receptive_field_config", "/receptive_field_at", "/compare_stacks",
             "/measure_stacks", "/score_maps", "/score_map_of_class", "/feature_maps"}


@pytest.fixture(scope="module")
def blocks():
    return app_module.build_app("vgg16", "none", TEST_WIDTH)


@pytest.fixture(scope="module")
def callbacks(blocks):
    return {block_fn.fn.__name__: block_fn.fn for block_fn in blocks.fns.values() if block_fn.fn is not None}


@pytest.fixture
def bomb(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (8000, 6000)).save(path)  # 48 million pixels in a few kilobytes
    return str(path)


def test_defaults_are_local_and_offline():
    args = app_module.parse_args([])
    assert (args.host, args.port, args.model, args.weights) == ("127.0.0.1", 7860, "vgg16", "imagenet")
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and os.environ["HF_HUB_OFFLINE"] == "1"


def test_untrained_weights_show_a_banner(blocks):
    banner = next(block for block in blocks.blocks.values() if getattr(block, "elem_id", None) == "untrained-banner")
    assert banner.visible and "Untrained weights" in banner.value and "--weights imagenet" in banner.value


def test_receptive_field_callbacks(callbacks):
    picture, figure, summary, x, y = callbacks["receptive_field"](CAT, "D", "conv3_3")
    assert picture.size == (448, 448) and isinstance(figure, Figure)
    assert "unit (28, 28) of its 56 x 56 map" in summary
    # A click on the picture: the select handler reads the position, the view snaps it to a unit's centre.
    event = gr.SelectData(None, {"index": [41, 300], "value": None})
    assert callbacks["clicked"](event) == (41, 300)
    picture, figure, summary, x, y = callbacks["receptive_field"](CAT, "D", "pool5", 41, 300)
    assert "unit (4, 0) of its 7 x 7 map" in summary and "212 x 212 px" in summary
    assert (x, y) == (31.0, 287.0)  # the unit's centre (15.5, 143.5) in the crop, at twice the size
    dropdown, table = callbacks["receptive_field_config"]("A", "conv3_3")
    assert dropdown.value == "pool3" and "conv3_3" not in [c[0] for c in dropdown.choices]
    assert table.set_index("layer").loc["pool5", "receptive field (px)"] == 150
    assert callbacks["receptive_field"](None, "D", "conv3_3") == (None, None, "", None, None)


def test_stack_callbacks(callbacks):
    costs, drawing = callbacks["compare_stacks"](32, 3, 56)
    assert costs["receptive field (px)"].tolist() == [7, 7] and isinstance(drawing, Figure)
    assert costs["weights"].tolist() == [f"3·9C² = 27C² = {27 * 32 ** 2:,}", f"49C² = {49 * 32 ** 2:,}"]
    measured = callbacks["measure_stacks"](8, 2, 16)
    assert measured["parameters (counted)"].tolist() == [f"{2 * (9 * 64 + 8):,}", f"{25 * 64 + 8:,}"]


def test_score_and_feature_callbacks(callbacks):
    top5, overlay, sizes, label = callbacks["score_maps"](CAT, ["224", "256"])
    assert len(top5) == 5 and label == f"{top5['index'].iloc[0]}: {top5['class'].iloc[0]}"
    assert isinstance(overlay, Figure) and sizes["class score map (w x h)"].tolist() == ["4 x 1", "6 x 2"]
    for asked in ("281", "281: tabby", "Tabby", 281):  # an index, the label shown, a name
        assert callbacks["score_maps"](CAT, ["224"], asked)[-1] == "281: tabby"
    assert callbacks["score_maps"](CAT, ["224"], "tiger")[-1] == "292: tiger"  # a whole name beats 'tiger cat'
    with pytest.raises(gr.Error, match=r"'terrier' matches 19 classes \(158: toy terrier, .*give its index"):
        callbacks["score_maps"](CAT, ["224"], "terrier")
    with pytest.raises(gr.Error, match="No class is named 'zebrafish'"):
        callbacks["score_maps"](CAT, ["224"], "zebrafish")
    grid, info = callbacks["feature_maps"](COFFEE, "pool4", 8)
    assert isinstance(grid, Figure) and dict(info.values.tolist())["output shape (C x H x W)"] == "32 x 14 x 14"


def test_bad_files_get_a_message_naming_them(callbacks, bomb, tmp_path):
    with pytest.raises(gr.Error, match="bomb.png.*decompression bomb"):
        callbacks["feature_maps"](bomb, "conv1_1", 4)
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    with pytest.raises(gr.Error, match="notes.jpg.*not an image"):
        callbacks["score_maps"](str(text), [256])


def test_a_taken_port_or_an_impossible_one_is_one_line_naming_port(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert app_module.main(["--weights", "none", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"port {port} on 127.0.0.1 is in use" in err and "--port" in err
    for bad in ("99999", "0", "http"):
        with pytest.raises(SystemExit) as exit_:
            app_module.parse_args(["--port", bad])
        assert exit_.value.code == 2 and "--port: must be a whole number from 1 to 65535" in capsys.readouterr().err


def test_a_bad_model_name_is_an_error_not_a_traceback(capsys):
    assert app_module.main(["--model", "vgg99", "--weights", "none"]) == 2
    assert "Unknown VGG model 'vgg99'" in capsys.readouterr().err


def test_help_has_examples_and_a_width_of_zero_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        app_module.parse_args(["--help"])
    assert exit_.value.code == 0 and "examples: python app.py" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        app_module.parse_args(["--weights", "none", "--width", "0"])
    assert exit_.value.code == 2 and "--width: 0: must be a channel multiplier between 1/64" in capsys.readouterr().err


def test_served_app_every_endpoint(blocks, bomb, tmp_path):
    with served(blocks) as url:
        assert blocks.server_name == "127.0.0.1" and blocks.share_url is None
        client = Client(url, verbose=False)
        api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert set(api) == ENDPOINTS
        description = client.view_api(print_info=False, return_format="str")
        assert len(description) < 10_000 and "value_" not in description  # no 1000-item lists, every output named
        class_input = api["/score_map_of_class"]["parameters"][2]
        assert class_input["parameter_name"] == "class_name" and class_input["type"]["type"] == "string"
        assert [r["label"] for r in api["/receptive_field"]["returns"]][2] == "Unit summary"
        cat = handle_file(CAT)

        picture, effective, summary, x, y = client.predict(cat, "D", "conv4_3", api_name="/receptive_field")
        assert Image.open(picture).size == (448, 448) and effective["type"] == "matplotlib"
        assert "92 x 92 px" in summary and (x, y) == (231.0, 231.0)
        _, _, summary, x, y = client.predict(cat, "D", "conv4_3", 0, 0, api_name="/receptive_field_at")
        assert "unit (0, 0)" in summary and (x, y) == (7.0, 7.0)
        layer, table = client.predict("E", "conv3_3", api_name="/receptive_field_config")
        assert layer["value"] == "conv3_3"
        assert [choice[0] for choice in layer["choices"]][-3:] == ["conv5_3", "conv5_4", "pool5"]
        assert ["pool5", 268, 32, 118, "7 x 7"] in table["data"]

        costs, drawing = client.predict(16, 2, 32, api_name="/compare_stacks")
        assert [row[1] for row in costs["data"]] == [5, 5] and drawing["type"] == "matplotlib"
        measured = client.predict(4, 3, 16, api_name="/measure_stacks")
        assert [row[2] for row in measured["data"]] == [7, 7]

        top5, overlay, sizes, label = client.predict(cat, ["224", "256"], api_name="/score_maps")
        assert len(top5["data"]) == 5 and label.startswith(f"{top5['data'][0][2]}: ") and overlay["type"] == "matplotlib"
        assert sizes["data"] == [[224, "336 x 224", "4 x 1"], [256, "384 x 256", "6 x 2"]]
        _, _, _, label = client.predict(cat, ["224"], "281", api_name="/score_map_of_class")  # as advertised
        assert label == "281: tabby"
        with pytest.raises(Exception, match="Class 1000 is out of range: give an index from 0 to 999"):
            client.predict(cat, ["224"], "1000", api_name="/score_map_of_class")

        grid, info = client.predict(cat, "pool1", 4, api_name="/feature_maps")
        assert grid["type"] == "matplotlib" and ["output shape (C x H x W)", "4 x 112 x 112"] in info["data"]

        with pytest.raises(Exception, match="decompression bomb"):
            client.predict(handle_file(bomb), "conv1_1", 4, api_name="/feature_maps")
        large = tmp_path / "big.png"
        large.write_bytes(b"\x89PNG" + os.urandom(11 * 1024 * 1024))
        with pytest.raises(Exception, match="exceeds the maximum file size of 10485760 bytes"):
            client.predict(handle_file(str(large)), "conv1_1", 4, api_name="/feature_maps")
        # The server refuses it too, not only the polite client.
        response = httpx.post(url + "gradio_api/upload", files={"files": ("big.png", large.read_bytes())})
        assert response.status_code >= 400 and "File size exceeded maximum allowed size" in response.text
