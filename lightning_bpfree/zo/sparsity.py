"""Sparse zeroth-order perturbations: a fixed fraction of each parameter is neither perturbed nor updated.

ZO-Bench (arXiv 2402.11592) reports that modest gradient sparsity helps ZO fine-tuning. Its code
draws a mask with ``normal() < s``, so the fraction it zeroes is ``Phi(s)`` (about 54 % at
``s = 0.1``), not ``s``. Here ``fraction`` is exactly the fraction of entries masked out
(``round(fraction * numel)`` entries), so the measured sparsity equals the request.

- ``method="random"``: the masked entries are drawn uniformly at random (from a seed, so a resumed
  run draws the same masks), resampled every ``resample_every`` steps.
- ``method="magnitude"``: the entries of largest ``|theta|`` are masked out, so ZO perturbs the small
  weights (Sparse MeZO, arXiv 2402.15751); recomputed every ``resample_every`` steps.

``group`` is ZO-LLM's ``--sparse_gradient_group``: ``"layer"`` masks ``fraction`` of every tensor;
``"global"`` masks ``fraction`` of all eligible entries together, split between the tensors by one
magnitude threshold (a tensor with many large weights gets a higher sparsity than one with few).

Masks are stored as one ``bool`` per element (a quarter of fp32 weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_bpfree.validation import check_choice, check_int, check_positive_int, check_probability
from lightning_bpfree.zo.parts import ZOPart
from lightning_bpfree.zo.perturbation import chunk_of, mix_seed

SPARSITY_METHODS = ("random", "magnitude")
SPARSITY_GROUPS = ("layer", "global")
_MASK_STREAM = 0x5A5A  # keeps mask seeds apart from perturbation seeds
_COUNT_KEY = "sparsity_masked.{}"  # zo_state key: masked entries of one parameter (global random)


class GradientSparsity(ZOPart):
    """A mask on the ZO perturbation (pass as ``ZOOptimizer(..., sparsity=...)``).

    Args:
        fraction: the fraction of entries masked out, in ``[0, 1)``: of each trainable tensor
            (``group="layer"``) or of all eligible entries together (``group="global"``).
        method: ``"random"`` or ``"magnitude"`` (mask the largest magnitudes).
        resample_every: steps between two draws of the masks (``>= 1``).
        min_numel: tensors with fewer elements (biases, norms) are left dense; in ``"global"`` mode
            they do not count toward the total either.
        group: ``"layer"`` or ``"global"`` (ZO-LLM's ``--sparse_gradient_group``). In ``"global"``
            mode one threshold on ``|theta|`` over all eligible tensors masks exactly
            ``k = round(fraction * total)`` entries, the ``k`` largest (ties go to the lower
            parameter index, then the lower flat position); each tensor's own sparsity is the
            fraction of its entries that this masks.

            - ``"magnitude"``: the mask is that global-threshold mask, recomputed from the current
              weights every ``resample_every`` steps.
            - ``"random"``: the per-tensor counts are derived once, from the weights at the first
              draw (the pretrained weights), then each tensor gets a random mask of exactly its own
              count, redrawn every ``resample_every`` steps. The counts are written to the
              optimizer's ``zo_state`` (one integer per tensor, keys ``"sparsity_masked.<index>"``),
              so a resumed run reuses them rather than deriving new ones from trained weights.

            The threshold is found by a radix select on the float32 bit patterns of ``|theta|``
            (four 256-bin histogram passes plus one mask pass over the weights per draw), so no
            concatenated copy of the weights is made; the extra memory is the temporaries of one
            tensor at a time (an int32 copy of its ``|theta|`` bits, a float32 copy first for
            non-float32 weights, and bool/index tensors of its size).

    A resumed run draws the same masks as an uninterrupted one, except with ``"magnitude"`` when it
    resumes in the middle of a resampling period: the masks are then recomputed from the weights at
    the resume step rather than those at the start of the period.
    """

    def __init__(
        self,
        fraction: float,
        method: str = "random",
        resample_every: int = 1,
        min_numel: int = 1,
        group: str = "layer",
    ):
        self.fraction = check_probability("fraction", fraction, include_one=False)
        self.method = check_choice("method", method, SPARSITY_METHODS)
        self.resample_every = check_positive_int("resample_every", resample_every)
        self.min_numel = check_int("min_numel", min_numel, low=0)
        self.group = check_choice("group", group, SPARSITY_GROUPS)
        self.masks: dict[int, torch.Tensor] = {}  # parameter index -> bool mask (True = perturbed)
        self.counts: dict[int, int] = {}  # global mode: parameter index -> masked entries
        self._drawn_at: int | None = None
        self._drawn_for: set[int] = set()  # parameter indices the current draw covers

    def before_step(self, optimizer: Any, closure: Callable[[], Any]) -> None:
        self.refresh(optimizer)

    def refresh(self, optimizer: Any) -> None:
        """Draw the masks for the optimizer's trainable parameters when due (every ``resample_every`` steps)."""
        step = optimizer.zo_state["step"]
        period = step // self.resample_every
        trainable = optimizer.trainable_parameters()
        if self._drawn_at == period and all(index in self._drawn_for for index, _ in trainable):
            return
        self._drawn_at = period
        # Dense tensors (below min_numel) are covered too; otherwise a dense tensor would force a
        # redraw on every step, ignoring resample_every.
        self._drawn_for = {index for index, _ in trainable}
        eligible = [(index, p) for index, p in trainable if p.numel() >= self.min_numel] if self.fraction > 0 else []
        if self.group == "layer":
            self.masks = {
                index: self.mask_for(p, mix_seed(optimizer.zo_state["seed"], _MASK_STREAM, period, index))
                for index, p in eligible
            }
            return
        if self.method == "magnitude":
            self.masks = global_magnitude_masks([p for _, p in eligible], self.fraction, [i for i, _ in eligible])
            self.counts = {index: int((~mask).sum()) for index, mask in self.masks.items()}
            return
        self.counts = self._derived_counts(optimizer.zo_state, eligible)
        self.masks = {
            index: self._mask(p, mix_seed(optimizer.zo_state["seed"], _MASK_STREAM, period, index), self.counts[index])
            for index, p in eligible
        }

    def _derived_counts(self, zo_state: dict[str, int], eligible: list[tuple[int, torch.Tensor]]) -> dict[int, int]:
        """Masked entries per tensor for global random masks: from ``zo_state``, else derived and stored there."""
        stored = {index: zo_state.get(_COUNT_KEY.format(index)) for index, _ in eligible}
        total = sum(p.numel() for _, p in eligible)
        # Stored counts are reused only if they fit this configuration (same tensors, same total).
        if all(
            count is not None and 0 <= count <= p.numel() for (index, p), count in zip(eligible, stored.values())
        ) and sum(stored.values()) == round(self.fraction * total):
            return {index: int(count) for index, count in stored.items()}
        masks = global_magnitude_masks([p for _, p in eligible], self.fraction, [i for i, _ in eligible])
        counts = {index: int((~mask).sum()) for index, mask in masks.items()}
        zo_state.update({_COUNT_KEY.format(index): count for index, count in counts.items()})
        return counts

    def mask_for(self, param: torch.Tensor, seed: int) -> torch.Tensor:
        """A bool mask shaped like ``param`` with exactly ``round(fraction * numel)`` False entries."""
        return self._mask(param, seed, round(self.fraction * param.numel()))

    def _mask(self, param: torch.Tensor, seed: int, masked: int) -> torch.Tensor:
        """A bool mask shaped like ``param`` with exactly ``masked`` False entries (per ``method``)."""
        numel = param.numel()
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
        return None if mask is None else chunk_of(mask, start, values)

    def measured_fraction(self) -> float:
        """The fraction of masked-out entries over all masked tensors."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / total if total else 0.0


def _abs_bits(param: torch.Tensor) -> torch.Tensor:
    """``|param|`` in float32 as int32 bit patterns, flat ``(numel,)`` (one new int32 tensor).

    Clearing the sign bit is ``abs``; for non-negative floats the bit patterns order exactly as the
    values do (NaN above inf), so integer histograms of the bits select an order statistic exactly.
    """
    return param.detach().reshape(-1).float().view(torch.int32) & 0x7FFFFFFF


def _kth_largest_bits(params: Sequence[torch.Tensor], k: int) -> tuple[int, int]:
    """The float32 bit pattern of the ``k``-th largest ``|theta|`` over ``params`` (``1 <= k <= total``),
    and how many entries equal to it are among the ``k`` largest.

    Radix select, 8 bits per pass, most significant first: each pass histograms the next byte of
    the entries whose higher bytes match the prefix found so far (4 passes, one tensor at a time).
    """
    prefix, remaining = 0, k
    for shift in (24, 16, 8, 0):
        histogram = torch.zeros(256, dtype=torch.int64)
        for param in params:
            bits = _abs_bits(param)
            if shift < 24:
                bits = bits[(bits >> (shift + 8)) == (prefix >> (shift + 8))]
            histogram += torch.bincount((bits >> shift) & 0xFF, minlength=256).cpu()
        # Walk the bins from the largest byte down until the k-th largest falls in one.
        for digit, count in reversed(list(enumerate(histogram.tolist()))):
            if count >= remaining:
                prefix |= digit << shift
                break
            remaining -= count
    return prefix, remaining


def global_magnitude_masks(
    params: Sequence[torch.Tensor], fraction: float, indices: Sequence[int] | None = None
) -> dict[int, torch.Tensor]:
    """Masks that leave out exactly ``round(fraction * total)`` entries of ``params`` together: the largest ``|theta|``.

    Args:
        params: the tensors (any shapes, dtypes and devices); ``total`` is their summed ``numel``.
        fraction: the fraction of all their entries to mask out, in ``[0, 1)``.
        indices: the keys of the returned dict (default ``0, 1, ...``).

    Returns:
        ``{index: bool mask shaped like the tensor}``, ``True`` = perturbed. Ties at the threshold go
        to the tensor listed first, then to the lower flat position, so the result is deterministic.
    """
    indices = list(range(len(params))) if indices is None else list(indices)
    total = sum(p.numel() for p in params)
    k = round(fraction * total)
    if k == 0:
        return {index: torch.ones(p.shape, dtype=torch.bool, device=p.device) for index, p in zip(indices, params)}
    threshold, ties = _kth_largest_bits(params, k)
    masks = {}
    for index, param in zip(indices, params):
        bits = _abs_bits(param)
        keep = bits < threshold  # everything at or above the threshold is masked ...
        equal = torch.nonzero(bits == threshold).view(-1)
        take = min(ties, equal.numel())
        keep[equal[take:]] = True  # ... except the ties beyond the first `ties` of them
        ties -= take
        masks[index] = keep.view(param.shape)
    return masks
