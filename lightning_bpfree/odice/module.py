"""ODICE as a LightningModule (Mao et al., "ODICE: Revealing the Mystery of Distribution Correction
Estimation via Orthogonal-gradient Update", ICLR 2024).

The numerics (projection, f-divergences, residuals, networks) live in
:mod:`lightning_bpfree.odice.core`; this file only decides which gradients to take and steps the
optimizer. Usage::

    from lightning_bpfree.odice import ODICE, OfflineEvaluation, make_dataset, offline_dataloader

    data = make_dataset("Pendulum-v1", "medium-replay")
    model = ODICE.for_dataset(data)                       # orthogonal gradient, paper defaults
    trainer = L.Trainer(max_steps=5000, callbacks=[OfflineEvaluation("Pendulum-v1", every_n_steps=1000)])
    trainer.fit(model, offline_dataloader(data, num_batches=5000))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from lightning_bpfree.odice.core import (
    F_DIVERGENCES,
    GRADIENTS,
    GaussianPolicy,
    TwinValue,
    check_batch,
    compute_odice_gradients,
    ema_update,
)
from lightning_bpfree.odice.datasets import OfflineDataset
from lightning_bpfree.validation import (
    check_bool,
    check_choice,
    check_float,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
)

__all__ = ["ODICE", "GRADIENTS"]

# the hyperparameters compute_odice_gradients takes, by name
_GRADIENT_OPTIONS = ("gradient", "divergence", "lam", "eta", "discount", "max_weight", "track_cosine")


class ODICE(L.LightningModule):
    """Offline RL with the orthogonal-gradient DICE update (Mao et al., ICLR 2024).

    Each training step takes a batch dict with ``observations [B, obs_dim]``, ``actions [B, act_dim]``
    (environment units; mapped to [-1, 1] with ``action_low``/``action_high``), ``rewards [B]``,
    ``next_observations [B, obs_dim]`` and ``terminals [B]`` (as :func:`offline_dataloader` yields), and:

    1. value update: gradient of (1 - lam) E[V(s)] plus the f* term, whose forward and backward
       gradients are combined per ``gradient``; one optimizer step; EMA of the target value net;
    2. policy update: weighted behaviour cloning, weights min((f')^{-1}(forward residual), max_weight).

    Both parts share one Adam optimizer (two parameter groups), so ``global_step`` counts batches.

    Args:
        obs_dim: observation size.
        act_dim: action size.
        gradient: ``"orthogonal"`` (ODICE), ``"semi"`` (forward gradient only: eta = 0) or ``"true"``
            (the full residual gradient, no projection).
        divergence: ``"pearson_chi2"`` (default) or ``"reverse_kl"``.
        lam: weight lambda of the f* term (the linear term gets 1 - lam). Paper default 0.6; the paper
            tunes it per task (its Appendix D).
        eta: weight of the projected backward gradient. Paper default 1.0.
        discount: gamma.
        target_update_rate: EMA rate beta of the target value net (0.005).
        value_lr: Adam learning rate of the value nets (2e-4, the paper's config).
        policy_lr: Adam learning rate of the policy (2e-4).
        policy_weight_decay: Adam weight decay of the policy (1e-4).
        value_hidden: widths of each value MLP (paper: 256x256, twin, layer norm).
        policy_hidden: widths of the policy MLP (paper: 1024x1024).
        layer_norm: LayerNorm in the value MLPs.
        max_weight: cap of the behaviour-cloning weights (100, the code's EXP_ADV_MAX).
        action_low: the environment's lower action bounds (default -1 per dimension).
        action_high: the environment's upper action bounds (default +1 per dimension).
        track_cosine: also compute g_b in ``"semi"`` mode, to log cos(g_f, g_b) (one more backward).
        log_every_n_steps: call ``self.log_dict`` with the ``train/`` diagnostics every this many steps
            (1: every step). Lightning's per-call logging cost is a third of a step for small
            networks on a CPU; :attr:`last_diagnostics` is updated every step either way.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        *,
        gradient: str = "orthogonal",
        divergence: str = "pearson_chi2",
        lam: float = 0.6,
        eta: float = 1.0,
        discount: float = 0.99,
        target_update_rate: float = 0.005,
        value_lr: float = 2e-4,
        policy_lr: float = 2e-4,
        policy_weight_decay: float = 1e-4,
        value_hidden: Sequence[int] = (256, 256),
        policy_hidden: Sequence[int] = (1024, 1024),
        layer_norm: bool = True,
        max_weight: float = 100.0,
        action_low: Sequence[float] | None = None,
        action_high: Sequence[float] | None = None,
        track_cosine: bool = True,
        log_every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        check_choice("gradient", gradient, GRADIENTS)
        check_choice("divergence", divergence, F_DIVERGENCES)
        check_positive_int("obs_dim", obs_dim)
        check_positive_int("act_dim", act_dim)
        check_float("lam", lam, low=0.0, low_open=True, high=1.0)
        check_nonnegative_float("eta", eta)
        check_float("discount", discount, low=0.0, high=1.0, high_open=True)
        check_positive_int("log_every_n_steps", log_every_n_steps)
        check_float("target_update_rate", target_update_rate, low=0.0, low_open=True, high=1.0)
        # a negative learning rate would be gradient ascent, a negative cap would flip every BC weight
        check_positive_float("value_lr", value_lr)
        check_positive_float("policy_lr", policy_lr)
        check_nonnegative_float("policy_weight_decay", policy_weight_decay)
        check_positive_float("max_weight", max_weight)
        check_bool("layer_norm", layer_norm)
        check_bool("track_cosine", track_cosine)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.value = TwinValue(obs_dim, value_hidden, layer_norm)
        self.target_value = TwinValue(obs_dim, value_hidden, layer_norm).requires_grad_(False)
        self.target_value.load_state_dict(self.value.state_dict())
        self.policy = GaussianPolicy(obs_dim, act_dim, policy_hidden)
        low = torch.as_tensor(action_low if action_low is not None else [-1.0] * act_dim, dtype=torch.float32)
        high = torch.as_tensor(action_high if action_high is not None else [1.0] * act_dim, dtype=torch.float32)
        if low.shape != (act_dim,) or high.shape != (act_dim,) or not bool((high > low).all()):
            raise ValueError(f"action_low/action_high must be {act_dim} values with high > low, got {low}, {high}")
        self.register_buffer("action_centre", (high + low) / 2)
        self.register_buffer("action_half_range", (high - low) / 2)
        self.last_diagnostics: dict[str, float] = {}

    @classmethod
    def for_dataset(cls, dataset: OfflineDataset, **options: Any) -> ODICE:
        """An ODICE sized for ``dataset``, with the action bounds it was collected under."""
        meta = dataset.metadata
        options.setdefault("action_low", meta.get("action_low"))
        options.setdefault("action_high", meta.get("action_high"))
        return cls(dataset.obs_dim, dataset.act_dim, **options)

    # ---------------------------------------------------------------------------------------------
    # Acting

    def act(self, observations: np.ndarray | Tensor, deterministic: bool = True) -> np.ndarray:
        """Actions in environment units ``[n, act_dim]`` for observations ``[n, obs_dim]``."""
        obs = torch.as_tensor(np.asarray(observations), dtype=torch.float32, device=self.action_centre.device)
        unit = self.policy.act(obs, deterministic=deterministic)
        return (unit * self.action_half_range + self.action_centre).cpu().numpy()

    # ---------------------------------------------------------------------------------------------
    # Training

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.Adam(
            [
                {"params": list(self.value.parameters()), "lr": hp.value_lr, "weight_decay": 0.0},
                {
                    "params": list(self.policy.parameters()),
                    "lr": hp.policy_lr,
                    "weight_decay": hp.policy_weight_decay,
                },
            ]
        )

    def compute_gradients(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """Fill ``.grad`` of every value and policy parameter for ``batch``; return diagnostics.

        The batch's actions are mapped to [-1, 1], then
        :func:`~lightning_bpfree.odice.core.compute_odice_gradients` does the work with this module's
        hyperparameters. Nothing is stepped.
        """
        hp = self.hparams
        check_batch(batch)  # before the actions are read: a missing key is a ValueError listing them all
        batch = {**batch, "actions": (batch["actions"] - self.action_centre) / self.action_half_range}
        options = {name: hp[name] for name in _GRADIENT_OPTIONS}
        # manual_backward routes through the strategy and precision plugin; outside a Trainer
        # (unit tests, plain loops) the function's plain backward does the same job
        backward = self.manual_backward if self._trainer is not None else None
        return compute_odice_gradients(self.value, self.target_value, self.policy, batch, backward=backward, **options)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers()
        diagnostics = self.compute_gradients(batch)
        optimizer.step()
        ema_update(self.target_value, self.value, self.hparams.target_update_rate)
        self.last_diagnostics = diagnostics
        if batch_idx % self.hparams.log_every_n_steps == 0:
            self.log_dict({f"train/{k}": v for k, v in diagnostics.items()}, prog_bar=False, on_step=True)
