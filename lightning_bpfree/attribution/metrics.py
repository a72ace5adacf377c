"""Faithfulness of a token attribution: (soft) normalised sufficiency and comprehensiveness.

The model predicts ``y`` with probability ``p(y | x)``. An attribution is *sufficient* if keeping only
the tokens it marks keeps ``p(y)`` high, and *comprehensive* if removing them makes ``p(y)`` fall.
Removing a token means multiplying its input embedding by zero; the soft variants (Zhao & Aletras,
2023, used by ReAGent) instead keep each embedding *element* with a probability equal to the token's
normalised importance (sufficiency) or one minus it (comprehensiveness), so no top-k cut-off is
needed. With ``S(x') = 1 - max(0, p(y|x) - p(y|x'))`` and ``S0`` its value when every embedding is
zeroed (the empty input):

    NS = max(0, S(x_kept) - S0) / (1 - S0)          NC = max(0, p(y|x) - p(y|x_removed)) / (1 - S0)

Higher is more faithful. NS lies in [0, 1]; NC exceeds 1 when removing the rationale lowers ``p(y)``
below its value on the empty input. Examples whose prediction does not drop when the whole
input is zeroed (``S0 = 1``) have no scale and are counted in ``num_skipped`` instead.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_bpfree.attribution.model_interface import (
    LanguageModel,
    check_model,
    check_model_token_ids,
    evaluation_mode,
    logits_from_embeddings,
    model_device,
    next_token_logits,
    token_embeddings,
)
from lightning_bpfree.validation import (
    check_choice,
    check_finite_tensor,
    check_float,
    check_int,
    check_optional,
    check_positive_int,
    check_seed,
)


def normalized_sufficiency(full_prob: Tensor, kept_prob: Tensor, empty_prob: Tensor) -> Tensor:
    """``max(0, S(kept) - S0) / (1 - S0)`` elementwise; NaN where ``S0 = 1`` (no scale). Shapes ``[B]``."""
    sufficiency = 1 - (full_prob - kept_prob).clamp(min=0)
    empty_sufficiency = 1 - (full_prob - empty_prob).clamp(min=0)
    scale = 1 - empty_sufficiency
    return torch.where(scale > 0, (sufficiency - empty_sufficiency).clamp(min=0) / scale, torch.nan)


def normalized_comprehensiveness(full_prob: Tensor, removed_prob: Tensor, empty_prob: Tensor) -> Tensor:
    """``max(0, p_full - p_removed) / (1 - S0)`` elementwise; NaN where ``S0 = 1``. Shapes ``[B]``."""
    scale = (full_prob - empty_prob).clamp(min=0)
    return torch.where(scale > 0, (full_prob - removed_prob).clamp(min=0) / scale, torch.nan)


NORMALIZATIONS = ("max", "rank")


def keep_probabilities(importance: Tensor, normalization: str = "max") -> Tensor:
    """Map importance ``[B, N]`` to per-token keep probabilities in [0, 1].

    ``"max"``: the positive part over the row maximum (the top token is always kept, negative scores
    never). ``"rank"``: the token ranked r-th (0 = most important) gets ``(N - r) / N``, so every
    method keeps the same expected share of the input and only its ordering counts.
    """
    if check_choice("normalization", normalization, NORMALIZATIONS) == "max":
        positive = importance.float().clamp(min=0)
        top = positive.amax(dim=-1, keepdim=True)
        return torch.where(top > 0, positive / top.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    length = importance.shape[-1]
    order = torch.argsort(importance.float(), dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(length).expand_as(order))
    return (length - ranks).float() / length


def top_k_mask(importance: Tensor, k: int) -> Tensor:
    """Bool ``[B, N]``, True on the ``k`` highest-importance tokens of each row (ties: lower index)."""
    order = torch.argsort(importance.float(), dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(importance, dtype=torch.bool)
    return mask.scatter(-1, order[:, :k], True)


def masked_target_probability(
    model: LanguageModel, input_ids: Tensor, target_ids: Tensor, keep: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """``p(target | x')`` where each embedding element of token n is kept with probability ``keep[:, n]``.

    Args:
        input_ids: int64 ``[B, N]``. target_ids: int64 ``[B]``.
        keep: float ``[B, N]`` in [0, 1] (0/1 values make the masking deterministic).

    Returns:
        float32 ``[B]``.
    """
    embeds = token_embeddings(model, input_ids)
    if bool(((keep > 0) & (keep < 1)).any()):
        draws = torch.rand(embeds.shape, generator=generator, device=embeds.device)
        mask = draws < keep.to(embeds.device).unsqueeze(-1)
    else:
        mask = (keep > 0).to(embeds.device).unsqueeze(-1).expand_as(embeds)
    logits = logits_from_embeddings(model, embeds * mask, "on the masked input embeddings")[:, -1]
    return torch.softmax(logits, -1).gather(-1, target_ids.view(-1, 1).to(logits.device)).squeeze(-1).cpu()


class _Faithfulness(Metric):
    """Shared state and input checks; subclasses say which tokens survive and which score applies."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, model: LanguageModel, *, num_samples: int = 1, seed: int = 0, normalization: str = "max", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        check_model(model)
        self.num_samples = check_positive_int("num_samples", num_samples)
        # Kept outside nn.Module registration: the metric's state_dict must not carry the model's weights.
        self.__dict__["_model"] = model
        self._generator = torch.Generator().manual_seed(check_seed("seed", seed))
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("num_skipped", default=torch.tensor(0), dist_reduce_fx="sum")

    def _keep(self, importance: Tensor) -> Tensor:
        raise NotImplementedError

    def _score(self, full: Tensor, perturbed: Tensor, empty: Tensor) -> Tensor:
        raise NotImplementedError

    def scores(self, input_ids: Tensor, importance: Tensor, target_ids: Tensor | int | None = None) -> Tensor:
        """Per-example scores without touching the metric's state: float32 ``[B]``, NaN where unscaled.

        Arguments as for ``update``.
        """
        ids, scores = _batched(input_ids, importance)
        model = self.__dict__["_model"]
        check_model_token_ids(ids, model)
        with torch.no_grad(), evaluation_mode(model):
            ids = ids.to(model_device(model))
            full_logits = next_token_logits(model, ids)
            targets = _targets(target_ids, full_logits)
            full = torch.softmax(full_logits, -1).gather(-1, targets.view(-1, 1)).squeeze(-1).cpu()
            empty = masked_target_probability(model, ids, targets, torch.zeros_like(scores))
            keep = self._keep(scores)
            samples = self.num_samples if bool(((keep > 0) & (keep < 1)).any()) else 1
            perturbed = torch.stack(
                [masked_target_probability(model, ids, targets, keep, self._generator) for _ in range(samples)]
            ).mean(0)
        return self._score(full, perturbed, empty)

    def update(self, input_ids: Tensor, importance: Tensor, target_ids: Tensor | int | None = None) -> None:
        """Score attributions of next-token predictions and add them to the running mean.

        Args:
            input_ids: int64 ``[N]`` or ``[B, N]`` (rows of equal length, no padding).
            importance: float, same shape: one score per input token (any scale; higher = more important).
            target_ids: the predicted tokens ``[B]`` (or an int); default the model's own argmax.
        """
        values = self.scores(input_ids, importance, target_ids)
        valid = ~torch.isnan(values)
        self.total += values[valid].double().sum()
        self.count += int(valid.sum())
        self.num_skipped += int((~valid).sum())

    def compute(self) -> Tensor:
        """Mean score over the scored examples (NaN if none could be scored)."""
        if int(self.count) == 0:
            return torch.tensor(float("nan"))
        return (self.total / self.count).float()


class SoftSufficiency(_Faithfulness):
    """Soft normalised sufficiency (Soft-NS): keep each embedding element with the token's importance.

    Args:
        model: a causal LM taking ``input_ids`` and ``inputs_embeds=`` (any transformers causal LM).
        num_samples: random masks averaged per example (1 in the paper; more lowers the variance).
        seed: seed of the metric's own generator (results repeat exactly for a given seed).
        normalization: how scores become keep probabilities, ``"max"`` or ``"rank"`` (see
            ``keep_probabilities``; ``"rank"`` compares methods whose score scales differ fairly).

    ``update(input_ids, importance, target_ids=None)``; ``compute()`` gives the mean over examples.
    """

    def _keep(self, importance: Tensor) -> Tensor:
        return keep_probabilities(importance, self.normalization)

    def _score(self, full: Tensor, perturbed: Tensor, empty: Tensor) -> Tensor:
        return normalized_sufficiency(full, perturbed, empty)


class SoftComprehensiveness(_Faithfulness):
    """Soft normalised comprehensiveness (Soft-NC): keep each element with one minus the importance.

    Same arguments as ``SoftSufficiency``.
    """

    def _keep(self, importance: Tensor) -> Tensor:
        return 1 - keep_probabilities(importance, self.normalization)

    def _score(self, full: Tensor, perturbed: Tensor, empty: Tensor) -> Tensor:
        return normalized_comprehensiveness(full, perturbed, empty)


def soft_faithfulness(
    model: LanguageModel, input_ids: Tensor, importance: Tensor, target_id: int | None = None, **options
) -> dict[str, float]:
    """Soft-NS and Soft-NC of one explanation: ``{"soft_ns": ..., "soft_nc": ...}`` (NaN when unscaled).

    Args:
        model, ``options`` (``num_samples``, ``seed``, ``normalization``): as for ``SoftSufficiency``.
        input_ids: int64 ``[N]``. importance: float ``[N]``. target_id: the explained token (default
            the model's own prediction).
    """
    scores = {}
    for key, metric_class in (("soft_ns", SoftSufficiency), ("soft_nc", SoftComprehensiveness)):
        metric = metric_class(model, **options)
        metric.update(input_ids, importance, target_id)
        scores[key] = float(metric.compute())
    return scores


class _HardFaithfulness(_Faithfulness):
    def __init__(self, model: LanguageModel, *, top_k: int | None = None, ratio: float = 0.2, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.top_k = check_optional(check_positive_int, "top_k", top_k)
        self.ratio = check_float("ratio", ratio, low=0.0, low_open=True, high=1.0)

    def _rationale(self, importance: Tensor) -> Tensor:
        k = self.top_k or max(1, round(self.ratio * importance.shape[-1]))
        return top_k_mask(importance, min(k, importance.shape[-1])).float()


class Sufficiency(_HardFaithfulness):
    """Hard normalised sufficiency: keep only the top-k tokens (others' embeddings zeroed).

    Args:
        model: as for ``SoftSufficiency``.
        top_k: rationale size in tokens; default ``max(1, round(ratio * N))``.
        ratio: rationale size as a share of the input when ``top_k`` is None.
    """

    def _keep(self, importance: Tensor) -> Tensor:
        return self._rationale(importance)

    def _score(self, full: Tensor, perturbed: Tensor, empty: Tensor) -> Tensor:
        return normalized_sufficiency(full, perturbed, empty)


class Comprehensiveness(_HardFaithfulness):
    """Hard normalised comprehensiveness: zero the embeddings of the top-k tokens. Arguments as ``Sufficiency``."""

    def _keep(self, importance: Tensor) -> Tensor:
        return 1 - self._rationale(importance)

    def _score(self, full: Tensor, perturbed: Tensor, empty: Tensor) -> Tensor:
        return normalized_comprehensiveness(full, perturbed, empty)


def _batched(input_ids: Tensor, importance: Tensor) -> tuple[Tensor, Tensor]:
    if (
        not isinstance(input_ids, Tensor)
        or input_ids.is_floating_point()
        or input_ids.is_complex()
        or (input_ids.dtype == torch.bool)
    ):
        raise TypeError("input_ids must be an integer tensor of token ids")
    if not isinstance(importance, Tensor):
        raise TypeError(f"importance must be a tensor, got {type(importance).__name__}")
    ids = input_ids.long()
    scores = importance.detach().float().cpu()
    if ids.dim() == 1:
        ids, scores = ids[None], scores.reshape(1, -1)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [N] or [B, N] with N >= 1, got shape {tuple(input_ids.shape)}")
    if scores.shape != ids.shape:
        raise ValueError(
            f"importance must have one score per input token: shape {tuple(ids.shape)}, got {tuple(importance.shape)}"
        )
    check_finite_tensor("importance", scores)
    return ids, scores


def _targets(target_ids: Tensor | int | None, logits: Tensor) -> Tensor:
    batch, vocab = logits.shape
    if target_ids is None:
        return logits.argmax(-1)
    if isinstance(target_ids, Tensor):
        if target_ids.is_floating_point() or target_ids.is_complex() or target_ids.dtype == torch.bool:
            raise TypeError(f"target_ids must hold integer token ids, got dtype {target_ids.dtype}")
    else:
        for target in target_ids if isinstance(target_ids, (list, tuple)) else [target_ids]:
            check_int("target_ids", target)
    targets = torch.as_tensor(target_ids, dtype=torch.long, device=logits.device).reshape(-1)
    if targets.numel() == 1 and batch > 1:
        targets = targets.expand(batch)
    if targets.numel() != batch:
        raise ValueError(f"target_ids must hold one id per sequence ({batch}), got {targets.numel()}")
    if bool((targets < 0).any()) or bool((targets >= vocab).any()):
        raise ValueError(f"target_ids must be in [0, {vocab}), got {targets.tolist()}")
    return targets
