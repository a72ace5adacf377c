"""Sparse zeroth-order perturbations: a fixed fraction of each parameter is neither perturbed nor updated.

ZO-Bench (arXiv 2402.11592) reports that modest gradient sparsity helps ZO fine-tuning. Its code
draws a mask with ``normal() < s``, so the fraction it zeroes is ``Phi(s)`` (about 54 % at
``s = 0.1``), not ``s``. Here ``fraction`` is exactly the fraction of entries masked out in every
parameter tensor (``round(fraction * numel)`` entries), so the measured sparsity equals the request.

- ``method="random"``: the masked entries are drawn uniformly at random (from a seed, so a resumed
  run draws the same masks), resampled every ``resample_every`` steps.
- ``method="magnitude"``: the entries of largest ``|theta|`` are masked out, so ZO perturbs the small
  weights (Sparse MeZO, arXiv 2402.15751); recomputed every ``resample_every`` steps.

Masks are stored as one ``bool`` per element (a quarter of fp32 weights).
"""

from __future__ import annotations

import math

import torch

from lightning_bpfree.zo.perturbation import mix_seed

SPARSITY_METHODS = ("random", "magnitude")
_MASK_STREAM = 0x5A5A  # keeps mask seeds apart from perturbation seeds


class GradientSparsity:
    """A per-tensor mask on the ZO perturbation (pass as ``ZOOptimizer(..., sparsity=...)``).

    Args:
        fraction: the fraction of entries of each trainable tensor that are masked out, in ``[0, 1)``.
        method: ``"random"`` or ``"magnitude"`` (mask the largest magnitudes).
        resample_every: steps between two draws of the masks (``>= 1``).
        min_numel: tensors with fewer elements (biases, norms) are left dense.
    """

    def __init__(self, fraction: float, method: str = "random", resample_every: int = 1, min_numel: int = 1):
        fraction = float(fraction)
        if not (math.isfinite(fraction) and 0.0 <= fraction < 1.0):
            raise ValueError(f"fraction must be in [0, 1), got {fraction}")
        if method not in SPARSITY_METHODS:
            raise ValueError(f"method must be one of {SPARSITY_METHODS}, got {method!r}")
        if not isinstance(resample_every, int) or resample_every < 1:
            raise ValueError(f"resample_every must be an integer >= 1, got {resample_every!r}")
        self.fraction = fraction
        self.method = method
        self.resample_every = resample_every
        self.min_numel = int(min_numel)
        self.masks: dict[int, torch.Tensor] = {}  # parameter index -> bool mask (True = perturbed)
        self._drawn_at: int | None = None

    def refresh(self, optimizer) -> None:
        """Draw the masks for the optimizer's trainable parameters when due (every ``resample_every`` steps)."""
        step = optimizer.zo_state["step"]
        period = step // self.resample_every
        trainable = optimizer.trainable_parameters()
        if self._drawn_at == period and all(index in self.masks for index, _ in trainable):
            return
        self._drawn_at = period
        self.masks = {
            index: self.mask_for(p, mix_seed(optimizer.zo_state["seed"], _MASK_STREAM, period, index))
            for index, p in trainable
            if p.numel() >= self.min_numel and self.fraction > 0
        }

    def mask_for(self, param: torch.Tensor, seed: int) -> torch.Tensor:
        """A bool mask shaped like ``param`` with exactly ``round(fraction * numel)`` False entries."""
        numel = param.numel()
        masked = round(self.fraction * numel)
        keep = torch.ones(numel, dtype=torch.bool, device=param.device)
        if masked:
            if self.method == "random":
                generator = torch.Generator(device=param.device).manual_seed(seed)
                scores = torch.rand(numel, generator=generator, device=param.device)
            else:
                scores = param.detach().reshape(-1).abs().float()
            keep[torch.topk(scores, masked, sorted=False).indices] = False
        return keep.view(param.shape)

    def chunk_mask(self, index: int, start: int, values: torch.Tensor) -> torch.Tensor | None:
        """The mask entries matching the chunk ``values`` of parameter ``index`` (None: dense)."""
        mask = self.masks.get(index)
        if mask is None:
            return None
        return mask if values.dim() != 1 else mask.view(-1)[start : start + values.numel()]

    def measured_fraction(self) -> float:
        """The fraction of masked-out entries over all masked tensors."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / total if total else 0.0
