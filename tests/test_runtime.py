"""vggkit.runtime.engine: what ``precision="auto"`` picks on which hardware, the inference copy, and the bf16 accuracy guard."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import vggkit
from vggkit.runtime import engine as rt
from vggkit.runtime.fusion import PACKED_SHAPES, PackedConv2d, onednn_available
from vggkit.app.info import runtime_report

AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})


@pytest.fixture
def cpu(monkeypatch):
    """Simulate a CPU with the given /proc/cpuinfo flags (no CUDA, no environment override)."""
    monkeypatch.delenv(rt.BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def simulate(flags):
        monkeypatch.setattr(rt, "cpu_flags", lambda: frozenset(flags))
    return simulate


# --------------------------------------------------------------------------- choices


def test_auto_is_float32_channels_last_on_a_cpu_without_bf16(cpu):
    cpu(AVX2_ONLY)
    runtime = rt.choose_runtime("auto")
    assert (runtime.device, runtime.dtype, runtime.channels_last) == (torch.device("cpu"), torch.float32, True)
    assert runtime.describe() == "cpu fp32 channels_last"
    assert "without AMX-bf16 or AVX-512-bf16" in runtime.reason
    assert not rt.cpu_has_fast_bf16()


@pytest.mark.parametrize("flag", ["amx_bf16", "avx512_bf16"])
def test_auto_is_bf16_where_the_cpu_has_it(cpu, flag):
    cpu(AVX2_ONLY | {flag, "avx512f"})
    runtime = rt.choose_runtime("auto", device="cpu")
    assert (runtime.dtype, runtime.channels_last) == (torch.bfloat16, True)
    assert runtime.describe() == "cpu bf16 channels_last"
    assert flag in runtime.reason


def test_environment_overrides_detection(cpu, monkeypatch):
    cpu(AVX2_ONLY | {"amx_bf16"})
    monkeypatch.setenv(rt.BF16_ENV, "0")
    assert rt.choose_runtime().dtype == torch.float32
    assert rt.choose_runtime().reason == f"{rt.BF16_ENV}=0"
    cpu(AVX2_ONLY)
    monkeypatch.setenv(rt.BF16_ENV, "1")
    assert rt.choose_runtime().dtype == torch.bfloat16


def test_forced_precisions_and_their_errors(cpu):
    cpu(AVX2_ONLY)
    assert rt.choose_runtime("bf16").dtype == torch.bfloat16  # forced: slow here, but it runs
    assert rt.choose_runtime("fp32").dtype == torch.float32
    with pytest.raises(ValueError, match="fp16 is for CUDA only"):
        rt.choose_runtime("fp16")
    with pytest.raises(ValueError, match=r"Unknown precision 'float32'; choose from \('auto', 'fp32'"):
        rt.choose_runtime("float32")
    with pytest.raises(ValueError, match="compile must be True, False or 'auto'"):
        rt.choose_runtime(compile="yes")


def test_compile_auto_only_for_long_jobs_where_it_gains(cpu):
    cpu(AVX2_ONLY)
    assert not rt.choose_runtime(compile="auto", long_job=True).compile  # float32 CPU: eager oneDNN already
    assert rt.choose_runtime(compile=True).compile
    cpu(AVX2_ONLY | {"amx_bf16"})
    assert rt.choose_runtime(compile="auto", long_job=True).compile
    assert not rt.choose_runtime(compile="auto", long_job=False).compile


def test_info_runtime_reports_the_choice(cpu):
    cpu(AVX2_ONLY)
    report = runtime_report()
    assert report.splitlines()[:2] == ["runtime: cpu fp32 channels_last",
                                       "why: CPU without AMX-bf16 or AVX-512-bf16: bf16 would run slower than float32"]
    assert "CPU bf16 support (AMX or AVX-512-bf16): no" in report
    cpu(AVX2_ONLY | {"avx512_bf16"})
    assert runtime_report().splitlines()[:2] == ["runtime: cpu bf16 channels_last", "why: CPU with avx512_bf16"]


def test_input_is_copied_at_most_once():
    runtime = rt.Runtime(torch.device("cpu"), torch.bfloat16)
    x = torch.randn(2, 3, 8, 8)
    moved = runtime.input(x)
    assert moved.dtype == torch.bfloat16 and moved.is_contiguous(memory_format=torch.channels_last)
    assert moved.shape == x.shape and torch.equal(moved, x.bfloat16())
    ready = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    assert rt.Runtime(torch.device("cpu"), torch.float32).input(ready) is ready


# --------------------------------------------------------------------------- the inference copy


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_optimize_leaves_the_model_an_ordinary_trainable_float32_module(precision):
    model = vggkit.create_model("vgg11", width=1 / 16, num_classes=5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}

    fast = vggkit.optimize(model, precision=precision)

    assert model.training
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32 and parameter.requires_grad, name
        assert parameter.is_contiguous(), name  # not turned channels_last behind the user's back
        assert torch.equal(parameter, before[name]) and parameter.data_ptr() == pointers[name], name
    assert all(p.dtype == DTYPE[precision] and not p.requires_grad for p in fast.model.parameters())
    assert not fast.model.training

    x = torch.randn(2, 3, 64, 64)
    fast_before = fast(x)
    loss = F.cross_entropy(model(x), torch.tensor([1, 3]))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(model.features.conv1_1.weight, before["features.conv1_1.weight"])
    # The copy shares no storage with the model: training the model leaves it as it was.
    assert torch.equal(fast(x), fast_before)
    with pytest.warns(UserWarning, match="stays in inference mode"):
        fast.train()
    assert not fast.training


DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def test_optimized_output_is_float32_and_matches_the_model():
    model = vggkit.create_model("vgg16", width=1 / 16, num_classes=7).eval()
    fast = vggkit.optimize(model, precision="fp32")
    x = torch.randn(3, 3, 64, 64)
    out = fast(x)
    assert out.dtype == torch.float32 and out.shape == (3, 7) and not out.requires_grad
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
    assert fast.preprocess is model.preprocess and fast.num_classes == 7


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_optimized_backbone_returns_float32_dicts(precision):
    net = vggkit.backbone("vgg16", layers=["conv3_3", "conv5_3", "fc7"], width=1 / 16, pad_fc6=True).eval()
    fast = vggkit.optimize(net, precision=precision)
    x = torch.randn(2, 3, 64, 64)
    out, reference = fast(x), net(x)
    assert list(out) == ["conv3_3", "conv5_3", "fc7"]
    for name in out:
        assert out[name].dtype == torch.float32 and out[name].shape == reference[name].shape
        tolerance = 1e-4 if precision == "fp32" else 5e-2
        torch.testing.assert_close(out[name], reference[name], rtol=tolerance, atol=tolerance * 2)


def test_shared_parameters_stay_shared_in_the_copy():
    vgg = vggkit.create_model("vgg11", width=1 / 16)
    both = nn.ModuleDict({"vgg": vgg, "dense": vgg.to_fully_conv()})
    copy = rt.inference_copy(both, rt.Runtime(torch.device("cpu"), torch.bfloat16))
    assert copy["dense"].fc6.weight is copy["vgg"].classifier.fc6.weight
    assert copy["vgg"].features.conv1_1.weight.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- the bf16 accuracy guard


class Probe(nn.Module):
    """(N, 3, 224, 224) -> {"conv5_3": (N, 512, 14, 14), "fc7": (N, 4096), "logits": (N, 1000)}."""

    def __init__(self, vgg: vggkit.VGG) -> None:
        super().__init__()
        self.vgg = vgg

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        conv5_3 = self.vgg.features[:-1](x)
        fc7 = self.vgg.forward_head(self.vgg.features[-1](conv5_3), pre_logits=True)
        return {"conv5_3": conv5_3, "fc7": fc7, "logits": self.vgg.classifier.fc8(fc7)}


def test_bf16_features_agree_with_float32_on_photographs():
    """Full-size vgg16: the bf16 path's conv5_3 and fc7 have cosine >= 0.999 to float32, the same top-1."""
    from skimage import data as photos

    model = vggkit.create_model("vgg16").eval()
    images = [photos.chelsea(), photos.coffee(), photos.astronaut(), photos.rocket()]
    x = torch.stack([model.preprocess(Image.fromarray(np.asarray(image))) for image in images])
    probe = Probe(model)
    with torch.no_grad():
        exact = probe(x)
    fast = vggkit.optimize(probe, precision="bf16")
    approx = fast(x)
    for layer in ("conv5_3", "fc7"):
        cosine = F.cosine_similarity(approx[layer].flatten(1), exact[layer].flatten(1))
        assert cosine.min() >= 0.999, (layer, cosine)
    # Same top-1 wherever float32's decision is not a tie within bf16's error. Random weights
    # leave some photos with near-equal top-2 logits, and bf16 rounding differs between CPUs
    # (AMX, AVX-512-bf16, emulation), so a tie must not decide the test.
    error = (approx["logits"] - exact["logits"]).abs().max()
    top2 = exact["logits"].topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * error
    assert decided.sum() >= 2, "too few photos with a clear float32 top-1 to compare"
    assert torch.equal(approx["logits"].argmax(1)[decided], exact["logits"].argmax(1)[decided])
    assert F.cosine_similarity(approx["logits"], exact["logits"]).min() >= 0.999


# --------------------------------------------------------------------------- the CPU rewrite of the copy


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN")
@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn"])
def test_packed_conv_relu_copy_computes_what_the_model_computes(name):
    model = vggkit.create_model(name, width=1 / 16).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # statistics that folding must honour
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 2)
    fast = vggkit.optimize(model, precision="fp32", device="cpu", backend="torch")  # the fused torch copy
    conv = fast.model.features.conv1_1
    assert isinstance(conv, PackedConv2d) and conv.relu
    assert isinstance(fast.model.features.relu1_1, nn.Identity)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.model.modules())
    for side in (64, 96, 64, 72, 80, 88, 64):  # more shapes than are kept packed
        x = torch.randn(2, 3, side, side)
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(conv._packed) == PACKED_SHAPES
    # Under autograd the same module runs the ordinary convolution.
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    conv(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_backbone_taps_read_the_same_maps_after_the_rewrite():
    net = vggkit.backbone("vgg16", layers=["conv1_2", "conv3_3", "pool4", "fc7"], width=1 / 16, pad_fc6=True).eval()
    fast = vggkit.optimize(net, precision="fp32", device="cpu")
    x = torch.randn(2, 3, 64, 64)
    out, reference = fast(x), net(x)
    for layer in reference:
        torch.testing.assert_close(out[layer], reference[layer], rtol=1e-4, atol=1e-5)


def test_a_used_optimized_model_can_be_copied_pickled_and_optimized_again():
    import copy
    import pickle

    model = vggkit.create_model("vgg11", width=1 / 16).eval()
    fast = vggkit.optimize(model, precision="fp32", device="cpu", backend="torch")
    x = torch.randn(1, 3, 64, 64)
    expected = fast(x)  # packs weights: oneDNN tensors that have no storage to copy
    torch.testing.assert_close(copy.deepcopy(fast)(x), expected)
    torch.testing.assert_close(pickle.loads(pickle.dumps(fast.model))(x), expected)
    again = vggkit.optimize(fast, precision="fp32", backend="torch")
    assert isinstance(again.model, vggkit.VGG)
    torch.testing.assert_close(again(x), expected)


# --------------------------------------------------------------------------- the device the caller gets back

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU twin of this test runs here")


def test_auto_on_cuda_is_bf16_channels_last_and_compiles_long_jobs(monkeypatch):
    """The GPU choices, decided without a GPU: only ``torch.cuda``'s answers are simulated."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    runtime = rt.choose_runtime("auto", compile="auto", long_job=True)
    assert (runtime.device.type, runtime.dtype, runtime.channels_last, runtime.compile) == (
        "cuda", torch.bfloat16, True, True)
    assert runtime.reason == "CUDA with bf16"
    assert not rt.choose_runtime("auto", compile="auto", long_job=False).compile
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert rt.choose_runtime("auto").dtype == torch.float16  # pre-Ampere GPUs: fp16


def test_optimizing_an_optimized_copy_keeps_its_device(monkeypatch):
    model = vggkit.create_model("vgg11", width=1 / 16, num_classes=3).eval()
    fast = vggkit.optimize(model, precision="fp32", device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the default device would now be CUDA
    again = vggkit.optimize(fast, precision="fp32")
    assert again.runtime.device == torch.device("cpu")
    x = torch.randn(1, 3, 32, 32)
    assert again(x).device == x.device


@CUDA
@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_on_cuda_the_output_comes_back_where_the_input_was(where):
    model = vggkit.create_model("vgg11", width=1 / 16, num_classes=3).eval()
    fast = vggkit.optimize(model, precision="fp32", device="cuda")
    x = torch.randn(2, 3, 64, 64, device=where)
    out = fast(x)
    assert out.device == x.device and out.dtype == torch.float32
    with torch.no_grad():
        expected = model.to(where)(x)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)  # cuDNN may use TF32
    assert vggkit.optimize(fast).runtime.device.type == "cuda"


@CUDA
def test_cuda_default_is_bf16_channels_last_and_agrees_with_float32():
    model = vggkit.create_model("vgg16", width=1 / 16, num_classes=5).eval()
    fast = vggkit.optimize(model)
    assert fast.runtime.precision in ("bf16", "fp16") and fast.runtime.channels_last
    assert fast.model.features.conv1_1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64)
    out = fast(x)
    with torch.no_grad():
        exact = model(x)
    assert out.device.type == "cpu" and out.dtype == torch.float32
    assert F.cosine_similarity(out, exact).min() >= 0.999


@CUDA
def test_cuda_compiled_copy_matches_eager():
    model = vggkit.create_model("vgg11", width=1 / 16, num_classes=3).eval()
    eager, compiled = vggkit.optimize(model, device="cuda"), vggkit.optimize(model, device="cuda", compile=True)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    assert compiled.runtime.compile
    torch.testing.assert_close(compiled(x), eager(x), rtol=5e-2, atol=5e-2)


def test_info_runtime_on_a_gpu_says_what_each_job_uses(monkeypatch):
    """`vggkit info --runtime` on a (simulated) CUDA machine: inference, evaluation, training, and why."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(
        name="NVIDIA H100 80GB HBM3", total_memory=80 * 2 ** 30, major=9, minor=0))
    lines = runtime_report().splitlines()
    assert lines[:2] == ["runtime: cuda bf16 channels_last", "why: CUDA with bf16"]
    assert lines[3].startswith("GPU: NVIDIA H100 80GB HBM3, 80 GiB, compute capability 9.0")
    jobs = "\n".join(lines)
    assert "evaluation and extraction (long jobs): cuda bf16 channels_last compiled" in jobs
    assert "decode: nvJPEG on the GPU" in jobs
    assert "training (vggkit train): cuda, bf16 autocast on float32 weights, channels_last; torch.compile" in jobs


# --------------------------------------------------------------------------- inference mode, source and backends


def test_an_optimized_copy_is_in_inference_mode_and_train_never_raises():
    """Tools that save and restore the mode (torchinfo, FX, exporters) do ``m.train(m.training)``."""
    import warnings

    model = vggkit.create_model("vgg11", width=1 / 16, num_classes=3).train()
    fast = vggkit.optimize(model, precision="fp32", device="cpu")
    assert fast.training is False and not any(m.training for m in fast.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # saving and restoring the mode, and eval(), say nothing
        assert fast.train(fast.training) is fast and fast.eval() is fast
    with pytest.warns(UserWarning, match="stays in inference mode; train its float32 original"):
        assert fast.train() is fast
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast.train(True)  # warned once already
    assert not any(m.training for m in fast.modules())
    # The original is there, untouched, and outside the copy's module tree: no parameters, .train() or .to().
    assert fast.source is model and model.training and all(p.requires_grad for p in model.parameters())
    assert not any(p is q for p in fast.parameters() for q in model.parameters())
    assert sum(1 for _ in fast.parameters()) == sum(1 for _ in fast.model.parameters())
    assert not any(key.startswith("_source") for key in fast.state_dict())
    again = vggkit.optimize(fast, precision="fp32")
    assert again.source is model  # re-made from the float32 original, not from the copy
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model.eval()(x), rtol=1e-4, atol=1e-5)


ORT = pytest.mark.skipif(not __import__("importlib").util.find_spec("onnxruntime"), reason="needs onnxruntime")


@ORT
def test_onnxruntime_backend_matches_the_float32_model():
    model = vggkit.create_model("vgg11", width=1 / 16, num_classes=7).eval()
    fast = vggkit.optimize(model, precision="fp32", device="cpu", backend="onnxruntime")
    assert fast.runtime.backend == "onnxruntime" and fast.runtime.describe() == "cpu fp32 onnxruntime"
    for shape in ((1, 3, 32, 32), (3, 3, 32, 32), (2, 3, 64, 48)):  # one session per size, any batch
        x = torch.randn(shape)
        out = fast(x)
        with torch.no_grad():
            expected = model(x)
        assert out.dtype == torch.float32 and out.device == x.device and out.shape == (shape[0], 7)
        assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert fast.model.exporter in ("dynamo", "torchscript") and list(fast.model._sessions) == [
        (3, 32, 32), (3, 64, 48)]

    layers = ["conv2_1", "pool3"]
    features = vggkit.optimize(vggkit.backbone("vgg11", layers=layers, width=1 / 16), precision="fp32",
                               device="cpu", backend="onnxruntime")
    x = torch.randn(2, 3, 40, 56)
    maps = features(x)
    with torch.no_grad():
        expected = features.source(x)
    assert list(maps) == layers
    for layer in layers:
        torch.testing.assert_close(maps[layer], expected[layer], rtol=1e-4, atol=1e-5)


def test_onnxruntime_backend_refuses_what_it_cannot_run(monkeypatch):
    from vggkit.runtime import onnx as ort_backend

    model = vggkit.create_model("vgg11", width=1 / 16, num_classes=3)
    with pytest.raises(ValueError, match=r"Unknown backend 'ort'; choose from \('auto', 'torch', 'onnxruntime'\)"):
        vggkit.optimize(model, backend="ort")
    with pytest.raises(ValueError, match="backend='onnxruntime' runs float32 on the CPU.*pass precision='fp32'"):
        vggkit.optimize(model, precision="bf16", device="cpu", backend="onnxruntime")
    monkeypatch.setattr(ort_backend, "onnxruntime_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"needs onnxruntime, which is not installed; pip install"):
        vggkit.optimize(model, precision="fp32", device="cpu", backend="onnxruntime")


def test_auto_backend_is_onnxruntime_for_float32_cpu_inference_only(cpu, monkeypatch):
    from vggkit.runtime import onnx as ort_backend

    monkeypatch.setattr(ort_backend, "onnxruntime_available", lambda: True)
    cpu(AVX2_ONLY)  # this machine's kind: float32 is the CPU default, and onnxruntime ran it fastest
    chosen = rt.choose_backend("auto", rt.choose_runtime("auto"))
    assert (chosen.backend, chosen.dtype, chosen.channels_last) == ("onnxruntime", torch.float32, False)
    assert rt.choose_backend("auto", rt.choose_runtime("auto", compile=True)).backend == "torch"
    assert rt.choose_backend("torch", rt.choose_runtime("auto")).backend == "torch"
    cpu(AVX2_ONLY | {"amx_bf16"})  # a fast-bf16 CPU: torch's fused bf16 copy
    assert rt.choose_backend("auto", rt.choose_runtime("auto")).backend == "torch"
    assert rt.choose_backend("auto", rt.choose_runtime("fp32")).backend == "onnxruntime"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert rt.choose_backend("auto", rt.choose_runtime("auto")).backend == "torch"  # a GPU
    monkeypatch.setattr(ort_backend, "onnxruntime_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu(AVX2_ONLY)
    chosen = rt.choose_backend("auto", rt.choose_runtime("auto"))
    assert chosen.backend == "torch" and "onnxruntime is not installed" in chosen.reason


@ORT
def test_the_default_backend_is_onnxruntime_on_a_float32_cpu_and_falls_back_to_torch(monkeypatch):
    import vggkit.runtime.onnx as onnx_backend

    model = vggkit.create_model("vgg11", width=1 / 16, num_classes=4).eval()
    fast = vggkit.optimize(model, precision="fp32", device="cpu")
    assert fast.runtime.backend == "onnxruntime" and not fast.model.training
    assert vggkit.optimize(model, precision="bf16", device="cpu").runtime.backend == "torch"  # no bf16 in ORT

    def refuse(*args, **kwargs):
        raise RuntimeError("ONNX export of VGG failed (dynamo: ...; torchscript: ...).")

    monkeypatch.setattr(onnx_backend, "export_onnx", refuse)
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"inputs of size \(3, 32, 32\) run in PyTorch"):
        out = fast(x)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    assert fast(x).shape == (2, 4)  # the size is remembered: no second export, no second warning


@ORT
def test_inputs_of_ever_new_sizes_stop_exporting_after_max_exports():
    import vggkit.runtime.onnx as onnx_backend

    model = vggkit.create_model("vgg11", width=1 / 16, num_classes=3).eval()
    fast = vggkit.optimize(model, precision="fp32", device="cpu", backend="onnxruntime")
    sides = [32 + 8 * i for i in range(onnx_backend.MAX_EXPORTS + 2)]
    with pytest.warns(UserWarning, match="input sizes exported already; new sizes run in PyTorch"):
        for side in sides:
            x = torch.randn(1, 3, side, side)
            with torch.no_grad():
                torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(fast.model._exported) == onnx_backend.MAX_EXPORTS
    assert len(fast.model._sessions) == onnx_backend.SESSIONS  # the latest exported sizes keep theirs
