"""Collectives for data-parallel zeroth-order training (plain ``torch.distributed``, no Lightning).

Every rank draws the same noise, so a ZO step only needs the loss scalars averaged over ranks (and,
for the first-order part of a hybrid step, its gradients). Outside an initialised process group
both functions leave their input as it is, so single-process code can call them unconditionally.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_mean(values: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """The mean over ranks of a small float tensor (one collective call; returned on the CPU, float64).

    ``device`` is where the collective runs (a CUDA device for nccl); the default is the CPU (gloo).
    Without a process group, ``values`` is returned unchanged.
    """
    if not _initialized():
        return values
    buffer = values.detach().to(device=device or torch.device("cpu"), dtype=torch.float64).clone()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return (buffer / dist.get_world_size()).cpu()


def all_reduce_grads_mean(grads: Sequence[torch.Tensor]) -> None:
    """Average gradients across ranks in place (for the first-order part of a hybrid ZO/FO step)."""
    if not _initialized():
        return
    world = dist.get_world_size()
    for grad in grads:
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        grad.div_(world)
