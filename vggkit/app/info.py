"""Tables about a model: per-layer shapes, parameters, receptive fields and FLOPs; the runtime in use."""

from __future__ import annotations

import torch
from torch import nn

from ..models.configs import PAPER_PARAMETERS, resolve
from ..models.receptive_field import receptive_field
from ..models.vgg import VGG, tap_module


def layer_rows(name: str, input_size: int = 224, width: float = 1.0) -> list[dict]:
    """One dict per named layer: name, output shape (C, H, W), parameters, multiply-adds, rf/stride/padding.

    fc6-fc8 are counted as the dense convs on the pool5 map (at 224: the FC layers).
    """
    if input_size < 32:
        raise ValueError(f"Input size {input_size} is too small: the five 2x2 max-poolings need at least 32 px "
                         f"(224 is the paper's, 384 and up give the dense form).")
    model = VGG(name, width=width).eval()
    rf = receptive_field(name)
    hooks, shapes = [], {}
    for layer in model.layer_names[:-3]:
        module = model.get_submodule(tap_module(layer))
        hooks.append(module.register_forward_hook(
            lambda mod, inp, out, layer=layer: shapes.__setitem__(layer, tuple(out.shape[1:]))))
    with torch.no_grad():
        pool5 = model.features(torch.zeros(1, 3, input_size, input_size))
        # Below 224 px fc6 cannot run as a 7x7 conv; the FC form (adaptive pool) still runs.
        dense = input_size >= 224
        maps = model.to_fully_conv().fc_maps(pool5) if dense else None
    for hook in hooks:
        hook.remove()
    for layer in ("fc6", "fc7", "fc8"):
        features = getattr(model.classifier, layer).out_features
        shapes[layer] = tuple(maps[layer].shape[1:]) if dense else (features, 1, 1)

    rows, owner = [], None
    params = {layer: 0 for layer in model.layer_names}
    for module_name, module in model.features.named_children():
        if isinstance(module, nn.Conv2d):
            owner = "conv" + module_name[len("conv"):]
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
            params[owner] += sum(p.numel() for p in module.parameters())
    for layer in ("fc6", "fc7", "fc8"):
        params[layer] = sum(p.numel() for p in getattr(model.classifier, layer).parameters())
    for layer in model.layer_names:
        c, h, w = shapes[layer]
        if layer.startswith(("conv", "fc")):
            weights = params[layer] - c  # minus biases (and BN affine, approximately)
            macs = weights * h * w
        else:
            macs = 0
        r = rf[layer]
        rows.append(dict(layer=layer, shape=(c, h, w), params=params[layer], macs=macs,
                         receptive_field=r.receptive_field, stride=r.stride, padding=r.padding))
    return rows


def layer_table(name: str, input_size: int = 224, width: float = 1.0) -> str:
    """``vggkit info NAME`` as Markdown."""
    spec = resolve(name)
    rows = layer_rows(name, input_size, width)
    lines = [f"{spec.name} (config {spec.config}{', batch norm' if spec.batch_norm else ''}), "
             f"input 3x{input_size}x{input_size}, width {width}", "",
             "| layer | output (C x H x W) | parameters | MACs | receptive field | stride | padding |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        c, h, w = r["shape"]
        lines.append(f"| {r['layer']} | {c} x {h} x {w} | {r['params']:,} | {r['macs'] / 1e6:,.1f}M | "
                     f"{r['receptive_field']} | {r['stride']} | {r['padding']} |")
    total = sum(r["params"] for r in rows)
    macs = sum(r["macs"] for r in rows)
    paper = PAPER_PARAMETERS.get(spec.config) if not spec.batch_norm and width == 1.0 else None
    lines += ["", f"parameters: {total:,}" + (f" (Table 2: {paper:,})" if paper else ""),
              f"multiply-adds: {macs / 1e9:.2f} G ({2 * macs / 1e9:.2f} GFLOPs) at {input_size}x{input_size}"]
    return "\n".join(lines)


def runtime_report() -> str:
    """What vggkit's own jobs will run on, for ``vggkit info --runtime``: inference, evaluation and
    extraction, training (device, precision, compile, decode) and why."""
    from ..runtime.engine import choose_runtime, cpu_has_fast_bf16

    runtime = choose_runtime("auto")
    long_job = choose_runtime("auto", compile="auto", long_job=True)
    gpu = runtime.device.type == "cuda"
    lines = [f"runtime: {runtime.describe()}", f"why: {runtime.reason}",
             f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"]
    if gpu:
        props = torch.cuda.get_device_properties(runtime.device)
        lines.append(f"GPU: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, compute capability "
                     f"{props.major}.{props.minor}, CUDA {torch.version.cuda}")
    else:
        lines.append(f"CPU bf16 support (AMX or AVX-512-bf16): {'yes' if cpu_has_fast_bf16() else 'no'}")
    decode = ("nvJPEG on the GPU, a batch at a time (PIL for files it cannot read: PNG, CMYK, ...)" if gpu
              else "PIL in DataLoader workers")
    train_precision = ("bf16 autocast on float32 weights" if runtime.precision == "bf16" else
                       "fp16 autocast with a gradient scaler" if runtime.precision == "fp16" else "float32")
    compile_why = ("eager: compiling pays back only on a GPU or a bf16 CPU" if not long_job.compile
                   else "torch.compile: long jobs pay back its compile time")
    lines += ["",
              f"inference (predict, the app, vggkit.optimize): {runtime.describe()}, eager "
              "(compile=True asks for torch.compile)",
              f"evaluation and extraction (long jobs): {long_job.describe()}; {compile_why}; decode: {decode}",
              f"training (vggkit train): {runtime.device.type}, {train_precision}, channels_last; "
              + ("torch.compile for runs of 1M images or more (run.compile='auto'), fused SGD, cudnn.benchmark; "
                 "decode: CPU workers, or nvJPEG with --gpu-decode" if gpu else
                 "eager (run.compile='auto' compiles on CUDA only); decode: CPU workers")]
    return "\n".join(lines)
