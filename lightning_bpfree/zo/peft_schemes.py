"""Fine-tuning schemes of ZO-Bench through real ``peft`` models: full, LoRA, prefix, prompt, head-only.

A ZO optimizer perturbs only the parameters with ``requires_grad=True``, so one code path trains
every scheme: :func:`apply_scheme` returns the model with exactly the scheme's parameters trainable.
Defaults follow MeZO / ZO-Bench: LoRA ``r=8, alpha=16``; prefix tuning 5 virtual tokens; prompt
tuning 10 virtual tokens.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_bpfree.validation import check_choice

SCHEMES = ("full", "lora", "prefix", "prompt", "head")


def output_head(model: nn.Module) -> nn.Module:
    """The module that maps hidden states to outputs (``get_output_embeddings()`` or a ``classifier``/``score``)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name in ("classifier", "score", "head"):
        if head is None:
            head = getattr(model, name, None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"cannot find the output head of {type(model).__name__}: scheme='head' needs "
                         "get_output_embeddings() or a classifier/score/head module")  # fmt: skip
    return head


def apply_scheme(model: nn.Module, scheme: str, task_type: str = "CAUSAL_LM", **options: Any) -> nn.Module:
    """Make exactly the parameters of ``scheme`` trainable; wraps the model with ``peft`` when needed.

    Args:
        model: a transformers model.
        scheme: ``"full"`` (every parameter), ``"lora"`` (``peft.LoraConfig``, default ``r=8,
            lora_alpha=16`` on every attention projection peft knows for the architecture),
            ``"prefix"`` (``peft.PrefixTuningConfig``, 5 virtual tokens), ``"prompt"``
            (``peft.PromptTuningConfig``, 10 virtual tokens) or ``"head"`` (the output head only;
            a head tied to the input embeddings is untied first, by a copy, so that training it
            leaves the embeddings alone).
        task_type: the peft task type (``"CAUSAL_LM"``, ``"SEQ_CLS"`` ...).
        **options: overrides for the peft config (``r``, ``lora_alpha``, ``num_virtual_tokens`` ...).

    Returns:
        the model to train (a ``peft.PeftModel`` for lora / prefix / prompt, else ``model``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice("scheme", scheme, SCHEMES)
    if scheme in ("full", "head") and options:  # no peft config to pass them to
        raise ValueError(f"scheme={scheme!r} takes no options, got {sorted(options)}")
    if scheme == "full":
        model.requires_grad_(True)
        return model
    if scheme == "head":
        head = output_head(model)
        model.requires_grad_(False)
        _untie(model, head)
        head.requires_grad_(True)
        return model
    import peft

    if scheme == "lora":
        config = peft.LoraConfig(task_type=task_type, **{"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, **options})
    elif scheme == "prefix":
        config = peft.PrefixTuningConfig(task_type=task_type, **{"num_virtual_tokens": 5, **options})
    else:
        config = peft.PromptTuningConfig(task_type=task_type, **{"num_virtual_tokens": 10, **options})
    return peft.get_peft_model(model, config)


def _untie(model: nn.Module, head: nn.Module) -> None:
    weight = getattr(head, "weight", None)
    get_input = getattr(model, "get_input_embeddings", None)
    embeddings = get_input() if callable(get_input) else None
    if weight is not None and embeddings is not None and getattr(embeddings, "weight", None) is weight:
        head.weight = nn.Parameter(weight.detach().clone())
        if hasattr(model, "config"):
            model.config.tie_word_embeddings = False
