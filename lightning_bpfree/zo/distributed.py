"""Collectives for data-parallel zeroth-order training (plain ``torch.distributed``, no Lightning).

Every rank draws the same noise, so a ZO step only needs the loss scalars averaged over ranks (and,
for the first-order part of a hybrid step, its gradients). Outside an initialised process group
every function leaves its input as it is, so single-process code can call them unconditionally.

:func:`make_data_parallel` wires a ZO optimizer for this: ``ZODataParallelStrategy`` and the
``ZerothOrder`` callback under Lightning's own ``strategy="ddp"`` both call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def broadcast_int(value: int, device: torch.device | None = None, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every rank (a 63-bit int; one collective call).

    ``device`` is where the collective runs (a CUDA device for nccl); the default is the CPU (gloo).
    Without a process group, ``value`` is returned unchanged.
    """
    if not _initialized():
        return int(value)
    buffer = torch.tensor([int(value)], dtype=torch.int64, device=device or torch.device("cpu"))
    dist.broadcast(buffer, src=src)
    return int(buffer.item())


def make_data_parallel(optimizer: Any, device: torch.device | None = None) -> None:
    """Make a ZO optimizer's steps identical on every rank of the process group (in place).

    Every rank then draws the noise of rank 0's seed, averages the loss scalars of each closure
    call over ranks (``loss_reducer``) and, for a hybrid step, the first-order gradients
    (``first_order.grad_reducer``): from the same numbers each rank applies the same update, so
    parameters that start equal stay bitwise equal. Calling it twice is harmless (the seed is
    already shared). ``device``: where the collectives run (a CUDA device for nccl, else None).
    """
    optimizer.zo_state["seed"] = broadcast_int(optimizer.zo_state["seed"], device)
    optimizer.loss_reducer = lambda values: all_reduce_mean(values, device)
    if getattr(optimizer, "first_order", None) is not None:
        optimizer.first_order.grad_reducer = all_reduce_grads_mean


def undo_data_parallel(optimizer: Any) -> None:
    """Take away the reducers :func:`make_data_parallel` set (the optimizer is single-process again)."""
    optimizer.loss_reducer = None
    if getattr(optimizer, "first_order", None) is not None:
        optimizer.first_order.grad_reducer = None
