"""Inference under ``torchrun``: each rank takes every world-size-th image, results gathered in dataset order.

``join_from_env`` joins the process group ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK): NCCL
where CUDA is present, else gloo. The API uses a process group already initialised by the caller.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def join_from_env() -> None:
    """Join torchrun's process group (once); alone (WORLD_SIZE unset or 1) nothing happens."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0, and alone: the process that writes files and prints."""
    return rank_and_world()[0] == 0


def rank_device(device: str | torch.device | None) -> str | torch.device | None:
    """Under a process group on CUDA, ``cuda:LOCAL_RANK`` for ``None``/"cuda" (each rank its own GPU); else ``device``."""
    _, world = rank_and_world()
    if world > 1 and torch.cuda.is_available() and (device is None or str(device) == "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return device


def rank_indices(count: int) -> list[int]:
    """This rank's share of ``count`` items: ``rank, rank + world, ...`` (all of them alone)."""
    rank, world = rank_and_world()
    return list(range(rank, count, world))


def gather(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` alone)."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    parts: list[object] = [None] * world
    dist.all_gather_object(parts, obj)
    return parts
