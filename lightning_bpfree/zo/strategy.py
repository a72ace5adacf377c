"""``ZODataParallelStrategy``: data-parallel zeroth-order training with O(1) communication per step.

A ZO step needs no gradients, so there is nothing for DistributedDataParallel to synchronise. Every
rank holds the whole model and draws the same noise (the optimizer's seed is broadcast from rank
0); each rank evaluates the perturbed losses on its own shard of the batch (Lightning's
``DistributedSampler``), and the loss scalars are averaged with one all-reduce per closure call.
Every rank then applies the same update from the same numbers, so the parameters stay bitwise
identical without ever being sent: the traffic per step is a few floats whatever the model size.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy

from lightning_bpfree.zo.distributed import (
    all_reduce_grads_mean,
    all_reduce_mean,
    make_data_parallel,
    undo_data_parallel,
)
from lightning_bpfree.zo.optim import ZOOptimizer

__all__ = ["ZODataParallelStrategy", "all_reduce_grads_mean", "all_reduce_mean"]  # the reducers live in distributed.py


class ZODataParallelStrategy(DDPStrategy):
    """Data-parallel ZO: shared seed, all-reduced loss scalars, no DDP wrapper.

    Takes the arguments of :class:`~lightning.pytorch.strategies.DDPStrategy` (``process_group_backend``
    ``"gloo"`` on CPU, ``"nccl"`` on CUDA; ``start_method`` ...). Use it with the ``ZerothOrder``
    callback: ``Trainer(strategy=ZODataParallelStrategy(), devices=2, callbacks=[ZerothOrder(...)])``.
    The hybrid ZO/FO part, if any, has its gradients all-reduced like DDP would.
    """

    def configure_ddp(self) -> None:
        # No DistributedDataParallel: ranks only need the same starting weights.
        assert isinstance(self.model, pl.LightningModule)
        _sync_module_states(self.model)

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != "fit":
            return
        zo_optimizers = [opt for opt in self.optimizers if isinstance(opt, ZOOptimizer)]
        if not zo_optimizers or len(zo_optimizers) != len(self.optimizers):
            raise ValueError(
                "ZODataParallelStrategy trains with zeroth-order optimizers only: add the ZerothOrder callback "
                f"(got optimizers {[type(o).__name__ for o in self.optimizers]})"
            )
        device = self.root_device if self.root_device.type == "cuda" else None
        for optimizer in zo_optimizers:
            make_data_parallel(optimizer, device)

    def teardown(self) -> None:
        for optimizer in self.optimizers:
            if isinstance(optimizer, ZOOptimizer):
                undo_data_parallel(optimizer)
        super().teardown()

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"{type(self).__name__}(world_size={getattr(self, 'world_size', '?')})"

    @staticmethod
    def describe() -> dict[str, Any]:
        """What one step communicates: the loss scalars only (two all-reduces of one float, two-sided)."""
        return {"collectives_per_step": "one per closure call", "bytes_per_collective": 8}
