"""Zeroth-order optimizers: ``torch.optim.Optimizer``s that train with forward passes only.

``step(closure)`` evaluates the loss at perturbed parameters ``theta +- eps z`` (``z`` regenerated
from a seed, see :mod:`lightning_bpfree.zo.perturbation`), forms the projected gradient

    g = (L(theta + eps z) - L(theta - eps z)) / (2 eps)        (two-sided)
    g = (L(theta + eps z) - L(theta)) / eps                      (one-sided)

and updates ``theta`` along ``z`` (MeZO, arXiv 2305.17333). The closure is called under
``torch.no_grad()``: it must return the loss and must not call ``backward``.

State for exact resume (``state_dict``): the base seed and the step counter. Each step's noise
seed is a hash of the two, so a resumed run draws exactly the noise the uninterrupted run drew.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_bpfree.zo.perturbation import SeededNoise, mix_seed

# Keeping a copy of the trainable parameters makes restores bitwise exact; up to this many bytes of
# trainable parameters (LoRA, prefix, head-only) the copy is kept by default.
EXACT_RESTORE_MAX_BYTES = 64 * 2**20


@dataclass
class ZOEstimate:
    """What one ``step`` measured: per query, its noise seed and projected gradient (a scalar)."""

    seeds: list[int] = field(default_factory=list)
    projected_grads: list[float] = field(default_factory=list)
    loss_plus: list[float] = field(default_factory=list)
    loss_minus: list[float] = field(default_factory=list)
    skipped: bool = False
    pending_scale: float = 0.0

    @property
    def loss(self) -> float:
        """The loss at theta: mean of the perturbed losses (second-order accurate in eps)."""
        values = self.loss_plus + self.loss_minus
        return sum(values) / len(values) if values else float("nan")


def _check(name: str, value: float, low: float, *, strict: bool) -> float:
    value = float(value)
    bad = not math.isfinite(value) or (value <= low if strict else value < low)
    if bad:
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {relation} {low}, got {value}")
    return value


def _as_float(loss: Any, name: str = "closure") -> float:
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"the {name} must return a scalar loss, got a tensor of shape {tuple(loss.shape)}")
        return float(loss.detach().float().item())
    if isinstance(loss, int | float):
        return float(loss)
    raise TypeError(f"the {name} must return a scalar tensor or a float, got {type(loss).__name__}")


class ZOOptimizer(Optimizer):
    """Base class of the zeroth-order optimizers: seeded perturbation, estimate, update.

    Args:
        params: parameters or parameter groups; only tensors with ``requires_grad=True`` at step
            time are perturbed and updated.
        lr: learning rate (``>= 0``), per group; LR schedulers change ``param_groups[i]["lr"]``.
        eps: perturbation scale (``> 0``).
        weight_decay: decoupled from the estimate: ``theta <- theta - lr * wd * theta``.
        perturbation: ``"gaussian"`` or ``"rademacher"``.
        one_sided: use ``(L(theta + eps z) - L(theta)) / eps`` (one perturbed forward per query
            plus one unperturbed forward per step) instead of the two-sided difference.
        num_queries: directions averaged per step (``q``); memory does not grow with ``q``.
        seed: base seed of the noise; default ``torch.initial_seed()`` (so ``seed_everything``
            fixes it) without drawing from the global generator.
        exact_restore: keep a copy of the trainable parameters so that every restore is bitwise
            exact (costs their size in memory). ``None`` (default) keeps it when they take at most
            64 MiB, e.g. for LoRA; otherwise restores are arithmetic (``theta + eps z - 2 eps z +
            eps z``), exact up to float rounding, as in MeZO.
        chunk_numel, num_threads: see :class:`~lightning_bpfree.zo.perturbation.SeededNoise`.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        perturbation: str = "gaussian",
        one_sided: bool = False,
        num_queries: int = 1,
        seed: int | None = None,
        exact_restore: bool | None = None,
        chunk_numel: int = 1 << 20,
        num_threads: int | None = None,
        **defaults: Any,
    ):
        _check("lr", lr, 0.0, strict=False)
        _check("eps", eps, 0.0, strict=True)
        _check("weight_decay", weight_decay, 0.0, strict=False)
        if not isinstance(num_queries, int) or num_queries < 1:
            raise ValueError(f"num_queries must be an integer >= 1, got {num_queries!r}")
        if exact_restore not in (None, True, False):
            raise ValueError(f"exact_restore must be True, False or None (auto), got {exact_restore!r}")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, **defaults))
        for group in self.param_groups:
            _check("lr", group["lr"], 0.0, strict=False)
            _check("eps", group["eps"], 0.0, strict=True)
        self.noise = SeededNoise(perturbation, chunk_numel=chunk_numel, num_threads=num_threads)
        self.one_sided = bool(one_sided)
        self.num_queries = num_queries
        self.exact_restore = exact_restore
        self.zo_state: dict[str, int] = {
            "seed": int(torch.initial_seed() if seed is None else seed) & ((1 << 63) - 1),
            "step": 0,
            "skipped_steps": 0,
        }
        self.last_estimate = ZOEstimate()
        self._backup: dict[int, torch.Tensor] = {}

    # ----------------------------------------------------------------------------- bookkeeping
    def _indexed_params(self) -> list[tuple[dict, list[torch.Tensor], list[int]]]:
        """Per group: the trainable parameters and their stable indices (position among all params)."""
        out, position = [], 0
        for group in self.param_groups:
            params, indices = [], []
            for p in group["params"]:
                if p.requires_grad:
                    params.append(p)
                    indices.append(position)
                position += 1
            out.append((group, params, indices))
        return out

    def _uses_backup(self) -> bool:
        if self.exact_restore is not None:
            return self.exact_restore
        nbytes = sum(p.numel() * p.element_size() for _, ps, _ in self._indexed_params() for p in ps)
        return nbytes <= EXACT_RESTORE_MAX_BYTES

    def query_seed(self, step: int, query: int) -> int:
        """The noise seed of query ``query`` at step ``step``."""
        return mix_seed(self.zo_state["seed"], step, query)

    def for_each_chunk(
        self, seed: int, fn: Callable[[dict, int, int, torch.Tensor, torch.Tensor], None]
    ) -> None:
        """Call ``fn(group, param_index, start, values, z)`` on every chunk of every trainable parameter."""
        for group, params, indices in self._indexed_params():
            if params:
                self.noise.for_each_chunk(
                    params, seed, lambda i, s, v, z, g=group: fn(g, i, s, v, z), param_indices=indices
                )

    # ---------------------------------------------------------------------------- perturbation
    def _save_backup(self) -> None:
        for _, params, indices in self._indexed_params():
            for p, i in zip(params, indices):
                buffer = self._backup.get(i)
                if buffer is None or buffer.shape != p.shape or buffer.dtype != p.dtype:
                    self._backup[i] = p.detach().clone()
                else:
                    buffer.copy_(p.detach())

    def _backup_chunk(self, index: int, start: int, values: torch.Tensor) -> torch.Tensor:
        backup = self._backup[index]
        return backup if values.dim() != 1 else backup.view(-1)[start : start + values.numel()]

    def perturb_(self, seed: int, scale_in_eps: float, from_backup: bool = False) -> None:
        """``theta <- theta + scale_in_eps * eps * z`` (or ``backup + ...`` when ``from_backup``)."""

        def apply(group: dict, index: int, start: int, values: torch.Tensor, z: torch.Tensor) -> None:
            if from_backup:
                values.copy_(self._backup_chunk(index, start, values))
            values.add_(z, alpha=scale_in_eps * group["eps"])

        self.for_each_chunk(seed, apply)

    def restore_(self, seed: int, current_scale_in_eps: float, use_backup: bool) -> None:
        """Undo a perturbation of ``current_scale_in_eps * eps * z``."""
        if use_backup:
            for _, params, indices in self._indexed_params():
                for p, i in zip(params, indices):
                    p.data.copy_(self._backup[i])
        else:
            self.perturb_(seed, -current_scale_in_eps)

    # ------------------------------------------------------------------------------- the step
    def estimate(self, closure: Callable[[], Any], use_backup: bool, leave_perturbed: bool = False) -> ZOEstimate:
        """Evaluate the closure at perturbed parameters and form the projected gradients.

        The parameters are restored after every query, except, when ``leave_perturbed`` (two-sided,
        one query, arithmetic restore), after the last one: they stay at ``theta - eps z`` and
        ``estimate.pending_scale`` is ``-1.0``, so that the restore can share the update's pass
        over the noise.
        """
        est = ZOEstimate(seeds=[self.query_seed(self.zo_state["step"], q) for q in range(self.num_queries)])
        loss_at_theta = _as_float(closure()) if self.one_sided else None
        eps = self.param_groups[0]["eps"]
        for query, seed in enumerate(est.seeds):
            self.perturb_(seed, +1.0)
            loss_plus = _as_float(closure())
            if self.one_sided:
                self.restore_(seed, +1.0, use_backup)
                loss_minus, denominator = loss_at_theta, 1.0
            else:
                if use_backup:
                    self.perturb_(seed, -1.0, from_backup=True)
                else:
                    self.perturb_(seed, -2.0)
                loss_minus, denominator = _as_float(closure()), 2.0
                if leave_perturbed and query == len(est.seeds) - 1:
                    est.pending_scale = -1.0
                else:
                    self.restore_(seed, -1.0, use_backup)
            est.loss_plus.append(loss_plus)
            est.loss_minus.append(loss_minus)
            est.projected_grads.append((loss_plus - loss_minus) / (denominator * eps))
            if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
                est.skipped = True
                break
        return est

    def update_chunk(
        self, group: dict, index: int, start: int, values: torch.Tensor, z: torch.Tensor, coeff: float, query: int
    ) -> None:
        """The update rule on one chunk: ``values -= lr * (coeff * z + wd * values)`` (ZO-SGD).

        ``coeff`` is the query's projected gradient divided by the number of queries; ``query`` its
        position (weight decay is applied once, with the first). Subclasses with other rules
        (momentum, Adam, sign) override this; their state is indexed by ``(index, start)``.
        """
        if query == 0 and group["weight_decay"]:
            values.mul_(1.0 - group["lr"] * group["weight_decay"])
        values.add_(z, alpha=-group["lr"] * coeff)

    def update(self, estimate: ZOEstimate) -> None:
        """Apply ``update_chunk`` for every query, first undoing ``estimate.pending_scale`` in the same pass."""
        last = len(estimate.seeds) - 1
        for query, (seed, grad) in enumerate(zip(estimate.seeds, estimate.projected_grads)):
            coeff = grad / len(estimate.seeds)
            pending = estimate.pending_scale if query == last else 0.0

            def apply(group, index, start, values, z, q=query, c=coeff, pending=pending) -> None:
                if pending:
                    values.add_(z, alpha=-pending * group["eps"])
                self.update_chunk(group, index, start, values, z, c, q)

            self.for_each_chunk(seed, apply)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One zeroth-order step; ``closure()`` computes the loss (no backward). Returns the loss at theta.

        A NaN or infinite loss skips the update: the parameters are restored (bitwise when a copy
        is kept, see ``exact_restore``) and ``zo_state["skipped_steps"]`` is incremented.
        """
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that returns the loss")
        use_backup = self._uses_backup()
        if use_backup:
            self._save_backup()
        fuse = not use_backup and not self.one_sided and self.num_queries == 1
        estimate = self.estimate(closure, use_backup, leave_perturbed=fuse)
        if estimate.skipped:
            if estimate.pending_scale:
                self.restore_(estimate.seeds[-1], estimate.pending_scale, use_backup)
            self.zo_state["skipped_steps"] += 1
        else:
            self.update(estimate)
        self.zo_state["step"] += 1
        self.last_estimate = estimate
        return torch.tensor(estimate.loss)

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["zo_state"] = dict(self.zo_state)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        zo_state = state_dict.pop("zo_state", None)
        super().load_state_dict(state_dict)
        if zo_state is not None:
            self.zo_state.update({k: int(v) for k, v in zo_state.items()})


class ZOSGD(ZOOptimizer):
    """MeZO: zeroth-order SGD with in-place, seed-replayed perturbations (memory of inference).

    ``ZOSGD(params, lr, eps=1e-3, weight_decay=0.0, perturbation="gaussian", one_sided=False)``;
    see :class:`ZOOptimizer` for every option. Per step: 2 forwards (two-sided), 3 passes of
    regenerated noise over the trainable parameters (``+eps z``, ``-2 eps z``, restore + update).
    """


OPTIMIZERS: dict[str, type[ZOOptimizer]] = {"zo-sgd": ZOSGD}


def make_optimizer(name: str, params: Iterable, **options: Any) -> ZOOptimizer:
    """Build the ZO optimizer registered as ``name`` (see ``OPTIMIZERS``)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name](params, **options)
