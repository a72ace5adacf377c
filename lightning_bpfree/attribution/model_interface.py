"""How the attribution methods talk to a causal language model.

Any of these works as ``model``:

- a transformers ``PreTrainedModel`` (its output has ``.logits``; embeddings via ``get_input_embeddings()``);
- a plain ``nn.Module`` or callable mapping ``input_ids`` int64 ``[B, T]`` to logits ``[B, T, V]``
  (or an object with ``.logits``). Gradient and JVP attributions and the soft metrics also need
  ``model(inputs_embeds=...)`` and ``model.get_input_embeddings()``; ReAGent and the hard metrics only
  call ``model(input_ids)``, so a black-box or quantised model is enough for them.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_bpfree.validation import check_token_ids

LanguageModel = Callable[..., Any]
"""A causal LM: called with ``input_ids`` (and, for gradient methods, ``inputs_embeds=``) it returns logits."""


def check_model(model, name: str = "model") -> None:
    """Refuse a ``model`` that cannot be called (a path, a config, None)."""
    if not callable(model):
        raise TypeError(f"{name} must be a callable causal LM (e.g. a transformers model), got {type(model).__name__}")


def vocabulary_size(model) -> int | None:
    """Rows of the model's input embedding, else ``model.config.vocab_size``; None when neither is known."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            rows = getattr(getter(), "num_embeddings", None)
        except (NotImplementedError, AttributeError):
            rows = None
        if isinstance(rows, int):
            return rows
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def check_model_token_ids(ids: Tensor, model=None, name: str = "input_ids") -> Tensor:
    """:func:`~lightning_bpfree.validation.check_token_ids` against ``model``'s vocabulary, when known."""
    return check_token_ids(name, ids, None if model is None else vocabulary_size(model))


def as_token_sequence(input_ids: Tensor, name: str = "input_ids", model=None) -> Tensor:
    """Validate one sequence of token ids and return it as int64 ``[N]`` (accepts ``[N]`` or ``[1, N]``).

    With ``model``, the ids must also lie in its vocabulary (see :func:`check_token_ids`).
    """
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(f"{name} must be one sequence of shape [N] or [1, N], got shape {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"{name} must hold at least one token")
    return check_model_token_ids(input_ids.long(), model, name)


def check_finite_logits(logits: Tensor, where: str) -> Tensor:
    """Refuse NaN or ``+inf`` logits, and rows that are ``-inf`` throughout; returns ``logits``.

    ``-inf`` for single tokens (ones the model rules out) is fine: softmax gives them probability 0.
    ``where`` says which forward pass it was, for the message.
    """
    if bool(torch.isnan(logits).any() | torch.isposinf(logits).any() | (logits.amax(-1) == float("-inf")).any()):
        raise ValueError(
            f"the model output (logits) holds NaN or infinite values {where}; an attribution of non-finite "
            "predictions would be meaningless, so check the model (weights, dtype overflow) first"
        )
    return logits


def _accepts_logits_to_keep(model) -> bool:
    forward = getattr(model, "forward", model)
    try:
        return "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def output_logits(output) -> Tensor:
    """The logits tensor of a model output (a tensor, a tuple whose first item is it, or ``.logits``)."""
    logits = getattr(output, "logits", output)
    if isinstance(output, (tuple, list)):
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model must return logits or an object with .logits, got {type(output).__name__}")
    return logits


def next_token_logits(model, input_ids: Tensor, where: str = "on the input") -> Tensor:
    """Logits of the token after each sequence: ``input_ids`` ``[B, T]`` -> float32 ``[B, V]``.

    Raises ``ValueError`` on non-finite logits (see :func:`check_finite_logits`), naming ``where``.
    """
    # Only the last position is needed; transformers models can skip the vocabulary projection elsewhere.
    kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    logits = output_logits(model(input_ids, **kwargs))
    if logits.dim() == 3:
        logits = logits[:, -1]
    if logits.dim() != 2 or logits.shape[0] != input_ids.shape[0]:
        raise ValueError(f"expected logits [B, T, V] or [B, V] from the model, got {tuple(logits.shape)}")
    return check_finite_logits(logits.float(), where)


def logits_from_embeddings(model, inputs_embeds: Tensor, where: str = "on the input embeddings") -> Tensor:
    """All-position logits from input embeddings ``[B, T, D]`` -> float32 ``[B, T, V]``; non-finite ones raise."""
    return check_finite_logits(output_logits(model(inputs_embeds=inputs_embeds)).float(), where)


def embedding_layer(model) -> nn.Module:
    """The model's token embedding module (``get_input_embeddings()``)."""
    getter = getattr(model, "get_input_embeddings", None)
    if getter is None:
        raise TypeError(
            "this method needs model.get_input_embeddings() and model(inputs_embeds=...), as transformers "
            f"models provide; {type(model).__name__} has no get_input_embeddings"
        )
    return getter()


def token_embeddings(model, input_ids: Tensor) -> Tensor:
    """The input embeddings of ``input_ids`` ``[..., T]`` -> ``[..., T, D]``, detached."""
    return embedding_layer(model)(input_ids).detach()


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for parameter-less callables)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@contextlib.contextmanager
def evaluation_mode(model) -> Iterator[None]:
    """Run ``model`` in eval mode (no dropout) and restore its previous mode afterwards."""
    was_training = bool(getattr(model, "training", False))
    if isinstance(model, nn.Module):
        model.eval()
    try:
        yield
    finally:
        if isinstance(model, nn.Module) and was_training:
            model.train()
