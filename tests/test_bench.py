"""vggkit bench's bookkeeping (no timing here: speed is measured by `vggkit bench` itself)."""

import json

import pytest

from vggkit.bench import cpu as bench
from vggkit.models.backbone import VGGBackbone
from vggkit.cli import main
from vggkit.models.vgg import VGG


def test_flops_are_counted_without_computing():
    # The figure: vgg16 is 30.9 GFLOP per 224 image; features to conv5_3 are all but the head and pool5.
    assert bench.gflops(lambda: VGG("vgg16"), (1, 3, 224, 224)) == pytest.approx(30.94, abs=0.01)
    taps = bench.gflops(lambda: VGGBackbone(VGG("vgg16"), list(bench.TAPS)), (1, 3, 224, 224))
    assert taps == pytest.approx(30.69, abs=0.01)
    # Dense at 448x448: four times the convolutional work of 224, and fc6-fc8 at each of 8x8 positions.
    dense = bench.gflops(lambda: VGG("vgg16").to_fully_conv(), (1, 3, 448, 448))
    assert dense == pytest.approx(4 * taps + 64 * (30.94 - taps), rel=0.001)


def test_rows_get_ratio_and_peak_fraction():
    rows = [bench.Row("t", "reference", 2.0, 30.0, reference=True),
            bench.Row("t", "ours", 5.0, 30.0, "fp32"),
            bench.Row("t", "ours in bf16", 1.0, 30.0, "bf16"),
            bench.Row("pipeline", "no FLOPs", 40.0, None)]
    rows = bench._finish(rows, {"fp32": 300.0, "bf16": 60.0})
    assert [r.ratio for r in rows] == [None, 2.5, 0.5, None]
    assert [r.peak_fraction for r in rows] == [0.2, 0.5, 0.5, None]


def test_outputs_are_markdown_and_json(tmp_path):
    machine = dict(date="2026-01-01", cpu="Test CPU", cores=2, threads=2, load_average="0.0", torch="x",
                   runtime="cpu fp32 channels_last", runtime_reason="no bf16", quick=True)
    rows = bench._finish([bench.Row("(a) t", "torchvision", 2.0, 30.9, batch=8, reference=True),
                          bench.Row("(a) t", "vggkit", 4.0, 30.9, batch=8)], {"fp32": 100.0, "bf16": 1.0})
    result = bench.BenchResult(machine, {"fp32": 100.0, "bf16": 1.0}, rows, seconds=12.0)
    bench.write_outputs(result, tmp_path / "out" / "b.json", tmp_path / "b.md")
    table = (tmp_path / "b.md").read_text()
    assert "2026-01-01: Test CPU (2 cores" in table
    assert "| (a) t | vggkit | 8 | 4 | 2.00x | 124% (fp32) |  |" in table
    loaded = json.loads((tmp_path / "out" / "b.json").read_text())
    assert loaded["rows"][1]["ratio"] == 2.0 and loaded["peaks_gflops"]["fp32"] == 100.0


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_agreement_uses_the_tolerance_of_the_precision_that_ran():
    import torch

    torch.manual_seed(0)
    exact = torch.randn(4, 512, 14, 14).relu()
    rounded = exact.bfloat16().float()  # bf16's own rounding: ~0.2% relative
    assert bench.agreement([rounded], [exact], "bf16").startswith("same as torchvision within bf16")
    assert bench.agreement([rounded], [exact], "fp32").startswith("DIFFERS from torchvision within fp32")
    assert bench.agreement([exact * 1.1], [exact], "bf16").startswith("DIFFERS")
    assert bench.agreement([exact], [exact], "fp32") == \
        "same as torchvision within fp32 (relative error 0.0e+00, tolerance 1e-04)"


def test_device_bench_rows_run_on_the_cpu_at_toy_size(monkeypatch):
    """The GPU bench's code path, on the CPU at 32 px and batch 2: every (a) row, ratios, bf16-peak fractions.
    (Rows (f)-(i) have tests of their own.)"""
    import torch

    from vggkit.bench import gpu as bench_gpu

    monkeypatch.setattr(bench_gpu, "device_sections", lambda: [])
    result = bench_gpu.run_device_bench("cpu", settings=bench_gpu.DeviceSettings.tiny(), log=lambda message: None)
    inference = [r for r in result.rows if r.task.startswith("(a)")]
    assert [r.how.split(" (")[0] for r in inference] == [
        "torchvision default", "torchvision + bf16 autocast + channels_last", "vggkit.optimize default"]
    assert inference[0].reference and all(r.ratio > 0 for r in inference[1:])
    assert all(r.images_per_s > 0 and 0 < r.peak_fraction for r in result.rows if r.gflop_per_image)
    assert result.peak_basis == "bf16" and result.machine["device"] == bench.cpu_name()
    assert "same as torchvision" in inference[2].note
    table = result.markdown()
    assert "% of bf16's peak" in table and "(a) vgg16 inference, data on the cpu" in table
    assert torch.get_num_threads() >= 1


def test_cuda_bench_without_a_gpu_is_one_clear_line(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--device", "cuda"]) == 2
    assert "this machine has no CUDA GPU" in capsys.readouterr().err


def test_evaluation_rows_run_on_the_cpu_at_toy_size():
    """Row (i) at toy size: torchvision's reference loop, then centre, dense, multi-crop and all four."""
    from vggkit.bench import evaluation as bench_eval, gpu as bench_gpu

    rows = bench_eval.eval_rows(bench_gpu.DeviceSettings.tiny(), "cpu", lambda message: None)
    assert [r.how.split(":")[0].split(",")[0] for r in rows] == [
        "torchvision ImageFolder + DataLoader + vgg16", "centre crop", "dense", "multi-crop", "all four protocols"]
    assert rows[0].reference and not any(r.reference for r in rows[1:])
    assert all(r.images_per_s > 0 and r.gflop_per_image > 0 for r in rows)
    centre, dense, multicrop, every = (r.gflop_per_image for r in rows[1:])
    assert dense > 2 * centre and multicrop == 50 * centre and every > dense + multicrop
    assert "top-1 error" in rows[1].note and rows[3].note.endswith("crops/s")
