"""The paper's test protocols (section 3.2): dense, multi-crop, centre, class score maps, and ``evaluate``."""

import importlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

import vggkit
from vggkit.data.images import load_image
from vggkit.data.preprocess import CAFFE, IMAGENET
from vggkit.evaluation.evaluate import PROTOCOLS
from vggkit.evaluation.protocols import (
    class_heatmap,
    class_score_maps,
    dense_predict,
    dense_probabilities_from_maps,
    dense_score_maps,
    grid_crops,
    inference_networks,
    multicrop_predict,
    protocol_flops,
    rescaled_shape,
    rescaled_view,
)

WIDTH = 1 / 32  # 16 channels in block 5, 128-unit fc6/fc7: a 224 crop runs in a few milliseconds


def tiny_model(num_classes: int = 10, name: str = "vgg11") -> vggkit.VGG:
    return vggkit.create_model(name, width=WIDTH, num_classes=num_classes)


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def network_input(model, image: Image.Image) -> torch.Tensor:
    """The plain way: the weights' normalisation of the whole image, (1, 3, H, W)."""
    return model.preprocess.normalize(TF.to_tensor(image))[None]


# --------------------------------------------------------------------------- one image


@pytest.mark.parametrize("preprocess", [IMAGENET, CAFFE], ids=["imagenet", "caffe"])
def test_dense_at_224_equals_the_centre_logits(preprocess):
    model = tiny_model()
    model.preprocess = preprocess
    image = noise_image(224, 224)
    with torch.no_grad():
        logits = model.eval()(network_input(model, image))[0]
    model.train()

    maps = class_score_maps(model, image, scale=224)
    assert maps.shape == (10, 1, 1)
    torch.testing.assert_close(maps[:, 0, 0], logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(dense_predict(model, image, scales=224, flip=False), logits.softmax(-1),
                               atol=1e-5, rtol=0)
    assert model.training and model.features.training, "the model's train/eval flags are restored"


def test_score_maps_have_the_papers_size_and_flip_is_averaged_back():
    model = tiny_model()
    image = noise_image(300, 400)  # shortest side to 384 -> 384x512 -> floor(/32) - 6 = 6 x 10
    plain = class_score_maps(model, image, scale=384)
    assert plain.shape == (10, 6, 10) and plain.dtype == torch.float32
    mirrored = class_score_maps(model, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), scale=384)
    torch.testing.assert_close(class_score_maps(model, image, scale=384, flip=True),
                               (plain + mirrored.flip(-1)) / 2, atol=1e-5, rtol=0)


def test_class_heatmaps_are_probabilities_at_the_image_size():
    model = tiny_model(num_classes=4)
    image = noise_image(250, 330)
    maps = [class_heatmap(model, image, c, scales=(256, 288)) for c in range(4)]
    # A tensor, like dense_predict's and class_score_maps' results.
    assert all(isinstance(m, torch.Tensor) and m.shape == (250, 330) and m.dtype == torch.float32 for m in maps)
    # Softmax maps sum to one at every position; bilinear upsampling and averaging keep that.
    np.testing.assert_allclose(torch.stack(maps).sum(0).numpy(), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="class_index 4 is out of range for a 4-class model"):
        class_heatmap(model, image, 4)


def test_one_dense_pass_gives_the_prediction_and_every_heatmap():
    model = tiny_model(num_classes=3)
    image = noise_image(240, 300)
    maps = dense_score_maps(model, image, scales=(256, 320))
    assert [m.shape for m in maps] == [(2, 3, 2, 4), (2, 3, 4, 6)]  # (flips, classes, h, w) per Q
    torch.testing.assert_close(dense_probabilities_from_maps(maps), dense_predict(model, image, scales=(256, 320)),
                               atol=1e-6, rtol=0)
    # Per Q: the class's softmax map averaged over the flips, upsampled, averaged over Q.
    reference = np.mean([torch.nn.functional.interpolate(
        m.softmax(1)[:, 2].mean(0)[None, None], size=(240, 300), mode="bilinear", align_corners=False)[0, 0].numpy()
        for m in maps], axis=0)
    np.testing.assert_allclose(class_heatmap(model, image, 2, scales=(256, 320)).numpy(), reference, atol=1e-6)


def test_grid_crops_on_an_image_exactly_224_wide():
    image = torch.arange(3 * 300 * 224, dtype=torch.float32).view(3, 300, 224)
    crops = grid_crops(image)
    assert crops.shape == (50, 3, 224, 224)  # 5x5 grid x 2 flips
    for row in range(5):
        for column in range(5):
            assert torch.equal(crops[row * 5 + column], crops[row * 5]), "no room to move along the width"
    assert not torch.equal(crops[0], crops[5])  # but 76 px to move along the height
    assert torch.equal(crops[0], image[:, :224, :224]) and torch.equal(crops[24], image[:, -224:, :])
    assert torch.equal(crops[25:], crops[:25].flip(-1))
    assert grid_crops(image, flip=False).shape == (25, 3, 224, 224)
    with pytest.raises(ValueError, match="smaller than the 224 px crop"):
        grid_crops(image[:, :200])


def count_forward_passes(model):
    """Images (batch entries) and calls through the convolutional layers, counted by a forward hook."""
    counts = {"images": 0, "calls": 0}

    def hook(module, inputs, output):
        counts["images"] += inputs[0].shape[0]
        counts["calls"] += 1

    return counts, model.features.register_forward_hook(hook)


def test_dense_runs_once_per_flip_and_multicrop_fifty_times():
    model = tiny_model()
    image = noise_image(384, 420)
    counts, handle = count_forward_passes(model)
    dense_predict(model, image, scales=384)
    assert counts == {"images": 2, "calls": 1}  # the image and its mirror image, as one batch
    counts.update(images=0, calls=0)
    multicrop_predict(model, image, scales=384)
    assert counts == {"images": 50, "calls": 1}
    counts.update(images=0, calls=0)
    multicrop_predict(model, image, scales=(256, 384), batch_size=64)
    assert counts == {"images": 100, "calls": 2}  # 100 crops in batches of 64
    handle.remove()


def test_protocol_flops_count_crops_and_whole_images():
    model = vggkit.create_model("vgg16", width=WIDTH)
    crop = protocol_flops(model, 224, 224, scales=224, flip=False)
    assert crop["dense"] == [crop["multicrop"][0] // 25]  # at 224 the dense net is one crop
    cost = protocol_flops(model, 375, 500, scales=(256, 384, 512))
    assert cost["multicrop"] == [50 * crop["dense"][0]] * 3
    assert cost["dense"][0] < cost["dense"][1] < cost["dense"][2] < cost["multicrop"][0]
    for height, width in ((375, 500), (500, 375), (60, 80), (224, 224)):
        assert rescaled_view(noise_image(height, width), 384).shape[1:] == rescaled_shape(width, height, 384)


def test_bad_scales_and_models_are_clear_errors():
    with pytest.raises(ValueError, match=r"Q=200 must be an integer >= 224"):
        dense_predict(tiny_model(), noise_image(64, 64), scales=(256, 200))
    with pytest.raises(TypeError, match="Expected a vggkit VGG"):
        dense_predict(torch.nn.Linear(2, 2), noise_image(64, 64))


def test_small_images_are_upscaled_and_optimized_models_accepted():
    model = tiny_model()
    probabilities = dense_predict(vggkit.optimize(model, precision="fp32"), noise_image(40, 90), scales=(256, 384))
    assert probabilities.shape == (10,) and abs(float(probabilities.sum()) - 1) < 1e-5
    torch.testing.assert_close(probabilities, dense_predict(model, noise_image(40, 90), scales=(256, 384)),
                               atol=1e-5, rtol=0)


def test_inference_networks_leave_a_copy_untouched():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with inference_networks(model, precision="fp32") as nets:
        assert nets.classifier is not model and not nets.classifier.training
        next(nets.classifier.parameters()).data.zero_()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_fine_tuning_head_runs_centre_and_multicrop_but_not_dense(labelled_folder):
    model = tiny_model(num_classes=3)
    model.avgpool = torch.nn.AdaptiveAvgPool2d(1)  # a "linear" fine-tuning head on pooled pool5
    model.classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(model.feature_channels, 3))
    image = noise_image(230, 240)
    assert multicrop_predict(model, image, scales=224).shape == (3,)
    with pytest.raises(ValueError, match="no fully-convolutional form: use the centre or multi-crop protocol"):
        dense_predict(model, image, scales=224)
    with pytest.raises(ValueError, match="no fully-convolutional form"):
        vggkit.evaluate(model, labelled_folder, protocol=["center", "dense+multicrop"], workers=0)
    assert vggkit.evaluate(model, labelled_folder, protocol="center", workers=0, progress=False).n_images == 4


def test_bf16_runtime_returns_float32_close_to_fp32():
    model = tiny_model()
    view = rescaled_view(noise_image(230, 260), 256)
    with inference_networks(model, precision="fp32") as fp32, inference_networks(model, precision="bf16") as bf16:
        assert next(bf16.classifier.parameters()).dtype == torch.bfloat16
        exact, fast = fp32.score_maps(fp32.normalize(view[None])), bf16.score_maps(bf16.normalize(view[None]))
    assert fast.dtype == torch.float32 and fast.shape == exact.shape == (1, 10, 2, 3)
    torch.testing.assert_close(fast, exact, atol=0.05 * exact.abs().max().item(), rtol=0)


# --------------------------------------------------------------------------- a dataset


CLASSES = ("cat", "dog", "fox")
# (height, width): square, portrait, exactly 224 wide, and a small landscape one that is upscaled
SIZES = ((240, 240), (300, 230), (260, 224), (60, 80))


def write_noise_images(root, sizes, suffix: str, first_seed: int = 0, **save_options):
    """One noise image per (height, width) in ``sizes``, dealt round the CLASSES folders under ``root``."""
    for index, (height, width) in enumerate(sizes):
        folder = root / CLASSES[index % len(CLASSES)]
        folder.mkdir(exist_ok=True)
        noise_image(height, width, seed=first_seed + index).save(folder / f"image{index}{suffix}", **save_options)
    return root


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    return write_noise_images(tmp_path_factory.mktemp("val"), SIZES, ".png")


def reference_probabilities(model, path, scales: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Section 3.2 written as plain loops over scales, flips and crop positions, one forward pass each."""
    model.eval()
    image = Image.open(path).convert("RGB")
    dense_net = model.to_fully_conv()

    def softmax(net, view: Image.Image) -> torch.Tensor:
        with torch.no_grad():
            scores = net(network_input(model, view))
        return (scores.mean(dim=(2, 3)) if scores.dim() == 4 else scores)[0].softmax(-1)

    with torch.no_grad():
        center = model(model.preprocess(image)[None])[0].softmax(-1)
    dense, multicrop = [], []
    for q in scales:
        scaled = TF.resize(image, q, antialias=True)
        dense.append((softmax(dense_net, scaled) + softmax(dense_net, TF.hflip(scaled))) / 2)
        for row in range(5):
            for column in range(5):
                top = int(np.floor(row * (scaled.height - 224) / 4 + 0.5))
                left = int(np.floor(column * (scaled.width - 224) / 4 + 0.5))
                crop = scaled.crop((left, top, left + 224, top + 224))
                multicrop += [softmax(model, crop), softmax(model, TF.hflip(crop))]
    dense, multicrop = torch.stack(dense).mean(0), torch.stack(multicrop).mean(0)
    return {"center": center, "dense": dense, "multicrop": multicrop, "dense+multicrop": (dense + multicrop) / 2}


def test_protocols_equal_a_plain_reference_loop(labelled_folder, tmp_path):
    import csv

    model = tiny_model(num_classes=3)
    model.class_names = ["fox", "cat", "dog"]  # output order differs from the sorted folders
    model.preprocess = CAFFE  # BGR, 0-255, Caffe mean: the weights' own preprocessing must be used
    broken = labelled_folder / "dog" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    scales = (224, 256)
    try:
        with pytest.warns(UserWarning, match="broken.jpg"):
            result = vggkit.evaluate(model, labelled_folder, protocol=list(PROTOCOLS), scales=scales,
                                     workers=0, progress=False, predictions_csv=tmp_path / "predictions.csv",
                                     precision="fp32", device="cpu")  # float32 numbers compared below
    finally:
        broken.unlink()

    samples = sorted(labelled_folder.glob("*/*.png"))
    labels = torch.tensor([model.class_names.index(path.parent.name) for path in samples])
    per_image = [reference_probabilities(model, path, scales) for path in samples]
    reference = {p: torch.stack([probabilities[p] for probabilities in per_image]) for p in PROTOCOLS}
    rows = list(csv.DictReader(open(result.predictions_csv)))
    for protocol in PROTOCOLS:
        top = reference[protocol].topk(3).indices
        outcome = result[protocol]
        assert outcome.n_images == len(samples) == 4
        assert outcome.top_k == 3  # "top-5" of a 3-class model
        assert outcome.top1_error == 100 * int((top[:, 0] != labels).sum()) / len(labels)
        assert outcome.top5_error == 0.0
        for c, name in enumerate(model.class_names):
            assert outcome.per_class_accuracy[name] == 100 * int((top[labels == c, 0] == c).sum()) / int(
                (labels == c).sum())
        written = [row for row in rows if row["protocol"] == protocol]
        assert [row["path"] for row in written] == [str(path) for path in samples]
        assert [row["class1"] for row in written] == [model.class_names[i] for i in top[:, 0]]
        np.testing.assert_allclose([float(row["probability1"]) for row in written],
                                   reference[protocol].max(-1).values, atol=1e-5)
    assert [path for path, _ in result.skipped] == [str(broken)]
    assert result["multicrop"].scales == scales and result["center"].scales == (256,)
    with pytest.raises(AttributeError, match="ran 4 protocols"):
        result.top1_error
    table = result.table()
    assert "| dense + multi-crop | Q = 224,256 |" in table and "top-3 error (%)" in table


def test_every_image_is_decoded_once_for_all_protocols(labelled_folder, monkeypatch):

    module = importlib.import_module("vggkit.evaluation.evaluate")
    decoded = []
    monkeypatch.setattr(module, "load_image", lambda path: decoded.append(path) or load_image(path))
    vggkit.evaluate(tiny_model(num_classes=3), labelled_folder, protocol=["center", "dense", "dense+multicrop"],
                    scales=224, flip=False, workers=0, progress=False)
    assert sorted(decoded) == sorted(str(path) for path in labelled_folder.glob("*/*.png"))


def test_one_protocol_reads_as_attributes(labelled_folder):
    result = vggkit.evaluate(tiny_model(num_classes=3), labelled_folder, protocol="center", workers=1,
                             progress=False)
    assert result.n_images == 4 and result.images_per_second > 0 and result.seconds > 0
    assert 0 <= result.top1_error <= 100 and set(result.per_class_accuracy) <= set(CLASSES)


def test_class_mismatch_and_empty_folders_are_clear_errors(labelled_folder, tmp_path):
    with pytest.raises(ValueError, match=r"The model has 5 outputs but .* has 3 class folders \(cat, dog, fox\)"):
        vggkit.evaluate(tiny_model(num_classes=5), labelled_folder, workers=0)
    named = tiny_model(num_classes=3)
    named.class_names = ["cat", "dog", "wolf"]
    with pytest.raises(ValueError, match=r"(?s)model \(3\): cat, dog, wolf.*folders \(3\): cat, dog, fox.*"
                                         r"only in the model: wolf; only in the folders: fox"):
        vggkit.evaluate(named, labelled_folder, workers=0)
    for name in CLASSES:
        (tmp_path / name).mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"No images in .*: its 3 class folders hold no image files"):
        vggkit.evaluate(tiny_model(num_classes=3), tmp_path, workers=0)
    with pytest.raises(ValueError, match="Unknown protocol"):
        vggkit.evaluate(tiny_model(num_classes=3), labelled_folder, protocol="ten-crop")


def test_cli_evaluates_a_fine_tuned_checkpoint(tmp_path, capsys):
    from vggkit.cli import main

    data = tmp_path / "val"
    for index, name in enumerate(("ants", "bees")):
        (data / name).mkdir(parents=True)
        noise_image(230, 250, seed=index).save(data / name / "a.png")
    model = tiny_model(num_classes=2)
    model.class_names = ["ants", "bees"]
    checkpoint = vggkit.save_checkpoint(model, tmp_path / "finetuned.pth", head={"type": "vgg"})

    argv = ["evaluate", "--model", str(checkpoint), "--data", str(data), "--protocol", "center", "dense",
            "--scales", "224", "256", "--workers", "1", "--no-progress", "--csv", str(tmp_path / "pred.csv")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    expected = vggkit.evaluate(model, data, protocol=["center", "dense"], scales=(224, 256), workers=0,
                               progress=False)
    assert printed.startswith(f"vgg11 on {data}: 2 images, 2 classes, with flips;")
    assert "| protocol | scales | top-1 error (%) | top-2 error (%) | images | images/s |" in printed
    assert f"| dense | Q = 224,256 | {expected['dense'].top1_error:.2f} | 0.00 | 2 |" in printed
    assert f"| centre crop | shortest side 256 | {expected['center'].top1_error:.2f} | 0.00 | 2 |" in printed
    assert (tmp_path / "pred.csv").read_text().count("\n") == 1 + 2 * 2

    model.class_names = ["ants", "wasps"]
    vggkit.save_checkpoint(model, checkpoint)
    assert main(argv) == 2
    assert "only in the model: wasps; only in the folders: bees" in capsys.readouterr().err


def test_cli_errors_for_missing_or_wrong_checkpoints_typos_and_unwritable_csv(labelled_folder, tmp_path, capsys,
                                                                                 recwarn):
    from vggkit.cli import main

    base = ["--data", str(labelled_folder), "--scales", "224", "--workers", "0", "--no-progress"]
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    for model, message in [(str(tmp_path / "missing.pth"), f"Checkpoint not found: {tmp_path / 'missing.pth'}"),
                           (str(tmp_path / "notes.pth"),
                            "notes.pth is not a PyTorch weight file (unrecognised contents)"),
                           ("vgg61", "Unknown VGG model 'vgg61'. Did you mean")]:
        assert main(["evaluate", "--model", model, *base]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vggkit evaluate: error: ") and message in err
        assert "Traceback" not in err
    assert not [w for w in recwarn if "No weights given" in str(w.message)]  # no "random weights" for a typo
    image = next((labelled_folder / "cat").iterdir())
    for weights, message in [("imagnet", "Unknown weights 'imagnet'. Did you mean 'imagenet'?"),
                             (str(image), "is not a PyTorch weight file (a PNG image)")]:
        assert main(["evaluate", "--model", "vgg11", "--weights", weights, *base]) == 2
        assert message in capsys.readouterr().err
    assert main(["evaluate", "--model", "vgg11", "--weights", "none", *base]) == 2  # random init, 1000 outputs
    assert "The model has 1000 outputs but" in capsys.readouterr().err
    model = tiny_model(num_classes=3)
    model.class_names = list(CLASSES)
    checkpoint = vggkit.save_checkpoint(model, tmp_path / "model.pth", head={"type": "vgg"})
    blocked = tmp_path / "file.txt"
    blocked.write_text("x")
    csv_path = blocked / "predictions.csv"
    assert main(["evaluate", "--model", str(checkpoint), *base, "--csv", str(csv_path)]) == 2
    assert capsys.readouterr().err.startswith(f"vggkit evaluate: error: Cannot write {csv_path}")
    with pytest.raises(ValueError, match="is a folder; give a file name in it"):
        vggkit.evaluate(model, labelled_folder, scales=224, workers=0, predictions_csv=tmp_path, progress=False)


# --------------------------------------------------------------------------- batched across images


def test_grid_crops_of_a_batch_are_the_crops_sliced_one_by_one():
    from vggkit.data.transforms import grid_offsets
    from vggkit.evaluation.protocols import grid_crops_batch

    images = torch.randint(0, 256, (3, 3, 241, 300), dtype=torch.uint8)
    crops = grid_crops_batch(images)
    assert crops.shape == (3, 50, 3, 224, 224)
    for image, image_crops in zip(images, crops):
        sliced = [image[:, top:top + 224, left:left + 224] for top in grid_offsets(241, 224, 5)
                  for left in grid_offsets(300, 224, 5)]
        assert torch.equal(image_crops, torch.stack(sliced + [c.flip(-1) for c in sliced]))


def test_batched_dense_and_multicrop_equal_image_by_image_passes():
    """Batched across images (same-size buckets with their mirrors, crops of many images per pass) gives
    the scores of one forward pass per image, mirror image and crop: identical for dense on CPU float32,
    within 1e-6 for multi-crop (the fc layers' GEMM blocking follows the batch size)."""
    from vggkit.evaluation.protocols import (
        dense_probabilities_batch,
        multicrop_probabilities_batch,
    )

    model = tiny_model()
    sizes = ((240, 320), (300, 230), (240, 320), (260, 224), (240, 320))
    scales = (224, 256)
    views = [[rescaled_view(noise_image(*size, seed=i), q) for q in scales] for i, size in enumerate(sizes)]
    with inference_networks(model, precision="fp32", device="cpu") as nets:
        dense = dense_probabilities_batch(nets, views, flip=True, batch_size=4)  # buckets split over passes
        multicrop = multicrop_probabilities_batch(nets, views, flip=True, batch_size=37)

        def one(view: torch.Tensor, network) -> torch.Tensor:
            return network(nets.normalize(view[None]))

        for i, image_views in enumerate(views):
            per_scale = []
            for view in image_views:
                maps = torch.stack([one(view, nets.score_maps)[0], one(view.flip(-1), nets.score_maps)[0].flip(-1)])
                per_scale.append(maps.mean(dim=(2, 3)).softmax(-1).mean(0))
            assert torch.equal(dense[i], torch.stack(per_scale).mean(0))
            crops = torch.cat([grid_crops(view) for view in image_views])
            alone = torch.cat([one(crop, nets.logits).softmax(-1) for crop in crops]).mean(0)
            torch.testing.assert_close(multicrop[i], alone, atol=1e-6, rtol=0)


JPEG_SIZES = ((375, 500), (375, 500), (500, 375), (240, 300), (375, 500), (375, 500))


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """ImageNet-shaped JPEGs (mostly 500x375, one portrait), a PNG, and a file that is not an image."""
    root = write_noise_images(tmp_path_factory.mktemp("val_jpeg"), JPEG_SIZES, ".jpg", first_seed=20, quality=90)
    noise_image(250, 260, seed=30).save(root / "cat" / "drawing.png")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_device_decode_and_windows_give_the_scores_of_pil_image_by_image(jpeg_folder, tmp_path):
    import csv

    model = vggkit.optimize(tiny_model(num_classes=3), precision="fp32", device="cpu")
    runs = {}
    for name, options in {"pil, one image per window": {"decode": "pil", "batch_size": 1},
                          "pil, batched": {"decode": "pil", "batch_size": 50},
                          "device, batched": {"decode": "device", "batch_size": 50}}.items():
        with pytest.warns(UserWarning, match="broken.jpg"):
            result = vggkit.evaluate(model, jpeg_folder, protocol=list(PROTOCOLS), scales=(224, 256), workers=0,
                                     progress=False, predictions_csv=tmp_path / f"{len(runs)}.csv", **options)
        assert [path for path, _ in result.skipped] == [str(jpeg_folder / "dog" / "broken.jpg")]
        assert result["dense"].n_images == len(JPEG_SIZES) + 1
        rows = list(csv.DictReader(open(result.predictions_csv)))
        runs[name] = {(row["path"], row["protocol"]): float(row["probability1"]) for row in rows}
    one, batched, device = runs.values()
    assert one.keys() == batched.keys() == device.keys()
    for key in one:
        assert abs(one[key] - batched[key]) <= 2e-6, key  # the CSV's 6 decimals
        assert abs(one[key] - device[key]) <= 2e-3, key  # rescaled pixels within 1 level of PIL's


def test_compile_auto_compiles_long_jobs_only():
    model = tiny_model()
    with inference_networks(model, precision="bf16", device="cpu", compile="auto", long_job=True) as nets:
        assert nets.runtime.compile and nets.run_classifier is not None and nets.run_dense is not None
    with inference_networks(model, precision="bf16", device="cpu", compile="auto", long_job=False) as nets:
        assert not nets.runtime.compile and nets.run_classifier is None
    with pytest.raises(ValueError, match="Unknown decode 'gpu'"):
        vggkit.evaluate(model, ".", protocol="center", decode="gpu")
