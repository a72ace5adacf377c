"""Lightning layer of BGPO: the RL LightningModule and the supervised warm-up LightningModule.

The numerics (losses, Monte Carlo draws, gradient accumulation) live in
:mod:`lightning_bpfree.bgpo.losses`; this file only wires them into Lightning's manual optimisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_bpfree.bgpo.losses import (
    OBJECTIVES,
    accumulate_policy_gradient,
    check_clip,
    group_relative_advantages,
    prepare_policy_batch,
    sft_loss,
)
from lightning_bpfree.bgpo.masked_lm import MaskedDiffusionLM
from lightning_bpfree.validation import (
    check_choice,
    check_int,
    check_nonnegative_float,
    check_optional,
    check_positive_float,
    check_positive_int,
    check_probability,
    check_token_ids,
)

RewardFn = Callable[[Tensor, Tensor], Tensor]


def _prompts_of(batch: Any) -> Tensor:
    prompts = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(prompts, Tensor) or prompts.dim() != 2:
        raise TypeError("BGPO expects batches of prompt ids: a (num_prompts, prompt_length) tensor or a 1-tuple of it")
    return prompts


class BGPO(L.LightningModule):
    """GRPO-style RL of a masked-diffusion LM with BGPO's constant-memory ELBO-ratio objective.

    Each ``training_step`` takes a batch of prompts, samples ``group_size`` responses per prompt
    with the low-confidence remasking sampler, scores them with ``reward_fn``, turns the rewards
    into group-relative advantages, fixes ``num_mc_samples`` stratified mask draws and evaluates the
    rollout policy on them, then makes ``updates_per_batch`` optimizer steps. With
    ``objective="bgpo"`` each step runs one forward and one backward per Monte Carlo draw
    (``manual_backward`` of that draw's loss over ``n_t``) before a single ``optimizer.step()``, so
    peak memory does not grow with ``num_mc_samples``.

    Args:
        policy: the :class:`~lightning_bpfree.bgpo.masked_lm.MaskedDiffusionLM` to train.
        reward_fn: ``reward_fn(prompts (N, P), responses (N, R)) -> (N,)`` float rewards.
        response_length: tokens per response ``R``.
        group_size: rollouts per prompt (>= 2); the paper's recipe uses 8.
        num_mc_samples: Monte Carlo mask draws ``n_t`` per ELBO (the paper uses 16).
        objective: "bgpo", "naive" (exact ELBO ratio, all draws' graphs kept) or "diffu-grpo"
            (d1's one-step per-token estimate, ``num_mc_samples`` unused).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        clip_eps: PPO clip range (None disables clipping).
        dual_clip: dual-clip constant for negative advantages (None disables it).
        updates_per_batch: optimizer steps on each batch of rollouts (PPO epochs); clipping only
            matters when this is > 1. Lightning's ``global_step`` (and ``max_steps``) counts
            optimizer steps, so one batch advances it by ``updates_per_batch``.
        max_grad_norm: gradient-norm clip before each step, or None.
        sampling_steps: denoising steps of the sampler (default ``response_length``).
        temperature: sampling temperature of the rollouts.
        suppress_token_ids: tokens the sampler never produces (the mask token is always suppressed).
        prompt_mask_prob: d1's prompt masking probability (``diffu-grpo`` only).

    Logged: ``train/reward`` (mean reward of the rollouts), ``train/loss``, ``train/clip_fraction``,
    ``train/log_ratio`` and ``train/skipped_steps``; every step's figures are also appended to
    :attr:`history`.

    Non-finite rewards: a batch with a NaN or infinite reward (or advantage) is skipped: no weight
    or optimizer state changes, its optimizer steps still count in ``global_step``, and
    :attr:`skipped_steps` (the number of skipped batches, logged as ``train/skipped_steps``) grows by one.
    """

    def __init__(
        self,
        policy: MaskedDiffusionLM,
        reward_fn: RewardFn,
        response_length: int,
        group_size: int = 8,
        num_mc_samples: int = 16,
        objective: str = "bgpo",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        clip_eps: float | None = 0.2,
        dual_clip: float | None = 3.0,
        updates_per_batch: int = 1,
        max_grad_norm: float | None = 1.0,
        sampling_steps: int | None = None,
        temperature: float = 1.0,
        suppress_token_ids: Sequence[int] = (),
        prompt_mask_prob: float = 0.15,
    ) -> None:
        super().__init__()
        if not isinstance(policy, MaskedDiffusionLM):
            raise TypeError(f"policy must be a MaskedDiffusionLM, got {type(policy).__name__}")
        if not callable(reward_fn):
            raise TypeError("reward_fn must be callable: reward_fn(prompts, responses) -> rewards")
        check_choice("objective", objective, OBJECTIVES)
        check_positive_int("response_length", response_length)
        check_int("group_size", group_size, low=2)
        check_positive_int("num_mc_samples", num_mc_samples)
        check_positive_int("updates_per_batch", updates_per_batch)
        check_clip(clip_eps, dual_clip)
        check_positive_float("lr", lr)
        check_nonnegative_float("weight_decay", weight_decay)
        check_optional(check_positive_float, "max_grad_norm", max_grad_norm)
        check_optional(check_int, "sampling_steps", sampling_steps, low=1, high=response_length)
        check_nonnegative_float("temperature", temperature)
        check_probability("prompt_mask_prob", prompt_mask_prob, include_one=False)
        suppress_token_ids = check_token_ids("suppress_token_ids", suppress_token_ids, policy.vocab_size)
        self.automatic_optimization = False
        self.policy = policy
        self.reward_fn = reward_fn
        self.response_length = response_length
        self.group_size = group_size
        self.num_mc_samples = num_mc_samples
        self.objective = objective
        self.lr, self.weight_decay = lr, weight_decay
        self.clip_eps, self.dual_clip = clip_eps, dual_clip
        self.updates_per_batch = updates_per_batch
        self.max_grad_norm = max_grad_norm
        self.sampling_steps = sampling_steps
        self.temperature = temperature
        self.suppress_token_ids = tuple(suppress_token_ids)
        self.prompt_mask_prob = prompt_mask_prob
        self.history: list[dict[str, float]] = []
        self.skipped_steps = 0  # batches whose rewards or advantages were not finite (no weight moved)

    @torch.no_grad()
    def rollout(self, prompts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``group_size`` sampled responses per prompt: (input_ids, response_mask, rewards), prompts repeated."""
        repeated = prompts.repeat_interleave(self.group_size, dim=0)
        responses = self.policy.generate(
            repeated,
            self.response_length,
            steps=self.sampling_steps,
            temperature=self.temperature,
            suppress_token_ids=self.suppress_token_ids,
        )
        rewards = torch.as_tensor(self.reward_fn(repeated, responses), dtype=torch.float32, device=prompts.device)
        input_ids = torch.cat([repeated, responses], dim=1)
        response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        response_mask[:, prompts.shape[1] :] = True
        return input_ids, response_mask, rewards

    def training_step(self, batch: Any, batch_idx: int) -> None:
        prompts = _prompts_of(batch)
        input_ids, response_mask, rewards = self.rollout(prompts)
        advantages = group_relative_advantages(rewards, self.group_size)
        optimizer = self.optimizers()
        if not bool(torch.isfinite(rewards).all() & torch.isfinite(advantages).all()):
            self._skip_batch(optimizer, rewards, prompts.shape[0])
            return
        policy_batch = prepare_policy_batch(
            self.policy,
            input_ids,
            response_mask,
            advantages,
            objective=self.objective,
            num_mc_samples=self.num_mc_samples,
            prompt_mask_prob=self.prompt_mask_prob,
        )
        for _ in range(self.updates_per_batch):
            optimizer.zero_grad()
            stats = accumulate_policy_gradient(
                self.policy, policy_batch, self.clip_eps, self.dual_clip, backward=self.manual_backward
            )
            if self.max_grad_norm is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
        figures = {"reward": rewards.mean().item(), **stats}
        self.history.append({"step": float(self.global_step), **figures, "skipped_steps": float(self.skipped_steps)})
        self.log("train/reward", figures["reward"], prog_bar=True, batch_size=prompts.shape[0])
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=prompts.shape[0])
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=prompts.shape[0])

    def _skip_batch(self, optimizer: Any, rewards: Tensor, num_prompts: int) -> None:
        """A batch with a NaN or infinite reward (or advantage) moves no weight, but its steps still count.

        One NaN reward would make every advantage of its group NaN and, through the loss, every weight
        NaN after one step. The optimizer is stepped with no gradient at all (AdamW skips a parameter
        whose ``.grad`` is None: weights and optimizer state stay bitwise unchanged), so ``global_step``
        advances as for any batch and ``max_steps`` still ends the run.
        """
        self.skipped_steps += 1
        for _ in range(self.updates_per_batch):
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()
        finite = rewards[torch.isfinite(rewards)]
        reward = finite.mean().item() if finite.numel() else float("nan")
        self.history.append(
            {"step": float(self.global_step), "reward": reward, "skipped_steps": float(self.skipped_steps)}
        )
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=num_prompts)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.policy.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class MaskedDiffusionSFT(L.LightningModule):
    """Supervised warm-up of a masked-diffusion LM: minimise the negative ELBO of the given responses.

    The loss is :func:`~lightning_bpfree.bgpo.losses.sft_loss`: ``k ~ U{1..L}`` of each sequence's
    ``L`` response tokens masked, the masked cross-entropy weighted by ``1 / p_mask``. Batches are ``(input_ids (B, T), response_mask (B, T) bool)``.
    Logs ``train/loss``.
    """

    def __init__(self, policy: MaskedDiffusionLM, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        if not isinstance(policy, MaskedDiffusionLM):
            raise TypeError(f"policy must be a MaskedDiffusionLM, got {type(policy).__name__}")
        check_positive_float("lr", lr)
        check_nonnegative_float("weight_decay", weight_decay)
        self.policy = policy
        self.lr, self.weight_decay = lr, weight_decay

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        input_ids, response_mask = batch
        loss = sft_loss(self.policy, input_ids, response_mask)
        self.log("train/loss", loss, prog_bar=True, batch_size=input_ids.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.policy.parameters(), lr=self.lr, weight_decay=self.weight_decay)
