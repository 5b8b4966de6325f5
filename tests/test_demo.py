"""vggkit.app.demo: every computation the app shows, checked against the paper and plain references."""

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import vggkit
from vggkit.app import demo
from vggkit.models.backbone import VGGBackbone
from vggkit.models.configs import PAPER_PARAMETERS
from vggkit.data.images import ImageError
from vggkit.models.receptive_field import receptive_field

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"
CAT = EXAMPLES / "chelsea.jpg"  # 451 x 300


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return demo.load_demo_model("vgg16", "none", width=1 / 16)


def test_examples_are_real_photographs_with_a_licence_note():
    names = sorted(p.name for p in EXAMPLES.glob("*.jpg"))
    assert names == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    note = (EXAMPLES / "README.md").read_text()
    assert all(name in note for name in names) and "CC0" in note and "public domain" in note
    assert Image.open(CAT).size == (451, 300)


@pytest.mark.parametrize("name", ["vgg11", "vgg16", "vgg16c", "vgg19"])
def test_a_click_selects_the_unit_whose_box_holds_it(name):
    for layer in demo.spatial_layers(name):
        rf = receptive_field(name)[layer]
        side = demo.map_side(rf, demo.CROP)
        for row, col in [(0, 0), (side // 2, side // 3), (side - 1, side - 1)]:
            top, left, bottom, right = rf.box(row, col)
            centre = ((left + right - 1) / 2, (top + bottom - 1) / 2)
            assert demo.unit_at(rf, side, *centre) == (row, col)
        for x, y in [(0, 0), (100, 37), (223, 223)]:
            top, left, bottom, right = rf.box(*demo.unit_at(rf, side, x, y))
            assert top <= y < bottom and left <= x < right


def test_effective_extent():
    heat = np.zeros((31, 31))
    heat[15, 15] = 1
    assert demo.effective_extent(heat, (15, 15)) == 1
    heat[10:21, 10:21] = 1  # an 11x11 square: 90% of it needs the whole square
    assert demo.effective_extent(heat, (15, 15)) == 11
    assert demo.effective_extent(np.zeros((5, 5)), (2, 2)) == 0


def test_receptive_field_table_has_the_papers_numbers():
    table = demo.receptive_field_table("vgg16").set_index("layer")
    assert tuple(table.loc["pool5", ["receptive field (px)", "stride", "padding"]]) == (212, 32, 90)
    assert table.loc["conv5_3", "receptive field (px)"] == 196
    assert table.loc["fc6", "receptive field (px)"] == 404
    assert table.loc["pool5", "map at 224 px"] == "7 x 7" and table.loc["fc6", "map at 224 px"] == "1 x 1"
    assert demo.receptive_field_table("E").set_index("layer").loc["pool4", "receptive field (px)"] == 124
    assert demo.receptive_field_table("A", input_size=128).set_index("layer").loc["fc8", "map at 128 px"] == \
        "none (needs 224 px)"


def test_table1_and_table2_come_from_the_configs():
    table1 = demo.table1().set_index("")
    assert table1.loc["weight layers"].tolist() == ["11", "11", "13", "16", "16", "19"]
    assert table1.loc["block 1", "A-LRN"] == "conv3-64, LRN, maxpool"
    assert table1.loc["block 3", "C"] == "conv3-256 x2, conv1-256, maxpool"
    assert table1.loc["block 5", "E"] == "conv3-512 x4, maxpool"
    assert table1.loc["fc8", "D"] == "FC-1000"
    table2 = demo.table2().set_index("config")
    for config, count in PAPER_PARAMETERS.items():
        assert table2.loc[config, "parameters (counted)"] == f"{count:,}" and table2.loc[config, "equal"] == "yes"
    conv, dense = demo.parameter_split("D")
    assert conv == 14_714_688 and conv + dense == PAPER_PARAMETERS["D"]
    assert table2.loc["D", "with batch norm"] == "138,365,992"  # torchvision's vgg16_bn


def test_receptive_field_view_agrees_with_the_gradient(network):
    view = network.receptive_field_view(CAT, "vgg16", "conv3_3", click=(300, 100))
    rf = receptive_field("vgg16")["conv3_3"]
    assert view.unit == network.unit_for_click("vgg16", "conv3_3", 300, 100) == (12, 37)
    assert view.box == rf.box(12, 37)
    top, left, bottom, right = view.box
    inside = np.zeros_like(view.heat, dtype=bool)
    inside[max(top, 0):bottom, max(left, 0):right] = True
    # Gradients never reach outside the theoretical receptive field, and reach inside it.
    assert view.heat.shape == (224, 224) and view.heat.max() == pytest.approx(1.0)
    assert (view.heat[~inside] == 0).all() and view.heat[inside].sum() > 0
    assert 1 <= view.effective_size <= rf.receptive_field + 2
    assert view.picture.size == (448, 448) and isinstance(view.effective, Figure)
    assert network.unit_for_click("vgg16", "conv3_3", *view.marker) == view.unit
    assert "40 x 40 px" in view.summary


def test_another_config_gets_random_weights_and_its_own_layers(network):
    view = network.receptive_field_view(CAT, "A", "pool5")
    assert view.unit == (3, 3) and view.box == receptive_field("A")["pool5"].box(3, 3)
    assert "random weights" in view.summary and "150 x 150 px" in view.summary
    with pytest.raises(ValueError, match="no spatial map in vgg11.*conv3_1"):
        network.receptive_field_view(CAT, "A", "conv3_3")


def test_results_are_cached_by_image_content(network):
    first = network.receptive_field_view(CAT, "vgg16", "pool2")
    again = network.receptive_field_view(Image.open(CAT), "vgg16", "pool2")  # same pixels, another object
    assert again is first
    assert network.feature_maps_view(CAT, "conv1_1") is network.feature_maps_view(str(CAT), "conv1_1")


def test_feature_maps_are_the_strongest_channels(network):
    view = network.feature_maps_view(CAT, "conv2_2", count=4)
    x = network.network_input(demo.square_crop(Image.open(CAT).convert("RGB")))
    with torch.no_grad():
        reference = VGGBackbone(network.model, ["conv2_2"])(x)["conv2_2"][0]
    means = reference.mean(dim=(1, 2))
    assert view.channels == means.argsort(descending=True)[:4].tolist()
    info = dict(view.info.values.tolist())
    assert info["output shape (C x H x W)"] == f"{reference.shape[0]} x 112 x 112"
    assert info["receptive field"] == "14 x 14 px"
    with pytest.raises(ValueError, match="no spatial map"):
        network.feature_maps_view(CAT, "fc7")


def test_score_map_sizes_match_the_fully_convolutional_network(network):
    image = Image.open(CAT).convert("RGB")
    sizes = demo.score_map_sizes(image.size, (224, 256))
    for (_, row), scale in zip(sizes.iterrows(), (224, 256)):
        maps = vggkit.class_score_maps(network.model, image, scale=scale)
        assert row["class score map (w x h)"] == f"{maps.shape[2]} x {maps.shape[1]}"
    assert sizes["rescaled image (W x H)"].tolist() == ["336 x 224", "384 x 256"]


def test_score_maps_view_is_the_papers_dense_evaluation(network):
    view = network.score_maps_view(CAT, [224])
    probabilities = vggkit.dense_predict(network.model, CAT, scales=(224,), flip=True)
    top = probabilities.topk(5)
    assert view.top5["index"].tolist() == top.indices.tolist()
    assert view.top5["probability"].tolist() == pytest.approx(top.values.tolist(), abs=1e-4)
    assert view.class_index == int(top.indices[0])
    assert view.top5["class"].iloc[0] == demo.imagenet_categories()[view.class_index]
    assert isinstance(view.overlay, Figure)
    other = network.score_maps_view(CAT, (224,), class_index=3)
    assert other.class_index == 3 and other.top5.equals(view.top5)
    with pytest.raises(ValueError, match="out of range"):
        network.score_maps_view(CAT, (224,), class_index=1000)
    with pytest.raises(ValueError, match="must be an integer >= 224"):
        network.score_maps_view(CAT, (128,))


def test_untrained_weights_are_said_and_a_file_loads(tmp_path, offline_hub, monkeypatch):
    import urllib.error

    def refuse(*args, **kwargs):  # torch.hub binds urlopen itself
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "urlopen", refuse, raising=False)
    offline = demo.load_demo_model("vgg11", "imagenet", width=1 / 16)
    assert not offline.trained and "could not be loaded" in offline.notice
    assert "--weights imagenet" in offline.notice and "--weights path/to" in offline.notice
    assert len(offline.class_names) == 1000 and offline.class_names[0] == "tench"
    model = vggkit.create_model("vgg11", num_classes=3, width=1 / 16)
    model.class_names = ["cat", "cup", "rocket"]
    path = vggkit.save_checkpoint(model, tmp_path / "small.pth")
    loaded = demo.load_demo_model("vgg11", path)
    assert loaded.trained and loaded.notice is None and loaded.class_names == ["cat", "cup", "rocket"]
    assert str(path) in loaded.weights_table()["value"].tolist()
    with pytest.raises(FileNotFoundError):
        demo.load_demo_model("vgg11", tmp_path / "missing.pth")


def test_large_photographs_are_scaled_down_on_opening(tmp_path):
    path = tmp_path / "large.jpg"
    Image.new("RGB", (3000, 2000), (200, 100, 50)).save(path)
    assert demo.open_image(path).size == (1536, 1024)
    assert demo.open_image(CAT).size == (451, 300)


def test_a_batch_norm_model_is_its_own_config():
    network = demo.load_demo_model("vgg11_bn", "none", width=1 / 16)
    assert network.network("A") is network.model and network.network("vgg11") is network.model
    assert network.network("B") is not network.model
    assert "the loaded weights" in network.receptive_field_view(CAT, "A", "conv2_1").summary


def test_bad_images_are_refused_with_the_file_name(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (8000, 6000)).save(bomb)  # 48 million pixels in a few kilobytes
    with pytest.raises(ImageError, match="bomb.png.*decompression bomb"):
        demo.open_image(bomb)
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    with pytest.raises(ImageError, match="notes.jpg.*not an image"):
        demo.open_image(text)
    with pytest.raises(ValueError, match="No image"):
        demo.open_image(None)


def test_the_dense_views_refuse_an_image_too_long_once_rescaled(network):
    demo.check_rescaled_size((451, 300), (224, 512))  # an ordinary photograph: 770 x 512 fits
    with pytest.raises(ValueError, match=r"1000 x 250 image rescaled to Q = 512 is 2048 x 512 = 1,048,576 "
                                         r"pixels, above the limit of 1,000,000 .*pick test scales up to Q = 500"):
        demo.check_rescaled_size((1000, 250), (256, 512))
    # 20,000 pixels in the file, 250 million after rescaling: refused before any allocation.
    with pytest.raises(ValueError, match=r"2 x 10000 image rescaled to Q = 224 is 224 x 1120000.*crop it to an "
                                         r"aspect ratio of at most 1:19"):
        network.score_maps_view(Image.new("RGB", (2, 10000)), [224])


def test_crop_views_take_the_centre_square_of_any_shape(network):
    wide = Image.new("RGB", (10000, 2), (200, 40, 40))
    assert demo.square_crop(wide).size == (224, 224)
    assert dict(network.feature_maps_view(wide, "pool1", 4).info.values.tolist())["input"] == "224 x 224 centre crop"
    # The same window as rescale-then-crop: equal pixels when the rescale is exact (600 x 400 -> 336 x 224).
    coffee = Image.open(EXAMPLES / "coffee.jpg").convert("RGB")
    from torchvision.transforms import functional as TF

    reference = TF.center_crop(demo.rescale_shortest(coffee, 224), 224)
    assert np.array_equal(np.asarray(demo.square_crop(coffee)), np.asarray(reference))


def test_a_view_over_its_time_budget_answers_with_a_message(network, monkeypatch):
    monkeypatch.setattr(network, "time_budget", 0.0)
    with pytest.raises(TimeoutError, match="class score maps took longer than its budget of 0 s"):
        network.score_maps_view(CAT, [256, 384])


def test_classes_by_index_label_or_name(network):
    assert [network.parse_class(c) for c in (None, " ", 7, 7.0, "7", "281: tabby", "TABBY", "Egyptian")] == \
        [None, None, 7, 7, 7, 281, 281, 285]
    with pytest.raises(ValueError, match="Class -1 is out of range: give an index from 0 to 999"):
        network.parse_class("-1")


def test_failures_are_described_in_one_line_without_server_paths():
    assert demo.describe_error(ImageError("/tmp/gradio/0a1b/notes.jpg", "not an image")) == "notes.jpg: not an image"
    assert "Not enough memory" in demo.describe_error(MemoryError())
    assert "Not enough memory" in demo.describe_error(RuntimeError("[enforce fail] DefaultCPUAllocator: can't "
                                                                   "allocate memory: you tried to allocate 9 GB"))
    message = demo.describe_error(KeyError("boom"))
    assert message.startswith("This view failed (KeyError: 'boom')") and "\n" not in message
