"""vggkit.deploy.export and ``vggkit export``: ONNX and .pt2 files checked against PyTorch, the one-line errors.

Tiny widths throughout; the photograph is assets/examples/chelsea.jpg through the model's own preprocessing.
Each file is read back here independently (a fresh onnxruntime session, ``torch.export.load``), not
only through the report ``export`` returns.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import functional as TF

import vggkit
from vggkit import cli
from vggkit.data.images import load_image, rescale_shortest
from vggkit.data.preprocess import CAFFE
from vggkit.deploy import export as deploy
from vggkit.runtime import onnx as ort_backend

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

PHOTO = Path(__file__).resolve().parent.parent / "assets" / "examples" / "chelsea.jpg"
WIDTH = 1 / 16


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vggkit.create_model("vgg11", width=WIDTH).eval()


@pytest.fixture(scope="module")
def photo():
    return load_image(PHOTO)


def assert_same(got, want, atol: float = 1e-4) -> float:
    """Max |got - want| under ``atol`` and under 1e-4 of the outputs' magnitude (tiny nets give small logits)."""
    got, want = torch.as_tensor(np.asarray(got)), want.detach()
    assert got.shape == want.shape and got.dtype == torch.float32
    diff = (got - want).abs().max().item()
    assert diff < atol and diff <= 1e-4 * want.abs().max().item(), (diff, want.abs().max().item())
    return diff


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_classifier_matches_pytorch_on_a_photograph(tiny, photo, tmp_path):
    report = deploy.export(tiny, tmp_path / "tiny.onnx")
    assert report.format == "onnx" and report.kind == "classifier" and report.opset == 18
    assert report.input_shape == ("batch", 3, 224, 224) and report.outputs == {"logits": ("batch", 1000)}
    assert len(report.checks) == 2 and 0 <= report.max_abs_diff < 1e-4 and report.files == [tmp_path / "tiny.onnx"]
    model = onnx.load(str(tmp_path / "tiny.onnx"))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    x = tiny.preprocess(photo)[None]
    batch = torch.cat([x, x.flip(-1), torch.randn_like(x)])  # any batch size: 3 was never exported
    got = session(tmp_path / "tiny.onnx").run(None, {"input": batch.numpy()})[0]
    pinned = vggkit.optimize(tiny, precision="fp32", device="cpu")  # float32 whatever VGGKIT_CPU_BF16 says
    with torch.no_grad():
        assert_same(got, tiny(batch))
    assert_same(got, pinned(batch))


def test_dense_form_takes_any_size_and_batch(tiny, tmp_path):
    report = deploy.export(tiny, tmp_path / "dense.onnx", dense=True, dynamic=True)
    assert report.kind == "dense" and report.input_shape == ("batch", 3, "height", "width")
    assert report.outputs == {"scores": ("batch", 1000, "scores_height", "scores_width")}
    run = session(tmp_path / "dense.onnx")
    dense = tiny.to_fully_conv().eval()
    for shape, maps in (((1, 3, 224, 224), (1, 1)), ((2, 3, 256, 352), (2, 5))):
        x = torch.randn(shape)
        got = run.run(None, {"input": x.numpy()})[0]
        assert got.shape == (shape[0], 1000, *maps)
        with torch.no_grad():
            assert_same(got, dense(x))


def test_backbone_outputs_are_named_by_layer(tmp_path):
    layers = ["conv3_1_pre", "conv4_2", "pool5"]
    backbone = vggkit.backbone("vgg11", layers=layers, width=WIDTH).eval()
    report = deploy.export(backbone, tmp_path / "features.onnx", dynamic=True)
    assert list(report.outputs) == layers and report.kind == "backbone"
    run = session(tmp_path / "features.onnx")
    assert [o.name for o in run.get_outputs()] == layers
    x = torch.randn(2, 3, 64, 96)  # smaller than anything the export saw
    got = dict(zip(layers, run.run(None, {"input": x.numpy()})))
    with torch.no_grad():
        want = backbone(x)
    for layer in layers:
        assert_same(got[layer], want[layer])


def test_optimized_model_exports_its_float32_source_as_a_pt2_program(tiny, tmp_path):
    tiny.train()  # the export runs in eval mode and gives the model back as it was
    fast = vggkit.optimize(tiny, precision="bf16", device="cpu")  # a bf16 copy would miss by ~1e-2
    report = deploy.export(fast, tmp_path / "tiny.pt2")
    assert tiny.training and all(m.training for m in tiny.modules())
    tiny.eval()
    assert report.format == "pt2" and report.exporter == "torch.export" and report.max_abs_diff < 1e-5
    program = torch.export.load(str(tmp_path / "tiny.pt2")).module()
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        assert_same(program(x), tiny(x), atol=1e-5)


def test_onnx_falls_back_to_the_torchscript_exporter_where_the_default_fails(tiny, tmp_path, monkeypatch):
    """torch 2.4's default (and today's fallback): the same dynamic axes through ``dynamo=False``."""
    import functools

    real = torch.onnx.export

    @functools.wraps(real)  # the signature, which export_onnx reads, stays torch's
    def default_fails(*args, **kwargs):
        if kwargs.get("dynamo", True) is not False:
            raise RuntimeError("simulated failure of the default exporter")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", default_fails)
    report = deploy.export(tiny, tmp_path / "dense.onnx", dense=True, dynamic=True)
    assert report.exporter == "torchscript" and report.max_abs_diff < 1e-4
    x = torch.randn(1, 3, 288, 224)
    got = session(tmp_path / "dense.onnx").run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert_same(got, tiny.to_fully_conv().eval()(x))


def test_a_failed_check_writes_nothing(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(deploy, "TOLERANCE", -1.0)  # every difference, even 0, is now too large
    with pytest.raises(RuntimeError, match="differs from PyTorch .* nothing was written"):
        deploy.export(tiny, tmp_path / "tiny.pt2")
    assert list(tmp_path.iterdir()) == []  # neither the file nor the staging folder is left


def test_cli_exports_a_caffe_checkpoint_with_its_preprocessing_in_the_graph(tiny, photo, tmp_path, capsys):
    model = vggkit.create_model("vgg11", width=WIDTH, num_classes=3, seed=1).eval()
    model.preprocess = CAFFE  # BGR, 0-255, the Caffe mean: the path most easily got wrong
    checkpoint = vggkit.save_checkpoint(model, tmp_path / "model.pth")
    out = tmp_path / "with_preprocess.onnx"
    assert cli.main(["export", str(checkpoint), "-o", str(out), "--with-preprocess"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "image: uint8 [224, 224, 3]" in printed and "caffe preprocessing" in printed
    assert "max abs difference" in printed.splitlines()[-1]
    crop = TF.center_crop(rescale_shortest(photo, CAFFE.resize_size), CAFFE.input_size)
    got = session(out).run(None, {"image": np.asarray(crop, dtype=np.uint8)})[0]
    with torch.no_grad():
        assert_same(got, model(model.preprocess(photo)[None]))


@pytest.mark.parametrize("argv, message", [
    (["vgg11", "-o", "model.tflite"], "Unknown export format '.tflite'"),
    (["vgg11", "-o", "m.onnx", "--dense", "--layers", "conv3_1"], "Choose --dense"),
    (["vgg11", "-o", "m.onnx", "--dynamic"], "--dynamic frees H and W"),
    (["vgg11", "-o", "m.onnx", "--opset", "12"], "--opset 12: ONNX export needs opset 17"),
    (["missing.pth", "-o", "m.onnx"], "Checkpoint not found: missing.pth"),
    (["vgg99", "-o", "m.onnx"], "Unknown VGG model 'vgg99'"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vggkit export: error: ") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_names_the_pip_command_when_onnxruntime_is_missing(tiny, tmp_path, monkeypatch, capsys):
    checkpoint = vggkit.save_checkpoint(tiny, tmp_path / "model.pth")
    monkeypatch.setattr(ort_backend, "onnxruntime_available", lambda: False)
    assert cli.main(["export", str(checkpoint), "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"vggkit export: error: onnxruntime is not installed; {ort_backend.INSTALL}."
    assert cli.main(["export", str(checkpoint), "-o", str(tmp_path / "m.pt2"), "--weights", "imagenet"]) == 2
    assert "brings its own weights; leave out --weights imagenet" in capsys.readouterr().err


def test_a_model_name_without_weights_warns_that_it_is_random(monkeypatch):
    built = []

    def tiny_create_model(spec, seed=None, **kwargs):  # the name's own network, at a tiny width
        built.append(seed)
        return vggkit.create_model(spec, seed=seed, width=WIDTH, **kwargs)

    monkeypatch.setattr(deploy, "create_model", tiny_create_model)
    with pytest.warns(UserWarning, match=r"vgg11 with random weights \(seed 0\)"):
        model = deploy.load_network("vgg11")
    assert isinstance(model, vggkit.VGG) and model.name == "vgg11" and built == [deploy.RANDOM_SEED]
    with pytest.raises(ValueError, match="a module brings its own weights"):
        deploy.load_network(model, weights="imagenet")
