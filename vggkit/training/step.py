"""One optimizer step of ``vggkit train``, built the way the run builds it, so that ``vggkit bench``
times exactly what training runs.

Nothing in a step waits for the device: the loss comes back as a device scalar, and
the caller decides when to read it (``train`` does so every ``run.loss_every`` steps).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..runtime.engine import Runtime
from .recipe import Recipe


class TrainStep:
    """Forward and backward over ``accumulation`` micro-batches, the DDP all-reduce, the SGD update.

    ``model``: what runs the batches (compiled and/or DDP-wrapped); ``ddp``: the DDP module
    (for ``no_sync``) or the plain model; ``optimizer`` and ``scaler`` belong to ``raw_model``.
    """

    def __init__(self, raw_model: nn.Module, recipe: Recipe, runtime: Runtime, distributed: bool,
                 accumulation: int) -> None:
        device = runtime.device
        use_cuda = device.type == "cuda"
        self.runtime, self.accumulation, self.distributed = runtime, accumulation, distributed
        # One fused kernel for the whole update on CUDA (one launch instead of ~3 per parameter).
        self.optimizer = torch.optim.SGD(raw_model.parameters(), lr=recipe.optim.lr, momentum=recipe.optim.momentum,
                                         weight_decay=recipe.optim.weight_decay, fused=True if use_cuda else None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=runtime.precision == "fp16")
        if use_cuda:
            torch.backends.cudnn.benchmark = True  # every batch has the same shape (fixed crops): tune once
        self.model = self.ddp = raw_model
        if distributed:
            # fc6's gradient (25088 x 4096, 411 MB in float32) is one tensor, and DDP never splits a tensor
            # across buckets: it is all-reduced alone whatever the cap, and it is among the first gradients
            # backward produces, so its transfer overlaps the conv layers' backward. The conv gradients
            # (59 MB for D) then form a few 25 MB buckets (the default), each launched as soon as it fills.
            # Gradients as views of the buckets spare a 550 MB copy of fc6-fc8's gradients every step.
            self.ddp = self.model = DistributedDataParallel(
                raw_model, device_ids=[device.index] if use_cuda else None, bucket_cap_mb=25,
                gradient_as_bucket_view=True)
        if runtime.compile:
            # Compiled around DDP: dynamo splits the graph at the buckets, so all-reduces still overlap backward.
            self.model = torch.compile(self.model)

    def autocast(self):
        if self.runtime.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.runtime.dtype)

    def __call__(self, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over ``accumulation`` calls of ``next_batch`` (each: (B, 3, H, W) images and
        (B,) labels on the device) -> the step's mean loss, a device scalar (averaged over processes)."""
        step_loss = torch.zeros((), device=self.runtime.device)
        for micro in range(self.accumulation):
            images, labels = next_batch()
            # DDP all-reduces gradients on the last micro-batch only.
            last = micro == self.accumulation - 1
            with nullcontext() if last or not self.distributed else self.ddp.no_sync():
                with self.autocast():
                    loss = F.cross_entropy(self.model(images).float(), labels) / self.accumulation
                self.scaler.scale(loss).backward()
            step_loss += loss.detach()
        if self.distributed:
            torch_dist.all_reduce(step_loss, op=torch_dist.ReduceOp.AVG)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint was kept."""
