"""The hooks through which an enhancement joins a zeroth-order step.

:class:`~lightning_bpfree.zo.optim.ZOOptimizer` knows nothing about blocks, sparsity or hybrid
first-order training: each is a :class:`ZOPart` (``ParameterBlocks`` in ``blocks.py``,
``GradientSparsity`` in ``sparsity.py``, ``FirstOrderPart`` in ``hybrid.py``) and the base calls
the hooks below at fixed points of ``step``, in the order the parts were given:

1. ``before_step(optimizer, closure)`` on every part (resample masks, first-order gradients ...);
   then, if any part's ``skips_step()`` is True (the first-order loss or gradients are not
   finite), the whole step is skipped: nothing moves, the skip is counted, go to 3;
2. one estimate-and-update pass per scope: the first part whose ``scopes()`` is not ``None``
   splits the trainable parameters into subsets stepped one after the other (blocks), otherwise
   one pass over all of them; ``chunk_mask`` of every part multiplies the noise of each chunk;
3. ``after_step(optimizer, loss)`` on every part, which may replace the returned loss; the
   optimizer's ``last_step_skipped`` says whether the step (or any block's estimate) was skipped.

Parameters listed by ``excluded()`` are never perturbed nor updated by the ZO estimate, and a part
with a ``state_key`` has its ``state_dict()`` saved under that key of the optimizer's state dict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


class ZOPart:
    """An enhancement of the zeroth-order step; every hook does nothing by default."""

    state_key: str | None = None
    """Key of this part's ``state_dict()`` in the optimizer's ``state_dict()`` (``None``: stateless)."""

    def excluded(self) -> Sequence[torch.Tensor]:
        """Parameters the ZO estimate must leave alone (never perturbed, updated or masked)."""
        return ()

    def before_step(self, optimizer: Any, closure: Callable[[], Any]) -> None:
        """Run at the start of ``optimizer.step(closure)``, before any perturbation."""

    def skips_step(self) -> bool:
        """Asked after ``before_step``: True to skip this whole step (nothing is perturbed nor updated)."""
        return False

    def scopes(self) -> Sequence[Sequence[torch.Tensor]] | None:
        """Parameter subsets to estimate and update one after the other (``None``: all at once)."""
        return None

    def chunk_mask(self, index: int, start: int, values: torch.Tensor) -> torch.Tensor | None:
        """A 0/1 mask (shape of ``values``) on the noise of one chunk of parameter ``index`` (``None``: dense)."""
        return None

    def after_step(self, optimizer: Any, loss: torch.Tensor) -> torch.Tensor:
        """Run at the end of ``optimizer.step``; returns the loss ``step`` reports (0-d tensor)."""
        return loss

    def state_dict(self) -> dict[str, Any]:
        """What this part needs to resume exactly (saved only when ``state_key`` is set)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
