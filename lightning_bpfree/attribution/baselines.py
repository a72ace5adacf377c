"""The attributions ReAGent is compared with, for one next-token prediction.

- ``gradient_x_input``: ``(d p(y) / d e_n) . e_n``, the one-output case of ``jvp_attribution``
  (forward-mode by default, so it needs no backward pass either).
- ``integrated_gradients``: the path integral of the gradient from an all-zero embedding input to
  the real one (Sundararajan et al. 2017), Riemann midpoint rule; back-propagation.
- ``attention_attribution``: the last position's attention over the context, averaged over the
  heads of one layer (transformers models; eager attention is switched on for the call).
- ``random_attribution``: uniform noise, the floor every method must beat.

All take one sequence ``input_ids`` ``[N]`` and return float32 ``[N]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_bpfree.attribution.density import jvp_attribution
from lightning_bpfree.attribution.model_interface import (
    LanguageModel,
    as_token_sequence,
    check_model,
    evaluation_mode,
    logits_from_embeddings,
    model_device,
    next_token_logits,
    token_embeddings,
    vocabulary_size,
)
from lightning_bpfree.validation import check_finite_tensor, check_generator, check_int, check_positive_int


def _checked_sequence(model, input_ids: Tensor) -> Tensor:
    check_model(model)
    return as_token_sequence(input_ids, model=model)


def _predicted(model, sequence: Tensor, target_id: int | None) -> int:
    if target_id is not None:
        vocab = vocabulary_size(model)
        return check_int("target_id", target_id, low=0, high=None if vocab is None else vocab - 1)
    with torch.no_grad(), evaluation_mode(model):
        return int(next_token_logits(model, sequence[None].to(model_device(model)))[0].argmax())


def gradient_x_input(
    model: LanguageModel, input_ids: Tensor, target_id: int | None = None, *, method: str = "jvp"
) -> Tensor:
    """Gradient x input of ``p(target | input)`` per input token; ``method`` as in ``jvp_attribution``."""
    sequence = _checked_sequence(model, input_ids)
    target = _predicted(model, sequence, target_id)
    return jvp_attribution(model, sequence, torch.tensor([target]), method=method)[0]


def integrated_gradients(
    model: LanguageModel, input_ids: Tensor, target_id: int | None = None, *, steps: int = 16
) -> Tensor:
    """Integrated gradients of ``p(target | input)`` from the zero-embedding baseline, summed over features.

    Args:
        steps: points on the straight path (all run as one batch of ``steps`` sequences).
    """
    check_positive_int("steps", steps)
    sequence = _checked_sequence(model, input_ids).to(model_device(model))
    target = _predicted(model, sequence, target_id)
    with evaluation_mode(model), torch.enable_grad():
        embeds = token_embeddings(model, sequence[None])  # [1, N, D]
        alphas = (torch.arange(steps, device=embeds.device, dtype=embeds.dtype) + 0.5) / steps
        path = (alphas.view(-1, 1, 1) * embeds).requires_grad_(True)
        logits = logits_from_embeddings(model, path, "on the integration path")
        probs = torch.softmax(logits[:, -1], -1)[:, target]
        (grad,) = torch.autograd.grad(probs.sum(), path)
    return (grad.mean(0) * embeds[0]).sum(-1).detach().cpu()


def attention_attribution(model: LanguageModel, input_ids: Tensor, *, layer: int = -1) -> Tensor:
    """Attention of the last position over the input, averaged over the heads of ``layer``.

    Needs a transformers model; its attention implementation is set to ``"eager"`` for the call
    (the fused kernels return no weights) and restored afterwards.
    """
    sequence = _checked_sequence(model, input_ids).to(model_device(model))
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise TypeError("attention_attribution needs a transformers model (set_attn_implementation)")
    check_int("layer", layer)
    previous = model.config._attn_implementation
    setter("eager")
    try:
        with torch.no_grad(), evaluation_mode(model):
            attentions = model(sequence[None], output_attentions=True).attentions
    finally:
        setter(previous)
    if not attentions:
        raise RuntimeError("the model returned no attention weights")
    if not -len(attentions) <= layer < len(attentions):
        raise ValueError(f"layer must be in [{-len(attentions)}, {len(attentions)}) for this model, got {layer}")
    weights = attentions[layer][0, :, -1].float().mean(0).cpu()
    check_finite_tensor("the model output (attention weights)", weights)
    return weights


def random_attribution(input_ids: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform random scores in [0, 1), one per input token."""
    check_generator("generator", generator)
    sequence = as_token_sequence(input_ids)
    return torch.rand(sequence.numel(), generator=generator)
