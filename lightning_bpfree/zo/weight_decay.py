"""Which parameters weight decay applies to: the decay / no-decay parameter groups.

MeZO's released trainer (``princeton-nlp/MeZO``, ``large_models/trainer.py``, ``zo_update``) decays
every trained parameter except those whose name contains ``"bias"``, ``"layer_norm"`` or
``"layernorm"``: the Hugging Face ``Trainer`` convention, applied by name. :func:`weight_decay_groups`
applies the same convention by module type by default (:data:`BIAS_AND_NORM`): no decay for biases
and for every parameter of a normalization layer, whatever the layer is called in the model (LLaMA's
final ``model.norm`` is a ``LlamaRMSNorm`` that MeZO's name rule decays; :func:`mezo_no_decay` is that
name rule exactly, for reproducing the released code).

The ZO optimizers themselves follow torch's param-group convention (``weight_decay`` per group); the
groups built here are what ``ZerothOrder`` passes them, and what a raw loop passes to reproduce it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_bpfree.validation import check_nonnegative_float

NoDecayRule = Callable[[str, torch.Tensor], bool]


class _BiasAndNorm:
    """Sentinel type of :data:`BIAS_AND_NORM` (a readable default in signatures and reprs)."""

    def __repr__(self) -> str:
        return "BIAS_AND_NORM"


BIAS_AND_NORM: Any = _BiasAndNorm()
"""The default ``no_decay``: biases and the parameters of normalization layers are not decayed."""

# class names of normalization layers: LayerNorm, RMSNorm, GroupNorm, LlamaRMSNorm, BatchNorm2d, LayerNorm2d ...
_NORM_CLASS_NAME = re.compile(r"Norm(\d+d)?$")


def is_normalization(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer: torch's batch/instance norms, or a class named ``*Norm``
    (``LayerNorm``, ``RMSNorm``, ``GroupNorm``, transformers' ``LlamaRMSNorm`` ...) or ``*Norm<k>d``."""
    return isinstance(module, nn.modules.batchnorm._NormBase) or bool(_NORM_CLASS_NAME.search(type(module).__name__))


def is_bias(name: str) -> bool:
    """Whether the parameter named ``name`` (dotted, as ``named_parameters`` gives) is a bias: its own
    attribute name contains ``"bias"`` (``bias``, ``in_proj_bias``, ``bias_k``)."""
    return "bias" in name.rsplit(".", 1)[-1]


def mezo_no_decay(name: str, parameter: torch.Tensor) -> bool:
    """MeZO's released rule, by name only: no decay when the name contains ``bias``, ``layer_norm`` or
    ``layernorm`` (so an RMSNorm named ``norm``, as LLaMA's final one, is decayed)."""
    return any(word in name for word in ("bias", "layer_norm", "layernorm"))


def check_no_decay(no_decay: Any) -> NoDecayRule | None | Any:
    """``no_decay`` if it is ``None``, :data:`BIAS_AND_NORM` or a callable; ``TypeError`` otherwise."""
    if no_decay is None or no_decay is BIAS_AND_NORM or callable(no_decay):
        return no_decay
    raise TypeError(
        "no_decay must be None (decay every parameter), BIAS_AND_NORM (the default: no decay for biases and "
        f"normalization layers) or a callable no_decay(name, parameter) -> bool, got {type(no_decay).__name__}"
    )


def no_decay_names(module: nn.Module, no_decay: Any = BIAS_AND_NORM) -> list[str]:
    """Names (as ``module.named_parameters()`` gives them) of the parameters ``no_decay`` exempts from decay."""
    no_decay = check_no_decay(no_decay)
    if no_decay is None:
        return []
    if no_decay is BIAS_AND_NORM:
        in_norm = {id(p) for m in module.modules() if is_normalization(m) for p in m.parameters(recurse=False)}
        return [name for name, p in module.named_parameters() if is_bias(name) or id(p) in in_norm]
    return [name for name, p in module.named_parameters() if no_decay(name, p)]


def weight_decay_groups(module: nn.Module, weight_decay: float, no_decay: Any = BIAS_AND_NORM) -> list[dict[str, Any]]:
    """Parameter groups for a ZO (or any torch) optimizer: decay ``weight_decay`` / no decay.

    Args:
        module: the model; every parameter is grouped, frozen ones included (the optimizers skip
            those with ``requires_grad=False`` at each step).
        weight_decay: the decay of the decayed group.
        no_decay: :data:`BIAS_AND_NORM` (default), ``None`` (decay everything) or a callable
            ``no_decay(name, parameter) -> bool`` (e.g. :func:`mezo_no_decay`).

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]``,
        each list in the module's parameter order, an empty group left out. When nothing is exempt
        (``no_decay=None``, or ``weight_decay == 0``) one group holds every parameter in the module's
        order, so that the optimizer numbers the parameters, and draws their noise, as it does from
        ``module.parameters()``. With two groups the decayed parameters come first: a raw loop
        reproduces ``ZerothOrder`` only with these same groups.
    """
    weight_decay = check_nonnegative_float("weight_decay", weight_decay)
    no_decay = check_no_decay(no_decay)
    exempt = set(no_decay_names(module, no_decay)) if weight_decay else set()
    named = list(module.named_parameters())
    groups = [
        {"params": [p for name, p in named if name not in exempt], "weight_decay": weight_decay},
        {"params": [p for name, p in named if name in exempt], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
