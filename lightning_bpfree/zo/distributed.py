"""Collectives and shard layouts for multi-process zeroth-order training (plain ``torch.distributed``).

Every rank draws the same noise, so a ZO step only needs the loss scalars averaged over ranks (and,
for the first-order part of a hybrid step, its gradients). Outside an initialised process group
every function leaves its input as it is, so single-process code can call them unconditionally.

:func:`make_data_parallel` wires a ZO optimizer for this: ``ZODataParallelStrategy`` and the
``ZerothOrder`` callback under Lightning's ``strategy="ddp"`` and ``ModelParallelStrategy`` call it.

Sharded parameters (FSDP2's ``fully_shard``: ``DTensor`` parameters split along dim 0) are
perturbed and updated through their local shard: :func:`shard_of` says which flat elements of the
whole parameter a rank holds, so that the noise of a shard is the slice of the noise the whole
parameter gets (see :mod:`lightning_bpfree.zo.perturbation`), and :func:`local_tensor` gives the
rank's elements of a parameter or of a state buffer shaped like it.
"""

from __future__ import annotations

import math
import sys
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


def _dtensor_type() -> type | None:
    """``DTensor`` if its module was imported (no parameter can be one otherwise), else None.

    Importing ``torch.distributed.tensor`` costs seconds: single-process code never pays for it.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter FSDP2 or tensor parallelism distributes)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's elements of ``tensor``: ``to_local()`` of a ``DTensor`` (same storage), else ``tensor.data``.

    Detached (``.data``): the ZO step modifies it in place under ``no_grad``.
    """
    return tensor.data.to_local() if is_sharded(tensor) else tensor.data


def shard_of(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(local, offset, numel)``: a rank's elements of ``param`` and where they sit in the whole parameter.

    ``local`` (the local shard, sharing the parameter's storage, any shape) holds the flat elements
    ``offset : offset + local.numel()`` of the whole parameter of ``numel`` elements. A plain tensor
    is whole: ``(param.data, 0, param.numel())``.

    Supported ``DTensor`` layouts are FSDP2's: ``Shard(0)`` on one mesh dimension (``Replicate()`` on
    the others, as in HSDP). The split along dim 0 is ``torch.chunk``'s, which FSDP2 and DTensor
    use: ``ceil(rows / n)`` rows per rank, the last ranks possibly holding fewer or none. Any other
    placement (tensor parallel ``Shard`` on another dim, ``Partial``, strided or nested shards) is a
    ``ValueError`` naming it; a local shard that is not contiguous is a ``ValueError`` too.
    """
    if not is_sharded(param):
        return param.data, 0, param.numel()
    local = param.data.to_local()
    shape, placements, mesh = tuple(param.shape), tuple(param.placements), param.device_mesh
    sharded = [i for i, placement in enumerate(placements) if not placement.is_replicate()]
    shard_type = sys.modules["torch.distributed.tensor"].Shard
    if len(sharded) > 1 or any(type(placements[i]) is not shard_type or placements[i].dim != 0 for i in sharded):
        raise ValueError(
            "zeroth-order training supports parameters sharded along dim 0 on one mesh dimension (FSDP2's "
            "fully_shard: placements (Shard(dim=0),), or (Replicate(), Shard(dim=0)) for HSDP), got a parameter "
            f"of shape {shape} with placements {placements}; tensor parallelism (tensor_parallel_size > 1) and "
            "shards on other dims are not supported"
        )
    if not sharded:  # replicated on every mesh dimension: each rank holds the whole parameter
        return local, 0, param.numel()
    rows = shape[0]
    count, coordinate = mesh.size(sharded[0]), mesh.get_local_rank(sharded[0])
    per_rank = -(-rows // count)  # torch.chunk: ceil(rows / count) rows per rank, the last ones maybe fewer
    begin = min(coordinate * per_rank, rows)
    end = min(begin + per_rank, rows)
    if tuple(local.shape) != (end - begin, *shape[1:]):  # guards the split rule against a change in torch
        raise ValueError(
            f"the local shard of a parameter of shape {shape} with placements {placements} has shape "
            f"{tuple(local.shape)}, expected {(end - begin, *shape[1:])} from a torch.chunk split along dim 0"
        )
    if not local.is_contiguous():
        raise ValueError(f"the local shard of a parameter of shape {shape} is not contiguous")
    return local, begin * math.prod(shape[1:]), param.numel()


def fsdp_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules of ``module`` (itself included) that FSDP2's ``fully_shard`` was applied to."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None or not hasattr(fsdp, "FSDPModule"):
        return []
    return [m for m in module.modules() if isinstance(m, fsdp.FSDPModule)]


def reshard(modules: Sequence[torch.nn.Module]) -> None:
    """Free the gathered parameters of FSDP2 modules (``FSDPModule.reshard()``; a no-op for sharded ones).

    A ZO step changes the shards between forwards, and FSDP2 keeps the root module's parameters
    gathered after a forward (it expects a backward next) and would reuse them, stale, in the next
    forward. Called around every forward, this makes each forward gather the shards as they are
    and holds only the shards between forwards.
    """
    for module in modules:
        module.reshard()


def check_shardable(optimizer: Any) -> bool:
    """Validate the layout of every sharded trainable parameter of ``optimizer``; returns whether any is sharded.

    Raises ``ValueError`` for a placement :func:`shard_of` does not support, and for an optimizer or
    part that needs whole parameters (``forward-grad``, ``sparsity``, ``first_order``).
    """
    sharded = [p for _, p in optimizer.trainable_parameters() if is_sharded(p)]
    for param in sharded:
        shard_of(param)
    if sharded:
        optimizer.check_sharding_support()
    return bool(sharded)


def make_data_parallel(optimizer: Any, device: torch.device | None = None) -> None:
    """Make a ZO optimizer's steps identical on every rank of the process group (in place).

    Every rank then draws the noise of rank 0's seed, averages the loss scalars of each closure
    call over ranks (``loss_reducer``) and, for a hybrid step, the first-order gradients
    (``first_order.grad_reducer``): from the same numbers each rank applies the same update, so
    parameters that start equal stay bitwise equal. Calling it twice is harmless (the seed is
    already shared). ``device``: where the collectives run (a CUDA device for nccl, else None).

    Sharded (FSDP2) parameters are checked here (:func:`check_shardable`): each rank then steps its
    own shard with the slice of the noise the whole parameter gets, so the shards together follow the
    trajectory of one process holding the whole model and seeing the combined batch.
    """
    check_shardable(optimizer)
    optimizer.zo_state["seed"] = broadcast_int(optimizer.zo_state["seed"], device)
    optimizer.loss_reducer = lambda values: all_reduce_mean(values, device)
    if getattr(optimizer, "first_order", None) is not None:
        optimizer.first_order.grad_reducer = all_reduce_grads_mean


def undo_data_parallel(optimizer: Any) -> None:
    """Take away the reducers :func:`make_data_parallel` set (the optimizer is single-process again)."""
    optimizer.loss_reducer = None
    if getattr(optimizer, "first_order", None) is not None:
        optimizer.first_order.grad_reducer = None
