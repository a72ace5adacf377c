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
    GaussianPolicy,
    TwinValue,
    ema_update,
    gradient_cosine,
    orthogonal_project,
    policy_weights,
    value_losses,
)
from lightning_bpfree.odice.datasets import OfflineDataset

__all__ = ["ODICE", "GRADIENTS"]

GRADIENTS = ("orthogonal", "semi", "true")


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
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
        if divergence not in F_DIVERGENCES:
            raise ValueError(f"divergence must be one of {F_DIVERGENCES}, got {divergence!r}")
        for name, value in (("obs_dim", obs_dim), ("act_dim", act_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 < lam <= 1.0:
            raise ValueError(f"lam must lie in (0, 1], got {lam}")
        if not eta >= 0.0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if not 0.0 <= discount < 1.0:
            raise ValueError(f"discount must lie in [0, 1), got {discount}")
        if not isinstance(log_every_n_steps, int) or log_every_n_steps <= 0:
            raise ValueError(f"log_every_n_steps must be a positive int, got {log_every_n_steps!r}")
        if not 0.0 < target_update_rate <= 1.0:
            raise ValueError(f"target_update_rate must lie in (0, 1], got {target_update_rate}")
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

    def _backward(self, loss: Tensor, retain_graph: bool = False) -> None:
        # manual_backward routes through the strategy and precision plugin; outside a Trainer
        # (unit tests, plain loops) a plain backward does the same job.
        if self._trainer is not None:
            self.manual_backward(loss, retain_graph=retain_graph)
        else:
            loss.backward(retain_graph=retain_graph)

    def _value_grads(self, loss: Tensor, retain_graph: bool) -> list[Tensor]:
        params = list(self.value.parameters())
        for p in params:
            p.grad = None
        self._backward(loss, retain_graph=retain_graph)
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]

    def compute_gradients(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """Fill ``.grad`` of every value and policy parameter for ``batch``; return diagnostics.

        Value parameters get g_linear + combine(g_f, g_b) where combine is ``orthogonal_project``
        (``"orthogonal"``), g_f (``"semi"``) or g_f + g_b (``"true"``); policy parameters get the
        gradient of the weighted behaviour-cloning loss. Nothing is stepped.
        """
        hp = self.hparams
        batch = {**batch, "actions": (batch["actions"] - self.action_centre) / self.action_half_range}
        losses = value_losses(
            self.value,
            self.target_value,
            batch,
            gradient=hp.gradient,
            lam=hp.lam,
            eta=hp.eta,
            discount=hp.discount,
            divergence=hp.divergence,
        )
        need_backward = hp.gradient != "semi" or hp.track_cosine
        g_forward = self._value_grads(losses["forward"], retain_graph=True)
        g_backward = self._value_grads(losses["backward"], retain_graph=True) if need_backward else None
        if hp.gradient == "orthogonal":
            combined = orthogonal_project(g_forward, g_backward, eta=1.0)  # eta is already inside g_backward
        elif hp.gradient == "true":
            combined = [f + b for f, b in zip(g_forward, g_backward)]
        else:
            combined = g_forward

        weights = policy_weights(losses["residual"], hp.divergence, hp.max_weight)
        policy_loss = -(weights * self.policy.log_prob(batch["observations"], batch["actions"])).mean()
        for p in self.parameters():
            p.grad = None
        self._backward(losses["linear"] + policy_loss)
        for p, g in zip(self.value.parameters(), combined):
            p.grad = g if p.grad is None else p.grad + g

        diagnostics = {
            "value_loss": float((losses["linear"] + losses["forward"]).detach()),
            "policy_loss": float(policy_loss.detach()),
            "residual_mean": float(losses["residual"].mean()),
            "weight_mean": float(weights.mean()),
            "grad_forward_norm": float(torch.cat([g.reshape(-1) for g in g_forward]).norm()),
        }
        if g_backward is not None:
            diagnostics["cos_forward_backward"] = gradient_cosine(g_forward, g_backward)
            diagnostics["grad_backward_norm"] = float(torch.cat([g.reshape(-1) for g in g_backward]).norm())
        return diagnostics

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers()
        diagnostics = self.compute_gradients(batch)
        optimizer.step()
        ema_update(self.target_value, self.value, self.hparams.target_update_rate)
        self.last_diagnostics = diagnostics
        if batch_idx % self.hparams.log_every_n_steps == 0:
            self.log_dict({f"train/{k}": v for k, v in diagnostics.items()}, prog_bar=False, on_step=True)
