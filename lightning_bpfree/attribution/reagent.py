"""ReAGent: recursive, forward-only token attribution for a causal LM's next-token prediction.

Zhao & Shan (2024). The importance of each input token is learned from random replacement probes:

1. ``p = p(y | x)`` for the explained token ``y``; every probe starts with logit scores ``s ~ U(0, 1)``.
2. Each step, each probe replaces every token with probability ``replacing_ratio`` by a sampled
   token, measures ``delta = p - p(y | x_replaced)`` and adds ``logit(0.5 + 0.5 * delta)`` to the
   replaced tokens' scores and ``logit(0.5 - 0.5 * delta)`` to the others': tokens whose
   replacement hurts the prediction gain, the rest lose. The importance is ``softmax(s)``.
3. A probe stops when keeping only its ``keep_top_n`` most important tokens (replacing all others)
   leaves ``y`` among the model's ``stopping_top_k`` predictions.
4. The answer is the mean importance over probes that stopped (all probes if none did in
   ``max_probe_steps`` steps, with a warning).

Only forward passes run, in batches of the probes still active, so any model that maps token ids to
logits can be explained: zeroth-order-trained, FP4-quantised or black-box.

``ReAGentCallback`` (the Lightning layer) lives in ``lightning_bpfree.attribution.callback``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_bpfree.attribution.model_interface import (
    LanguageModel,
    as_token_sequence,
    check_model,
    evaluation_mode,
    model_device,
    next_token_logits,
)
from lightning_bpfree.attribution.samplers import TokenSampler, resolve_sampler
from lightning_bpfree.validation import (
    check_bool,
    check_float,
    check_generator,
    check_int,
    check_optional,
    check_positive_int,
)

# delta = +-1 would give an infinite logit; real probabilities never get that close.
_LOGIT_CLAMP = 1e-6


@dataclass
class ReAGentResult:
    """What ``reagent_attribution(..., return_details=True)`` returns.

    Attributes:
        importance: float32 ``[N]``, sums to 1.
        target_id: the explained token.
        target_prob: ``p(target | input)`` on the unperturbed input.
        probe_steps: int64 ``[num_probes]``: update steps each probe ran.
        converged: bool ``[num_probes]``: which probes met the stopping condition.
        forward_passes: sequences the model was run on (probes x steps, both phases, plus one).
    """

    importance: Tensor
    target_id: int
    target_prob: float
    probe_steps: Tensor
    converged: Tensor
    forward_passes: int


@dataclass(frozen=True)
class _Probing:
    """The probe settings of one ``reagent_attribution`` call, checked against the input length ``N``."""

    length: int
    replacing_ratio: float
    max_probe_steps: int
    num_probes: int
    keep_top_n: int
    stopping_top_k: int

    def __post_init__(self) -> None:
        check_float("replacing_ratio", self.replacing_ratio, low=0.0, high=1.0, low_open=True, high_open=True)
        check_positive_int("max_probe_steps", self.max_probe_steps)
        check_positive_int("num_probes", self.num_probes)
        check_positive_int("stopping_top_k", self.stopping_top_k)
        if check_positive_int("keep_top_n", self.keep_top_n) >= self.length:
            raise ValueError(
                f"keep_top_n must be an int in [1, N) with N={self.length} input tokens, got {self.keep_top_n!r} "
                "(the stopping test keeps that many tokens and replaces the rest)"
            )


def reagent_attribution(
    model: LanguageModel,
    input_ids: Tensor,
    target_id: int | None = None,
    *,
    replacing_ratio: float = 0.3,
    max_probe_steps: int = 3000,
    num_probes: int = 16,
    keep_top_n: int = 5,
    stopping_top_k: int = 3,
    sampler: Any = "uniform",
    generator: torch.Generator | None = None,
    exclude_ids: Sequence[int] = (),
    return_details: bool = False,
) -> Tensor | ReAGentResult:
    """Importance of each input token for the next-token prediction, from forward passes only.

    Args:
        model: a callable mapping ``input_ids`` int64 ``[B, N]`` to logits ``[B, N, V]`` (or an
            output with ``.logits``), e.g. any transformers causal LM.
        input_ids: the context, int64 ``[N]`` or ``[1, N]``.
        target_id: the token to explain; default the model's own most likely next token.
        replacing_ratio: probability that a probe replaces each token at a step.
        max_probe_steps: update steps before giving up on probes that have not stopped.
        num_probes: independent probes run in one batch and averaged.
        keep_top_n: tokens kept by the stopping test (must be below N).
        stopping_top_k: a probe stops when the target is among this many top predictions.
        sampler: ``"uniform"`` or a sampler object (see ``lightning_bpfree.attribution.samplers``).
        generator: a CPU ``torch.Generator``; with it the result repeats exactly.
        exclude_ids: token ids the ``"uniform"`` sampler never proposes (special tokens).
        return_details: return a ``ReAGentResult`` instead of the importance tensor.

    Returns:
        float32 ``[N]`` importances summing to 1 (or a ``ReAGentResult``).
    """
    check_model(model)
    sequence = as_token_sequence(input_ids, model=model)
    probing = _Probing(sequence.numel(), replacing_ratio, max_probe_steps, num_probes, keep_top_n, stopping_top_k)
    check_optional(check_int, "target_id", target_id, low=0)
    check_generator("generator", generator)
    check_bool("return_details", return_details)
    device = model_device(model)
    sequence = sequence.to(device)
    with torch.no_grad(), evaluation_mode(model):
        logits = next_token_logits(model, sequence[None], "on the unperturbed input")[0]
        vocab = logits.shape[-1]
        if target_id is None:
            target = int(logits.argmax())
        else:
            target = check_int("target_id", target_id, low=0, high=vocab - 1)
        target_prob = float(torch.softmax(logits, -1)[target])
        draw = _checked_draws(resolve_sampler(sampler, vocab, exclude_ids), vocab)
        result = _run_probes(model, sequence, target, target_prob, draw, generator, probing)
    return result if return_details else result.importance


def _checked_draws(draw: TokenSampler, vocab: int) -> TokenSampler:
    """``draw`` whose replacements are checked: int ``[B, N]`` like the probes, ids in ``[0, vocab)``."""

    def checked(probes: Tensor, mask: Tensor, generator: torch.Generator | None) -> Tensor:
        drawn = draw(probes, mask, generator)
        if not isinstance(drawn, Tensor) or drawn.is_floating_point() or drawn.shape != probes.shape:
            raise ValueError(
                f"sampler must return integer token ids of shape {tuple(probes.shape)}, got "
                f"{tuple(drawn.shape) if isinstance(drawn, Tensor) else type(drawn).__name__}"
            )
        used = drawn[mask]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= vocab):
            raise ValueError(f"sampler returned token ids outside the model's vocabulary [0, {vocab})")
        return drawn.long()

    return checked


def _target_prob(model, batch: Tensor, target: int, step: int) -> Tensor:
    logits = next_token_logits(model, batch, f"on the perturbed inputs of probe step {step}")
    return torch.softmax(logits, -1)[:, target].cpu()


def _run_probes(
    model, sequence: Tensor, target: int, target_prob: float, draw, generator: torch.Generator | None, probing: _Probing
) -> ReAGentResult:
    length, num_probes = probing.length, probing.num_probes
    scores = torch.rand(num_probes, length, generator=generator)
    active = torch.ones(num_probes, dtype=torch.bool)
    steps = torch.zeros(num_probes, dtype=torch.long)
    forward_passes = 1
    for step in range(probing.max_probe_steps):
        rows = active.nonzero().squeeze(1)
        probes = sequence.expand(rows.numel(), length)
        # Update: random replacements; the prediction's drop says which replaced tokens mattered.
        replace = torch.rand(rows.numel(), length, generator=generator) < probing.replacing_ratio
        replacements = draw(probes, replace.to(probes.device), generator)
        perturbed = torch.where(replace.to(probes.device), replacements, probes)
        delta = target_prob - _target_prob(model, perturbed, target, step)
        signed = torch.where(replace, delta[:, None], -delta[:, None])
        scores[rows] += torch.logit((0.5 * signed + 0.5).clamp(_LOGIT_CLAMP, 1 - _LOGIT_CLAMP))
        steps[rows] += 1
        # Stop test: keep each probe's current top tokens, replace the rest, is the target still near the top?
        keep = torch.zeros(rows.numel(), length, dtype=torch.bool)
        keep.scatter_(1, torch.topk(scores[rows], probing.keep_top_n, dim=1).indices, True)
        replacements = draw(probes, (~keep).to(probes.device), generator)
        kept_only = torch.where(keep.to(probes.device), probes, replacements)
        kept_logits = next_token_logits(model, kept_only, f"in the stopping test of probe step {step}")
        top = torch.topk(kept_logits, probing.stopping_top_k, dim=-1).indices.cpu()
        forward_passes += 2 * rows.numel()
        active[rows[(top == target).any(-1)]] = False
        if not bool(active.any()):
            break
    converged = ~active
    importance = torch.softmax(scores, dim=-1)
    if bool(converged.any()):
        importance = importance[converged].mean(0)
    else:
        warnings.warn(
            f"no ReAGent probe met the stopping condition in max_probe_steps={probing.max_probe_steps}; the importance "
            "is the mean over all probes (raise max_probe_steps, keep_top_n or stopping_top_k)",
            RuntimeWarning,
            stacklevel=3,
        )
        importance = importance.mean(0)
    return ReAGentResult(importance, target, target_prob, steps, converged, forward_passes)
