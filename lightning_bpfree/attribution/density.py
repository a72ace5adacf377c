"""Gradient-times-input attribution by forward-mode AD, and the importance density of Wu et al. (2023).

For a prompt ``x`` (N tokens) and a response ``y`` (M tokens) the attribution matrix is

    I[m, n] = (d p(y_m | x, y_<m) / d e_n) . e_n

the gradient of the probability of response token m with respect to the embedding ``e_n`` of prompt
token n, dotted with that embedding. Column n is a Jacobian-vector product whose tangent is ``e_n``
placed at position n and zero elsewhere, so forward-mode AD (``torch.func.jvp``) produces all M
outputs for one input position in a single forward pass and no backward pass runs at all. The N
tangents are stacked along the batch dimension of one call, so the model's own batching plays the
role of ``vmap``.

``importance_density`` then sparsifies each output's column of attributions and measures how many
outputs each input token supports (an L1 / L4 ratio): tokens that many response tokens rely on get
a high density. The instruction score sums it over the instruction's tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_bpfree.attribution.model_interface import (
    LanguageModel,
    as_token_sequence,
    check_model,
    evaluation_mode,
    logits_from_embeddings,
    model_device,
    token_embeddings,
)
from lightning_bpfree.validation import (
    check_choice,
    check_finite_tensor,
    check_float,
    check_int,
    check_optional,
    check_positive_int,
)

ATTRIBUTION_METHODS = ("jvp", "backward")
ATTRIBUTION_TARGETS = ("probability", "log_probability")


def _response_scores(model, embeds: Tensor, output_ids: Tensor, num_inputs: int, target: str) -> Tensor:
    """p(y_m | x, y_<m), or its log, for each row of ``embeds`` ``[B, N+M-1, D]`` -> ``[B, M]``."""
    logits = logits_from_embeddings(model, embeds, "on the prompt and response")
    # The logits at position N-1+m predict response token m.
    predicting = logits[:, num_inputs - 1 : num_inputs - 1 + output_ids.numel()]
    # log_softmax rather than log(softmax): no underflow to -inf for an unlikely response token.
    scores = torch.log_softmax(predicting, dim=-1) if target == "log_probability" else torch.softmax(predicting, -1)
    return scores.gather(-1, output_ids.view(1, -1, 1).expand(scores.shape[0], -1, 1)).squeeze(-1)


def jvp_attribution(
    model: LanguageModel,
    input_ids: Tensor,
    output_ids: Tensor,
    *,
    method: str = "jvp",
    positions: Sequence[int] | Tensor | None = None,
    chunk_size: int | None = None,
    target: str = "probability",
) -> Tensor:
    """Gradient x input of each response token's probability with respect to each prompt embedding.

    By default the differentiated quantity is the *probability* ``p(y_m)`` (Wu et al. 2023). Attribution
    libraries usually differentiate the log-probability: captum's ``InputXGradient`` on ``log p(y_m)``
    gives this matrix's row ``m`` divided by ``p(y_m)``, which ``target="log_probability"`` computes.

    Args:
        model: a causal LM that accepts ``inputs_embeds=`` and has ``get_input_embeddings()``
            (any transformers causal LM).
        input_ids: the prompt, int64 ``[N]`` or ``[1, N]``.
        output_ids: the response tokens y, int64 ``[M]`` or ``[1, M]`` (for example the model's own
            greedy continuation, or ``[target_id]`` for a single next-token prediction).
        method: ``"jvp"`` (forward-mode ``torch.func.jvp``, no backward pass) or ``"backward"``
            (reverse mode, one backward pass per response token). Both give the same matrix.
        positions: prompt positions to attribute (default: all N). Others get 0 and cost nothing
            with ``"jvp"``.
        chunk_size: with ``"jvp"``, how many positions share one batched forward pass (default: all
            at once). Lower it to bound memory: each position is one copy of the sequence.
        target: ``"probability"`` (``p(y_m)``, the paper's attribution) or ``"log_probability"``
            (``log p(y_m)``; equals the probability attribution divided by ``p(y_m)``).

    Returns:
        float32 ``[M, N]``: ``I[m, n]`` in units of the target (the first-order change of ``p(y_m)``,
        or of ``log p(y_m)``, when ``e_n`` is scaled to zero, with the sign flipped).
    """
    check_model(model)
    check_choice("method", method, ATTRIBUTION_METHODS)
    check_choice("target", target, ATTRIBUTION_TARGETS)
    check_optional(check_positive_int, "chunk_size", chunk_size)
    prompt = as_token_sequence(input_ids, "input_ids", model)
    response = as_token_sequence(output_ids, "output_ids", model)
    num_inputs = prompt.numel()
    if positions is None:
        chosen = torch.arange(num_inputs)
    else:
        if isinstance(positions, Tensor):
            if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
                raise TypeError(f"positions must hold integer prompt positions, got dtype {positions.dtype}")
            chosen = positions.long().flatten()
        else:
            if isinstance(positions, (str, bytes)) or not hasattr(positions, "__iter__"):
                raise TypeError(f"positions must be a sequence of ints or an int tensor, got {positions!r}")
            chosen = torch.tensor([check_int("positions", p) for p in positions], dtype=torch.long)
        if chosen.numel() == 0 or bool((chosen < 0).any()) or bool((chosen >= num_inputs).any()):
            raise ValueError(f"positions must be prompt positions in [0, {num_inputs}), got {chosen.tolist()}")
    # The last response token is predicted, never fed.
    sequence = torch.cat([prompt, response[:-1]]).to(model_device(model))
    response = response.to(sequence.device)
    attribution = torch.zeros(response.numel(), num_inputs)
    with evaluation_mode(model):
        embeds = token_embeddings(model, sequence[None])  # [1, T, D]
        if method == "jvp":
            columns = _jvp_columns(model, embeds, response, num_inputs, chosen, chunk_size or chosen.numel(), target)
        else:
            columns = _backward_columns(model, embeds, response, num_inputs, chosen, target)
    attribution[:, chosen] = columns.float().cpu()
    return attribution


def _jvp_columns(
    model, embeds: Tensor, response: Tensor, num_inputs: int, positions: Tensor, chunk: int, target: str
) -> Tensor:
    def scores(batch_embeds: Tensor) -> Tensor:
        return _response_scores(model, batch_embeds, response, num_inputs, target)

    columns = []
    # PyTorch's fused CPU/GPU attention kernels have no forward-mode derivative; the math backend has.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        for start in range(0, positions.numel(), chunk):
            block = positions[start : start + chunk].to(embeds.device)
            primal = embeds.expand(block.numel(), -1, -1).contiguous()
            tangent = torch.zeros_like(primal)
            rows = torch.arange(block.numel(), device=embeds.device)
            tangent[rows, block] = embeds[0, block]
            _, directional = torch.func.jvp(scores, (primal,), (tangent,))
            columns.append(directional.T)  # [M, chunk]
    return torch.cat(columns, dim=1)


def _backward_columns(
    model, embeds: Tensor, response: Tensor, num_inputs: int, positions: Tensor, target: str
) -> Tensor:
    leaf = embeds.detach().requires_grad_(True)
    with torch.enable_grad():
        probs = _response_scores(model, leaf, response, num_inputs, target)[0]
        rows = []
        for m in range(response.numel()):
            (grad,) = torch.autograd.grad(probs[m], leaf, retain_graph=m + 1 < response.numel())
            rows.append((grad[0] * leaf[0]).sum(-1).detach())
    return torch.stack(rows)[:, positions.to(leaf.device)]


def importance_density(attribution: Tensor, L: int = 10, b: int = 7, p: float = 4.0) -> Tensor:
    """How many response tokens each prompt token supports (Wu et al. 2023), normalised to max 1.

    For each response token m the positive attributions are scaled to its own maximum and bucketed,
    ``S[m, n] = ceil(L * max(0, I[m, n]) / max_n' I[m, n'])``, buckets ``<= b`` are dropped, and
    ``d_n = ||S[:, n]||_1 / ||S[:, n]||_p``; the result is ``d / max(d)``. A token that no response
    token attributes strongly to gets 0.

    Args:
        attribution: ``I`` float ``[M, N]`` (responses x prompt tokens), e.g. from ``jvp_attribution``.
        L: number of buckets (10 in the paper). b: buckets at or below it are zeroed (7 in the paper).
        p: the norm in the denominator (4 in the paper).

    Returns:
        float32 ``[N]`` in [0, 1].
    """
    if not isinstance(attribution, Tensor) or attribution.dim() != 2:
        shape = tuple(attribution.shape) if isinstance(attribution, Tensor) else type(attribution).__name__
        raise ValueError(f"attribution must be a 2-D tensor [M outputs, N inputs], got {shape}")
    if attribution.numel() == 0:
        raise ValueError(
            f"attribution must hold at least one output and one input, got shape {tuple(attribution.shape)}"
        )
    check_finite_tensor("attribution", attribution, consequence="the density of non-finite scores is undefined")
    check_positive_int("L", L)
    check_int("b", b, low=0, high=L - 1)
    check_float("p", p, low=1.0, low_open=True)  # for p = 1 the L1/Lp ratio is the same for every token
    positive = attribution.float().clamp(min=0)
    row_max = positive.amax(dim=1, keepdim=True)
    scaled = torch.where(row_max > 0, positive / row_max.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    buckets = torch.ceil(scaled * L)
    buckets = torch.where(buckets <= b, 0.0, buckets)
    l1 = buckets.sum(dim=0)
    lp = buckets.pow(p).sum(dim=0).pow(1.0 / p)
    density = torch.where(lp > 0, l1 / lp.clamp(min=1e-30), 0.0)
    top = density.max()
    return density / top if top > 0 else density


def instruction_score(density: Tensor, instruction_mask: Tensor) -> float:
    """The instruction's share of importance: ``sum(d[instruction]) / log2(2 + |instruction|)``.

    Args:
        density: ``[N]`` from ``importance_density``.
        instruction_mask: bool ``[N]``, True on the instruction's tokens.
    """
    if not isinstance(density, Tensor) or density.dim() != 1:
        raise TypeError(f"density must be a 1-D tensor [N] from importance_density, got {density!r}")
    check_finite_tensor("density", density)
    if not isinstance(instruction_mask, Tensor) or instruction_mask.dtype != torch.bool:
        raise TypeError("instruction_mask must be a bool tensor marking the instruction's tokens")
    if instruction_mask.shape != density.shape:
        raise ValueError(
            f"instruction_mask shape {tuple(instruction_mask.shape)} must match density {tuple(density.shape)}"
        )
    size = int(instruction_mask.sum())
    return float(density[instruction_mask].sum()) / math.log2(2 + size)
