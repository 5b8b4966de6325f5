"""Keras's keras.applications VGG16/VGG19 files load by create_model(weights=path) and give Keras's outputs.

Nothing is downloaded: Keras models with random weights (rescaled so that the predictions are far
from uniform and a mis-ordered fc1 shows) are saved in each file Keras writes and loaded through
vggkit's public path, without Keras. Both sides see the same 224x224 photographs, each through its
own preprocessing (``keras.applications.vgg16.preprocess_input`` vs ``model.preprocess``).
"""

import os
import shutil
import sys
import warnings
import zipfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported; vggkit itself never imports it

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

keras = pytest.importorskip("keras")
h5py = pytest.importorskip("h5py")

import vggkit  # noqa: E402
from vggkit.data.preprocess import CAFFE  # noqa: E402
from vggkit.weights.checkpoint import WeightsError, read_checkpoint  # noqa: E402
from vggkit.weights.keras import NoClassifierWarning  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
PHOTOS = ["chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg"]
TOP_FILES = ["vgg16.weights.h5", "vgg16.keras", "vgg16.h5"]
NOTOP_FILES = TOP_FILES + ["vgg16_keras2.h5"]  # the last: Keras 2's save_weights layout, layers at the root


def _rescale(model, seed: int):
    """He-scaled kernels (from Keras's Glorot init, in place: no 138M fresh random numbers) and random biases,
    the first conv scaled down to the 0-255 input, so that the softmax is peaked and features are O(1)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if not layer.weights:
            continue
        kernel, bias = layer.weights
        receptive = int(np.prod(kernel.shape[:-2]))  # 3x3 for a conv, 1 for a Dense layer
        fan_in, fan_out = receptive * kernel.shape[-2], receptive * kernel.shape[-1]
        # Glorot's variance is 2 / (fan_in + fan_out), He's 2 / fan_in.
        factor = np.sqrt((fan_in + fan_out) / fan_in) / (60.0 if layer.name == "block1_conv1" else 1.0)
        kernel.assign(keras.ops.multiply(kernel, float(factor)))
        bias.assign(rng.uniform(-0.1, 0.1, bias.shape).astype("float32"))
    return model


def _save_keras2_weights(model, path: Path) -> None:
    """What Keras 2's model.save_weights("x.h5") wrote (Keras 3 keeps the writer for model.save("x.h5"))."""
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """The four photographs resized to 224x224: (4, 224, 224, 3) uint8 RGB."""
    return np.stack([np.asarray(Image.open(EXAMPLES / name).convert("RGB").resize((224, 224), Image.BILINEAR))
                     for name in PHOTOS])


def _vggkit_input(model, photos: np.ndarray) -> torch.Tensor:
    """The same pixels through the model's own preprocessing: (4, 3, 224, 224) float32."""
    return model.preprocess.normalize(torch.from_numpy(photos).permute(0, 3, 1, 2).float() / 255)


@pytest.fixture(scope="module")
def vgg16_files(tmp_path_factory, photos):
    """VGG16 with and without its top, saved once per format; Keras's softmax (4, 1000) and pool5 (4, 512, 7, 7)."""
    keras.utils.set_random_seed(0)
    folder = tmp_path_factory.mktemp("keras")
    top = _rescale(keras.applications.VGG16(weights=None), seed=1)
    notop = keras.applications.VGG16(weights=None, include_top=False)
    for layer in notop.layers:
        if layer.weights:
            layer.set_weights(top.get_layer(layer.name).get_weights())
    both = keras.Model(top.input, [top.get_layer("block5_pool").output, top.output])
    x = keras.applications.vgg16.preprocess_input(photos.astype("float32"))
    pool5, softmax = (keras.ops.convert_to_numpy(y) for y in both(x))
    top.save_weights(folder / "vgg16.weights.h5")
    top.save(folder / "vgg16.keras")
    top.save(folder / "vgg16.h5")
    (folder / "notop").mkdir()
    notop.save_weights(folder / "notop" / "vgg16.weights.h5")
    notop.save(folder / "notop" / "vgg16.keras")
    notop.save(folder / "notop" / "vgg16.h5")
    _save_keras2_weights(notop, folder / "notop" / "vgg16_keras2.h5")
    return {"folder": folder, "softmax": softmax, "pool5": pool5.transpose(0, 3, 1, 2)}


def _no_keras(monkeypatch):
    """Loading must not need Keras: any import of it fails from here on."""
    for name in [n for n in sys.modules if n == "keras" or n.startswith("keras.")]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("name", TOP_FILES)
def test_vgg16_with_top_gives_keras_softmax(name, vgg16_files, photos, monkeypatch):
    _no_keras(monkeypatch)
    model = vggkit.create_model(weights=vgg16_files["folder"] / name).eval()
    assert model.name == "vgg16" and model.num_classes == 1000 and model.preprocess == CAFFE
    reference = torch.from_numpy(vgg16_files["softmax"])
    assert reference.max() > 20 / 1000  # peaked predictions (uniform: 1e-3), so a wrong mapping cannot pass
    with torch.no_grad():
        pool5 = model.forward_features(_vggkit_input(model, photos))
        probs = torch.softmax(model.forward_head(pool5), dim=1)
        # fc1's rows left in Keras's NHWC flatten order must fail by far: the comparison can see it.
        weight = model.classifier.fc6.weight
        weight.copy_(weight.reshape(-1, 512, 7, 7).permute(0, 2, 3, 1).reshape(weight.shape))
        unordered = torch.softmax(model.forward_head(pool5), dim=1)
    difference = float((probs - reference).abs().max())
    print(f"{name}: softmax max |vggkit - keras| = {difference:.2e}")
    assert difference <= 1e-4 and float((unordered - reference).abs().max()) > 1e-2
    assert torch.equal(probs.argmax(1), reference.argmax(1))


@pytest.mark.parametrize("name", NOTOP_FILES)
def test_vgg16_without_top_gives_keras_features_and_a_random_classifier(name, vgg16_files, photos, monkeypatch):
    _no_keras(monkeypatch)
    path = vgg16_files["folder"] / "notop" / name
    with pytest.warns(NoClassifierWarning, match=r"no classifier .*include_top=False.*fc6-fc8 are random"):
        model = vggkit.create_model(weights=path).eval()
    assert model.name == "vgg16" and model.num_classes == 1000 and model.preprocess == CAFFE
    assert "random" in model.weights_info["classifier"]
    with torch.no_grad():
        features = model.forward_features(_vggkit_input(model, photos[:2])).numpy()
    reference = vgg16_files["pool5"][:2]
    relative = np.abs(features - reference).max() / np.abs(reference).max()
    print(f"{name} (no top): pool5 max |vggkit - keras| / max |keras| = {relative:.2e}")
    assert relative <= 1e-4


def test_backbone_from_a_file_without_top_needs_no_classifier(vgg16_files, photos):
    path = vgg16_files["folder"] / "notop" / "vgg16.weights.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoClassifierWarning)  # conv taps: nothing random is used, so no warning
        fe = vggkit.backbone("vgg16", layers=["pool5"], weights=path).eval()
    with torch.no_grad():
        pool5 = fe(_vggkit_input(fe, photos[:1]))["pool5"].numpy()
    assert np.abs(pool5 - vgg16_files["pool5"][:1]).max() <= 1e-4 * np.abs(pool5).max()
    with pytest.raises(WeightsError, match=r"has no fc6/fc7 weights .* cannot give fc7"):
        vggkit.backbone("vgg16", layers=["fc7"], weights=path)


def test_file_without_top_with_num_classes_and_seed_is_ready_to_fine_tune(vgg16_files):
    path = vgg16_files["folder"] / "notop" / "vgg16.h5"
    with pytest.warns(NoClassifierWarning):
        first = vggkit.create_model(weights=path, num_classes=5, seed=3)
        again = vggkit.create_model(weights=path, num_classes=5, seed=3)
    assert first.classifier.fc8.out_features == 5
    assert torch.equal(first.classifier.fc8.weight, again.classifier.fc8.weight)
    assert float(first.classifier.fc6.weight.detach().std()) > 0  # initialised, not the meta device's empty memory


def test_vgg19_without_top_gives_keras_features(tmp_path, photos, monkeypatch):
    keras.utils.set_random_seed(0)
    reference_model = _rescale(keras.applications.VGG19(weights=None, include_top=False), seed=2)
    reference = keras.ops.convert_to_numpy(
        reference_model(keras.applications.vgg19.preprocess_input(photos[:1].astype("float32"))))
    reference_model.save(tmp_path / "vgg19.keras")
    _no_keras(monkeypatch)
    with pytest.warns(NoClassifierWarning):
        model = vggkit.create_model(weights=tmp_path / "vgg19.keras").eval()
    assert model.name == "vgg19" and model.spec.config == "E" and model.preprocess == CAFFE
    with torch.no_grad():
        features = model.forward_features(_vggkit_input(model, photos[:1])).numpy()
    relative = np.abs(features - reference.transpose(0, 3, 1, 2)).max() / np.abs(reference).max()
    print(f"vgg19.keras (no top): pool5 relative difference = {relative:.2e}")
    assert relative <= 1e-4
    with pytest.raises(WeightsError, match="look.* like 'vgg19'"):
        vggkit.create_model("vgg16", weights=tmp_path / "vgg19.keras")


def test_keras_files_are_not_vggkit_checkpoints_nor_torch_files(vgg16_files):
    path = vgg16_files["folder"] / "notop" / "vgg16.keras"
    with pytest.raises(ValueError, match=r"vgg16.keras is a Keras file, not a vggkit checkpoint.*create_model"):
        vggkit.load(path)
    with pytest.raises(WeightsError, match=r"vgg16.keras is a Keras weight file, not a PyTorch checkpoint"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match=r"layout='torchvision' names a PyTorch key layout; .*vgg16.keras is a Keras"):
        vggkit.create_model(weights=path, layout="torchvision")


def test_reading_needs_h5py_and_says_how_to_install_it(vgg16_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(WeightsError, match=r"vgg16.h5 is a Keras weight file; reading it needs h5py .*vggkit\[keras\]"):
        vggkit.create_model(weights=vgg16_files["folder"] / "notop" / "vgg16.h5")


def test_damaged_and_foreign_keras_files_are_one_line_each(vgg16_files, tmp_path):
    notop = vgg16_files["folder"] / "notop"
    data = (notop / "vgg16.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"cut.h5 is a truncated or corrupt Keras file"):
        vggkit.create_model(weights=tmp_path / "cut.h5")
    with zipfile.ZipFile(tmp_path / "empty.keras", "w") as archive:
        archive.writestr("config.json", "{}")
    with pytest.raises(WeightsError, match=r"empty.keras is a truncated or corrupt Keras file .*model.weights.h5"):
        vggkit.create_model(weights=tmp_path / "empty.keras")
    with h5py.File(tmp_path / "resnet.weights.h5", "w") as f:
        f["layers/conv2d/vars/0"] = np.zeros((7, 7, 3, 64), "float32")
        f["layers/conv2d/vars/1"] = np.zeros(64, "float32")
        f["layers/batch_normalization/vars/0"] = np.zeros(64, "float32")
    with pytest.raises(WeightsError, match=r"not a keras.applications VGG16 or VGG19 \(it has 1 conv2d, "
                                           r"1 batch_normalization"):
        vggkit.create_model(weights=tmp_path / "resnet.weights.h5")
    # A fine-tuned base with its own small head: refused, naming the Dense shapes.
    shutil.copy(notop / "vgg16.weights.h5", tmp_path / "custom.weights.h5")
    with h5py.File(tmp_path / "custom.weights.h5", "a") as f:
        f["layers/dense/vars/0"] = np.zeros((512, 10), "float32")
        f["layers/dense/vars/1"] = np.zeros(10, "float32")
    with pytest.raises(WeightsError, match=r"Dense layers \[\(512, 10\)\] are not VGG's fc1, fc2, predictions"):
        vggkit.create_model(weights=tmp_path / "custom.weights.h5")
