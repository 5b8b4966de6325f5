"""Feature extraction (any layer, the paper's transfer descriptor), .npz output and linear probes."""

from pathlib import Path

import numpy as np
import pytest
import torch
from image_folders import make_photo_crops
from PIL import Image
from torchvision.transforms import functional as TF

import vggkit
from vggkit.models.backbone import VGGBackbone
from vggkit.cli import main
from vggkit.data.transforms import EvalTransform
from vggkit.features.extract import Features, extract_features, probe


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vggkit.create_model("vgg16", width=1 / 16, num_classes=2).eval()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_photo_crops(tmp_path_factory.mktemp("photos"), per_class=30)


FP32_CPU = {"precision": "fp32", "device": "cpu"}  # for tests that compare float32 numbers


def photo(size=(300, 240), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_dense_fc7_at_224_is_the_classifier_fc7(model):
    """On a 224 px image the dense fc7 map is 1x1 and equals the fully-connected fc7."""
    images = [photo((224, 224), seed) for seed in range(3)]
    features = extract_features(model, images, layer="fc7", scales=(224,), normalize=False, progress=False,
                                **FP32_CPU)
    x = torch.stack([model.preprocess.normalize(TF.to_tensor(image)) for image in images])
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    np.testing.assert_allclose(features.features, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert features.labels.tolist() == [-1, -1, -1] and features.layer == "fc7"


def test_paper_descriptor_flip_normalisation_and_scales(model):
    image = photo((300, 240))
    mirror = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scales = (224, 256)
    per_view = extract_features(model, [image, mirror], scales=scales, reduce=None, normalize=False,
                                progress=False, **FP32_CPU)
    flipped = extract_features(model, [image], scales=scales, flip=True, reduce=None, normalize=False,
                               progress=False, **FP32_CPU)
    assert per_view.features.shape == (2, 2, 256)  # (images, scales, fc7 channels)
    np.testing.assert_allclose(flipped.features[0], per_view.features.mean(axis=0), rtol=1e-4, atol=1e-6)

    unit = per_view.features[:1] / np.linalg.norm(per_view.features[:1], axis=-1, keepdims=True)
    kept = extract_features(model, [image], scales=scales, reduce=None, progress=False, **FP32_CPU).features
    np.testing.assert_allclose(kept, unit, rtol=1e-4, atol=1e-6)
    stacked = extract_features(model, [image], scales=scales, reduce="stack", progress=False, **FP32_CPU).features
    np.testing.assert_allclose(stacked, unit.reshape(1, -1), rtol=1e-4, atol=1e-6)
    averaged = extract_features(model, [image], scales=scales, reduce="mean", progress=False, **FP32_CPU).features
    np.testing.assert_allclose(averaged, unit.mean(axis=1), rtol=1e-4, atol=1e-6)


def test_conv_layers_pooled_or_as_maps_match_the_backbone(model):
    images = [photo((96, 80), s) for s in range(2)]
    tap = VGGBackbone(model, ["conv4_3"]).eval()
    x = torch.stack([EvalTransform(scale=96, crop=96, preprocess=model.preprocess)(im) for im in images])
    with torch.no_grad():
        expected = tap(x)["conv4_3"]
    maps = extract_features(model, images, layer="conv4_3", scales=(96,), pool=None, progress=False, **FP32_CPU)
    assert maps.features.shape == (2, 32, 12, 12)
    np.testing.assert_allclose(maps.features, expected.numpy(), rtol=1e-4, atol=1e-5)
    pooled = extract_features(model, images, layer="conv4_3", scales=(96,), crop=96, normalize=False,
                              progress=False, **FP32_CPU)
    np.testing.assert_allclose(pooled.features, expected.mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-5)


def test_bad_arguments_are_clear_errors(model):
    with pytest.raises(ValueError, match="Unknown layer name.*Valid layers: conv1_1"):
        extract_features(model, [photo()], layer="conv6_1", progress=False)
    with pytest.raises(ValueError, match="give one scale"):
        extract_features(model, [photo()], layer="pool5", pool=None, scales=(224, 256), progress=False)
    with pytest.raises(ValueError, match="Unknown reduce 'max'"):
        extract_features(model, [photo()], reduce="max", progress=False)
    linear = vggkit.create_model("vgg11", width=1 / 16)
    vggkit.models.heads.attach_head(linear, "linear", 2)
    with pytest.raises(ValueError, match="needs the VGG classifier .* 'linear' head; use .* 'pool5'"):
        extract_features(linear, [photo()], layer="fc7", progress=False)
    with pytest.raises(ValueError, match="fully-convolutional VGG needs an input of at least 224"):
        extract_features(model, [photo()], layer="fc7", scales=(128,), progress=False)


def test_default_imagenet_weights_fail_offline(offline_hub):
    with pytest.raises(vggkit.WeightsUnavailableError, match="Could not download"):
        extract_features("vgg16", [photo()], progress=False)


def linked_subset(photos: Path, data: Path, per_class: int = 3) -> Path:
    """``data/<class>/`` holding links to the first ``per_class`` photos of each class of ``photos``."""
    for name in ("chelsea", "coffee"):
        (data / name).mkdir(parents=True)
        for path in sorted((photos / name).glob("*.jpg"))[:per_class]:
            (data / name / path.name).symlink_to(path)
    return data


def test_folder_labels_skipped_files_and_npz_round_trip(model, photos, tmp_path):
    data = linked_subset(photos, tmp_path / "data")
    (data / "coffee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.warns(UserWarning, match=r"(?s)Skipped 1 file.*broken\.jpg"):
        features = extract_features(model, data, layer="pool5", scales=(64,), progress=False)
    assert features.class_names == ["chelsea", "coffee"] and features.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert [Path(p).parent.name for p in features.paths] == ["chelsea"] * 3 + ["coffee"] * 3
    loaded = Features.load(features.save(tmp_path / "out" / "f.npz"))
    assert np.array_equal(loaded.features, features.features) and loaded.paths == features.paths
    assert (loaded.class_names, loaded.layer, loaded.scales) == (["chelsea", "coffee"], "pool5", (64,))


def test_cli_extract_writes_npz(photos, tmp_path, capsys):
    out = tmp_path / "features.npz"
    code = main(["extract", str(photos), "--model", "vgg11", "--weights", "none", "--width", "0.0625",
                 "--layer", "pool5", "--scales", "64", "96", "--reduce", "stack", "--flip", "-o", str(out),
                 "--no-progress"])
    assert code == 0 and f"{out}: features (60, 64) from 60 image(s), classes: chelsea, coffee" in capsys.readouterr().out
    with np.load(out) as saved:
        assert sorted(saved.files) == ["class_names", "features", "labels", "layer", "paths", "scales"]
        assert saved["labels"].tolist() == [0] * 30 + [1] * 30


def test_linear_probes_on_extracted_features(model, photos):
    features = extract_features(model, photos, layer="conv4_3", scales=(96,), progress=False)
    train = np.arange(len(features.labels)) % 3 != 0
    for method in ("svm", "logreg"):
        estimator, report = probe(features.features[train], features.labels[train], method=method,
                                  test_features=features.features[~train], test_labels=features.labels[~train])
        assert report["cv_accuracy"] >= 0.85 and report["test_accuracy"] >= 0.85, report
        assert report["n_features"] == 32 and report["C"] in 10.0 ** np.arange(-3, 4)
        predicted = estimator.predict(features.features[~train])
        assert report["test_accuracy"] == pytest.approx(np.mean(predicted == features.labels[~train]))
        assert np.sum(report["confusion_matrix"]) == int((~train).sum())


def test_probe_on_separable_blobs_and_its_errors():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(-2, 1, (30, 5)), rng.normal(2, 1, (30, 5)), rng.normal((6, 0, 0, 0, 0), 1, (30, 5))])
    y = np.repeat([0, 1, 2], 30)
    _, report = probe(X, y, method="logreg", test_features=X, test_labels=y)
    assert report["train_accuracy"] == report["test_accuracy"] == report["mean_class_recall"] == 1.0
    assert report["cv_folds"] == 5 and report["n_samples"] == 90
    with pytest.raises(ValueError, match="smallest class has 1"):
        probe(X[:31], y[:31])
    with pytest.raises(ValueError, match="unknown"):
        probe(X, np.full(90, -1))
    with pytest.raises(ValueError, match="Unknown probe method 'knn'"):
        probe(X, y, method="knn")


def test_missing_input_small_fc_scales_and_unwritable_output_fail_before_any_work(photos, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="Image folder or file not found: .*nope"):
        extract_features("vgg11", tmp_path / "nope", weights=None, width=1 / 16, layer="pool5", progress=False)
    with pytest.raises(ValueError, match=r"Layer fc7: .* at least 224x224 px; got scale 64\. .*pool5"):
        extract_features("vgg11", photos, weights=None, width=1 / 16, scales=(64,), progress=False)
    small = ["--weights", "none", "--width", "0.0625", "--layer", "pool5", "--scales", "64", "--no-progress"]
    assert main(["extract", str(photos), *small, "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is a folder; give a file name in it, e.g. {tmp_path / 'features.npz'}" in err
    blocked = tmp_path / "file.txt"
    blocked.write_text("x")
    assert main(["extract", str(photos), *small, "-o", str(blocked / "features.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vggkit extract: error: Cannot write ") and "extract pool5" not in err
    assert main(["extract", str(photos), "--model", str(tmp_path / "missing.pth"), *small[4:]]) == 2
    assert f"Checkpoint not found: {tmp_path / 'missing.pth'}" in capsys.readouterr().err


def test_device_decode_gives_the_pil_features_and_skips_the_same_files(model, photos, tmp_path):
    """The GPU path (decode_jpeg + tensor rescale), on CPU tensors: the paper's descriptor as with PIL."""
    data = linked_subset(photos, tmp_path / "data")
    photo((230, 300), seed=3).save(data / "coffee" / "portrait.png")
    (data / "chelsea" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    runs = {}
    for decode in ("pil", "device"):
        with pytest.warns(UserWarning, match=r"(?s)Skipped 1 file.*broken\.jpg"):
            runs[decode] = extract_features(model, data, layer="fc7", scales=(224, 256), flip=True, crop=None,
                                            decode=decode, progress=False, batch_size=4, **FP32_CPU)
    pil, device = runs["pil"], runs["device"]
    assert device.paths == pil.paths and device.labels.tolist() == pil.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert device.features.shape == pil.features.shape == (7, 256)
    np.testing.assert_allclose(device.features, pil.features, atol=2e-3)  # unit vectors; pixels within 1 level
    with pytest.raises(ValueError, match="Unknown decode 'gpu'"):
        extract_features(model, data, decode="gpu", progress=False)


def test_cli_extract_summarises_a_long_list_of_classes(tmp_path, capsys):
    from vggkit.features.extract import summarise_names

    for index in range(12):
        (tmp_path / "data" / f"class{index:02d}").mkdir(parents=True)
        photo((64, 64), seed=index).save(tmp_path / "data" / f"class{index:02d}" / "image.png")
    code = main(["extract", str(tmp_path / "data"), "--model", "vgg11", "--weights", "none", "--width", "0.0625",
                 "--layer", "pool5", "--scales", "64", "-o", str(tmp_path / "f.npz"), "--no-progress"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and line.endswith("classes: class00, class01, class02, class03, class04, ... (12 in all)")
    assert summarise_names(["a", "b"]) == "a, b"
