"""BGPO: boundary-guided policy optimisation for masked-diffusion LMs, with constant memory in n_t.

GRPO-style RL for a diffusion LM needs ``log pi(y|x)``, which is replaced by the ELBO estimated with
``n_t`` Monte Carlo mask draws, ``B = (1/n_t) sum_j l_j``. The exact objective ``A * exp(B - B_old)``
is non-linear in the ``l_j``, so every draw's graph must stay alive until one backward (memory
grows with ``n_t``). BGPO (Lin et al., arXiv 2510.11683) maximises a lower bound that is a *sum of
one-draw terms*, with ``delta_j = l_j - l_j_old``:

- ``A > 0``: tangent line, ``A * exp(mean delta) >= A * mean_j (1 + delta_j)``;
- ``A <= 0``: Jensen, ``A * exp(mean delta) >= A * mean_j exp(delta_j)``;

so each draw can be forwarded and back-propagated on its own and the gradients accumulated. At
``theta = theta_old`` the bound equals the exact objective in value and gradient. PPO clipping and
dual clipping are applied to the per-draw ratio.

This module holds the numerics as plain PyTorch (no Lightning import):

- :func:`bgpo_loss`, and the baselines :func:`elbo_ratio_loss` (exact/naive ELBO ratio) and
  :func:`diffu_grpo_loss` (d1's one-step per-token estimate);
- :func:`stratified_mask_counts` (evenly spread mask ratios, VRPO-style variance reduction) and
  :func:`group_relative_advantages`;
- :func:`prepare_policy_batch` / :func:`accumulate_policy_gradient`: one policy-gradient
  accumulation for any of the three objectives, shared by the ``BGPO`` LightningModule (in
  :mod:`lightning_bpfree.bgpo.module`) and the benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_bpfree.bgpo.masked_lm import MaskedDiffusionLM
from lightning_bpfree.validation import (
    check_choice,
    check_float,
    check_int,
    check_optional,
    check_positive_int,
    check_probability,
)

OBJECTIVES = ("bgpo", "naive", "diffu-grpo")

# exp() of the A <= 0 branch is evaluated on delta clamped here (no dual clip): beyond it the loss
# would overflow float32 for any sizeable advantage, and 0 * inf in the backward gives NaN.
_MAX_LOG_RATIO = 60.0


def check_clip(clip_eps: float | None, dual_clip: float | None) -> tuple[float | None, float | None]:
    """Validate PPO's clip range (in (0, 1), or None: no clipping) and the dual-clip constant (> 1,
    ``inf`` allowed, or None: no dual clip); return both as floats (None kept)."""
    clip_eps = check_optional(check_float, "clip_eps", clip_eps, low=0.0, high=1.0, low_open=True, high_open=True)
    dual_clip = check_optional(check_float, "dual_clip", dual_clip, low=1.0, low_open=True, allow_inf=True)
    return clip_eps, dual_clip


def _log_ratio_cap(dual_clip: float | None) -> float:
    # with a dual clip, any log-ratio above log(c) gives the same capped loss and zero gradient, so
    # clamping there changes nothing but keeps exp() finite
    return math.log(dual_clip) + 1.0 if dual_clip is not None else _MAX_LOG_RATIO


def _clipped_policy_terms(
    ratio: Tensor, advantages: Tensor, clip_eps: float | None, dual_clip: float | None
) -> tuple[Tensor, Tensor]:
    """PPO's per-element loss ``-A * ratio`` with clip and dual clip; also which elements were clipped."""
    loss = -advantages * ratio
    clipped = torch.zeros_like(loss, dtype=torch.bool)
    if clip_eps is not None:
        loss_clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
        clipped = loss_clipped > loss
        loss = torch.maximum(loss, loss_clipped)
    if dual_clip is not None:
        # only for negative advantages: cap the loss at -A * c so a huge ratio cannot dominate
        cap = -advantages * dual_clip
        dual = (advantages < 0) & (loss > cap)
        clipped = clipped | dual
        loss = torch.where(dual, cap, loss)
    return loss, clipped


def _check_pair(elbo_new: Tensor, elbo_old: Tensor, advantages: Tensor) -> None:
    for name, value in (("elbo_new", elbo_new), ("elbo_old", elbo_old), ("advantages", advantages)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if elbo_new.shape != elbo_old.shape:
        raise ValueError(
            f"elbo_new and elbo_old must have the same shape, got {tuple(elbo_new.shape)} and {tuple(elbo_old.shape)}"
        )
    if elbo_new.dim() not in (1, 2) or advantages.dim() != 1 or elbo_new.shape[-1] != advantages.shape[0]:
        raise ValueError(
            "expected elbo_new/elbo_old of shape (batch,) or (num_mc_samples, batch) and advantages of shape "
            f"(batch,); got {tuple(elbo_new.shape)} and {tuple(advantages.shape)}"
        )


def bgpo_surrogate_terms(
    elbo_new: Tensor,
    elbo_old: Tensor,
    advantages: Tensor,
    clip_eps: float | None = 0.2,
    dual_clip: float | None = 3.0,
) -> tuple[Tensor, Tensor]:
    """Per-element BGPO losses and clipped flags, both of the shape of ``elbo_new``."""
    check_clip(clip_eps, dual_clip)
    _check_pair(elbo_new, elbo_old, advantages)
    advantages = advantages.to(elbo_new.dtype).expand_as(elbo_new)
    delta = elbo_new - elbo_old.detach()
    positive = advantages > 0
    # each branch only sees its own deltas, so neither 1 + delta <= 0 nor exp overflow in the branch
    # that is not selected can leak NaN/inf into the gradient through torch.where
    delta_linear = torch.where(positive, delta, torch.zeros_like(delta))
    delta_exp = torch.where(positive, torch.zeros_like(delta), delta).clamp(max=_log_ratio_cap(dual_clip))
    ratio = torch.where(positive, 1.0 + delta_linear, torch.exp(delta_exp))
    return _clipped_policy_terms(ratio, advantages, clip_eps, dual_clip)


def bgpo_loss(
    elbo_new: Tensor,
    elbo_old: Tensor,
    advantages: Tensor,
    clip_eps: float | None = 0.2,
    dual_clip: float | None = 3.0,
) -> Tensor:
    """BGPO's surrogate policy loss (to minimise), averaged over all Monte Carlo samples given.

    Per sample ``j`` and sequence ``b``, with ``delta = elbo_new - elbo_old``, the ratio is
    ``1 + delta`` where ``advantages[b] > 0`` (tangent-line bound) and ``exp(delta)`` elsewhere
    (Jensen bound); the loss is PPO's ``-A * ratio`` with the ratio clipped to
    ``[1 - clip_eps, 1 + clip_eps]`` and, for negative advantages, capped at ``-A * dual_clip``.

    Because the result is a plain mean of per-sample terms,
    ``sum_j bgpo_loss(elbo_new[j], elbo_old[j], A) / n_t == bgpo_loss(elbo_new, elbo_old, A)``
    in value and gradient: back-propagate each Monte Carlo sample's loss divided by ``n_t`` as soon
    as it is computed and only one sample's graph is ever alive.

    Args:
        elbo_new: (n_t, batch) or (batch,) ELBO terms under the current weights (differentiable).
        elbo_old: same shape, the same mask draws under the rollout weights (detached here).
        advantages: (batch,) per-sequence advantages.
        clip_eps: PPO clip range, in (0, 1), or None for no clipping.
        dual_clip: dual-clip constant ``c > 1`` for negative advantages, or None.

    Returns:
        A scalar tensor.
    """
    losses, _ = bgpo_surrogate_terms(elbo_new, elbo_old, advantages, clip_eps, dual_clip)
    return losses.mean()


def elbo_ratio_loss(
    elbo_new: Tensor,
    elbo_old: Tensor,
    advantages: Tensor,
    clip_eps: float | None = 0.2,
    dual_clip: float | None = 3.0,
) -> Tensor:
    """The exact ELBO-ratio policy loss (the naive baseline): ratio ``exp(mean_j elbo_new - mean_j elbo_old)``.

    Same arguments and clipping as :func:`bgpo_loss`, but the Monte Carlo mean sits inside the
    exponential, so the loss couples all ``n_t`` samples and their graphs must all be kept until
    the backward. Without clipping, ``bgpo_loss >= elbo_ratio_loss`` (the surrogate objective is a
    lower bound), with equality in value and gradient where ``elbo_new == elbo_old``.
    """
    losses, _ = _elbo_ratio_terms(elbo_new, elbo_old, advantages, clip_eps, dual_clip)
    return losses.mean()


def _elbo_ratio_terms(
    elbo_new: Tensor, elbo_old: Tensor, advantages: Tensor, clip_eps: float | None, dual_clip: float | None
) -> tuple[Tensor, Tensor]:
    check_clip(clip_eps, dual_clip)
    _check_pair(elbo_new, elbo_old, advantages)
    if elbo_new.dim() == 1:
        elbo_new, elbo_old = elbo_new[None], elbo_old[None]
    log_ratio = (elbo_new - elbo_old.detach()).mean(dim=0)
    ratio = torch.exp(log_ratio.clamp(max=_log_ratio_cap(dual_clip)))
    return _clipped_policy_terms(ratio, advantages.to(ratio.dtype), clip_eps, dual_clip)


def diffu_grpo_loss(
    logprobs_new: Tensor,
    logprobs_old: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_eps: float | None = 0.2,
    dual_clip: float | None = 3.0,
) -> Tensor:
    """d1's diffu-GRPO loss: per-token ratios of one-step log-probabilities, clipped, token-averaged.

    Args:
        logprobs_new: (batch, length) per-token log-probabilities from
            :meth:`MaskedDiffusionLM.token_logprobs` under the current weights.
        logprobs_old: the same under the rollout weights (detached here).
        advantages: (batch,) per-sequence advantages, shared by the sequence's tokens.
        response_mask: (batch, length) bool, the tokens that count.
    """
    check_clip(clip_eps, dual_clip)
    for name, value in (("logprobs_new", logprobs_new), ("logprobs_old", logprobs_old), ("advantages", advantages)):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(value).__name__}")
    if not isinstance(response_mask, Tensor) or response_mask.dtype != torch.bool:
        raise TypeError(
            f"response_mask must be a bool torch.Tensor, got {getattr(response_mask, 'dtype', response_mask)}"
        )
    if logprobs_new.shape != logprobs_old.shape or logprobs_new.shape != response_mask.shape:
        raise ValueError("logprobs_new, logprobs_old and response_mask must have the same (batch, length) shape")
    if advantages.shape != logprobs_new.shape[:1]:
        raise ValueError(f"advantages must have shape ({logprobs_new.shape[0]},), got {tuple(advantages.shape)}")
    log_ratio = (logprobs_new - logprobs_old.detach()).masked_fill(~response_mask, 0.0)
    ratio = torch.exp(log_ratio.clamp(max=_log_ratio_cap(dual_clip)))
    losses, _ = _clipped_policy_terms(ratio, advantages[:, None].to(ratio.dtype), clip_eps, dual_clip)
    per_sequence = (losses * response_mask).sum(dim=1) / response_mask.sum(dim=1).clamp(min=1)
    return per_sequence.mean()


def stratified_mask_counts(num_samples: int, lengths: Tensor | int, generator: torch.Generator | None = None) -> Tensor:
    """Stratified numbers of masked tokens for ``num_samples`` Monte Carlo draws, shape (num_samples, batch).

    For a response of length ``L`` a random offset ``k ~ U{1..L}`` is drawn and the counts are
    ``round(k + i * L / n) mod L + 1`` for ``i = 0..n-1``: every count is uniform on ``{1..L}`` (so
    the ELBO estimate stays unbiased) while the ``n`` draws cover the masking ratios ``count / L``
    evenly instead of clumping. With ``n = L`` the counts are a permutation of ``1..L``.

    Args:
        num_samples: ``n_t`` >= 1.
        lengths: (batch,) response lengths >= 1, or one int for a batch of one.
    """
    check_positive_int("num_samples", num_samples)
    lengths = torch.as_tensor(lengths).long().reshape(-1)
    if bool((lengths < 1).any()):
        raise ValueError("every response length must be >= 1")
    offsets = (torch.rand(lengths.shape, generator=generator, device=lengths.device) * lengths).long() + 1
    steps = torch.arange(num_samples, device=lengths.device, dtype=torch.float64)[:, None]
    spread = torch.round(offsets[None].double() + steps * lengths[None].double() / num_samples).long()
    return spread % lengths[None] + 1


def group_relative_advantages(
    rewards: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO advantages: each reward minus its group's mean, divided by the group's std (+ ``eps``).

    Args:
        rewards: (num_prompts * group_size,) rewards, the rollouts of one prompt contiguous.
        group_size: rollouts per prompt, >= 2.
        normalize_std: divide by the group's (unbiased) standard deviation.

    Returns:
        (num_prompts * group_size,) advantages; 0 for every member of a group with equal rewards.
    """
    check_int("group_size", group_size, low=2)
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size={group_size}, got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def sft_loss(policy: MaskedDiffusionLM, input_ids: Tensor, response_mask: Tensor) -> Tensor:
    """Supervised loss of a masked-diffusion LM: the negative ELBO of the responses, averaged over the batch.

    Each sequence gets ``k ~ U{1..L}`` of its ``L`` response tokens masked (the discrete form of
    LLaDA's ``t ~ U(0, 1)``, one stratified draw) and the loss is ``-elbo``, the masked cross-entropy
    weighted by ``1 / p_mask``. ``input_ids`` (B, T) token ids, ``response_mask`` (B, T) bool.
    Returns a scalar tensor.
    """
    counts = stratified_mask_counts(1, response_mask.sum(dim=1))[0].to(input_ids.device)
    masked = policy.forward_mask(input_ids, response_mask, counts)
    return -policy.elbo(input_ids, response_mask, masked).mean()


@dataclass
class PolicyBatch:
    """Rollouts ready for a policy update, with the Monte Carlo draws fixed and the old values computed.

    ``masked`` (n_t, B, T) bool and ``old_values`` (n_t, B) for the ELBO objectives; for
    ``diffu-grpo`` ``masked`` holds the prompt positions masked for the one-step estimate (1, B, T)
    and ``old_values`` the (1, B, T) old token log-probabilities.
    """

    objective: str
    input_ids: Tensor
    response_mask: Tensor
    advantages: Tensor
    masked: Tensor
    old_values: Tensor

    @property
    def num_mc_samples(self) -> int:
        return self.masked.shape[0]


@torch.no_grad()
def prepare_policy_batch(
    policy: MaskedDiffusionLM,
    input_ids: Tensor,
    response_mask: Tensor,
    advantages: Tensor,
    objective: str = "bgpo",
    num_mc_samples: int = 16,
    prompt_mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> PolicyBatch:
    """Draw the Monte Carlo masks once and evaluate the old policy on them (one draw at a time).

    The same draws are reused by every update on these rollouts so that ``delta = l_new - l_old``
    compares like with like (0 at ``theta = theta_old``). ``prompt_mask_prob`` is only used by
    ``diffu-grpo`` (d1's random prompt masking).
    """
    check_choice("objective", objective, OBJECTIVES)
    if advantages.shape != input_ids.shape[:1]:
        raise ValueError(f"advantages must have shape ({input_ids.shape[0]},), got {tuple(advantages.shape)}")
    if objective == "diffu-grpo":
        check_probability("prompt_mask_prob", prompt_mask_prob, include_one=False)
        prompt_masked = (
            torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < prompt_mask_prob
        ) & ~response_mask
        old = policy.token_logprobs(input_ids, response_mask, prompt_masked)
        return PolicyBatch(objective, input_ids, response_mask, advantages, prompt_masked[None], old[None])
    counts = stratified_mask_counts(num_mc_samples, response_mask.sum(dim=1), generator).to(input_ids.device)
    masked = torch.stack([policy.forward_mask(input_ids, response_mask, c, generator) for c in counts])
    old = torch.stack([policy.elbo(input_ids, response_mask, m) for m in masked])
    return PolicyBatch(objective, input_ids, response_mask, advantages, masked, old)


def accumulate_policy_gradient(
    policy: MaskedDiffusionLM,
    batch: PolicyBatch,
    clip_eps: float | None = 0.2,
    dual_clip: float | None = 3.0,
    backward: Callable[[Tensor], Any] | None = None,
) -> dict[str, float]:
    """Accumulate the policy-gradient of ``batch.objective`` into the policy's ``.grad`` (no optimizer step).

    - ``bgpo``: for each Monte Carlo draw, one forward, :func:`bgpo_loss` divided by ``n_t``, one
      backward: peak memory is that of a single draw, whatever ``n_t``.
    - ``naive``: all ``n_t`` forwards, :func:`elbo_ratio_loss`, one backward: memory grows with ``n_t``.
    - ``diffu-grpo``: one forward with the whole response masked, :func:`diffu_grpo_loss`.

    ``backward`` runs the backward of a loss (default ``loss.backward()``; the LightningModule passes
    ``manual_backward``). Returns the loss, the fraction of clipped terms and the mean log-ratio.
    """
    check_choice("objective", batch.objective, OBJECTIVES)
    backward = backward or (lambda loss: loss.backward())
    ids, response, advantages = batch.input_ids, batch.response_mask, batch.advantages
    if batch.objective == "diffu-grpo":
        new = policy.token_logprobs(ids, response, batch.masked[0])
        loss = diffu_grpo_loss(new, batch.old_values[0], advantages, response, clip_eps, dual_clip)
        backward(loss)
        log_ratio = ((new.detach() - batch.old_values[0]) * response).sum() / response.sum()
        return {"loss": loss.item(), "clip_fraction": float("nan"), "log_ratio": log_ratio.item()}
    n_t = batch.num_mc_samples
    if batch.objective == "naive":
        new = torch.stack([policy.elbo(ids, response, m) for m in batch.masked])
        losses, clipped = _elbo_ratio_terms(new, batch.old_values, advantages, clip_eps, dual_clip)
        loss = losses.mean()
        backward(loss)
        log_ratio = (new.detach() - batch.old_values).mean()
        return {"loss": loss.item(), "clip_fraction": clipped.float().mean().item(), "log_ratio": log_ratio.item()}
    total_loss = total_clipped = total_log_ratio = 0.0
    for masked, old in zip(batch.masked, batch.old_values, strict=True):
        new = policy.elbo(ids, response, masked)
        losses, clipped = bgpo_surrogate_terms(new, old, advantages, clip_eps, dual_clip)
        loss = losses.mean() / n_t
        backward(loss)
        total_loss += loss.item()
        total_clipped += clipped.float().mean().item() / n_t
        total_log_ratio += (new.detach() - old).mean().item() / n_t
    return {"loss": total_loss, "clip_fraction": total_clipped, "log_ratio": total_log_ratio}
