"""ODICE (Mao et al., ICLR 2024): offline RL with the orthogonal-gradient DICE update.

- ``core.py``: the numerics as plain PyTorch: ``orthogonal_project``, the f-divergence terms, the value
  and policy networks and losses.
- ``datasets.py``: D4RL-style offline datasets (the container, environments, rollouts, batches).
- ``behaviour.py``: the behaviour policies (a scripted expert, a short TD3 run) and ``make_dataset``.
- ``module.py``: the ``ODICE`` LightningModule; ``callback.py``: ``OfflineEvaluation``;
  ``bench.py``: ``bpfree odice-bench``.

The Lightning names (and gymnasium, through the datasets) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_bpfree._lazy import lazy_exports
from lightning_bpfree.odice.core import (
    F_DIVERGENCES,
    GaussianPolicy,
    TwinValue,
    f_prime_inverse,
    f_star,
    gradient_cosine,
    orthogonal_project,
    policy_weights,
    value_losses,
)

if TYPE_CHECKING:
    from lightning_bpfree.odice.behaviour import load_or_make_datasets, make_dataset, train_behaviour_policy
    from lightning_bpfree.odice.callback import OfflineEvaluation
    from lightning_bpfree.odice.datasets import OfflineDataset, normalized_return, offline_dataloader
    from lightning_bpfree.odice.module import ODICE

_EXPORTS = {
    "ODICE": "lightning_bpfree.odice.module",
    "OfflineEvaluation": "lightning_bpfree.odice.callback",
    "OfflineDataset": "lightning_bpfree.odice.datasets",
    "normalized_return": "lightning_bpfree.odice.datasets",
    "offline_dataloader": "lightning_bpfree.odice.datasets",
    "make_dataset": "lightning_bpfree.odice.behaviour",
    "load_or_make_datasets": "lightning_bpfree.odice.behaviour",
    "train_behaviour_policy": "lightning_bpfree.odice.behaviour",
}

__all__ = [
    "F_DIVERGENCES",
    "ODICE",
    "GaussianPolicy",
    "OfflineDataset",
    "OfflineEvaluation",
    "TwinValue",
    "f_prime_inverse",
    "f_star",
    "gradient_cosine",
    "load_or_make_datasets",
    "make_dataset",
    "normalized_return",
    "offline_dataloader",
    "orthogonal_project",
    "policy_weights",
    "train_behaviour_policy",
    "value_losses",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
