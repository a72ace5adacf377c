"""NoProp (Li, Teh, Pascanu, arXiv 2503.24322): classifiers trained as label denoisers, block by block.

The LightningModules :class:`NoPropDT`, :class:`NoPropCT`, :class:`NoPropFM` (and the
:class:`BackpropBaseline` they are compared with) load lazily, so the plain-PyTorch numerics in
``schedules``, ``backbone`` and ``algorithms`` import without Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_bpfree.noprop.algorithms import NoPropCTNet, NoPropDTNet, NoPropFMNet, noprop_dt_step
from lightning_bpfree.noprop.backbone import (
    BackpropClassifier,
    ClassEmbedding,
    DenoiserBlock,
    class_prototypes,
)
from lightning_bpfree.noprop.schedules import (
    LearnableNoiseSchedule,
    cosine_alpha_bar,
    dt_inference_coefficients,
    dt_loss_weights,
)

_LIGHTNING = ("NoPropDT", "NoPropCT", "NoPropFM", "BackpropBaseline")

__all__ = [
    *_LIGHTNING,
    "BackpropClassifier",
    "ClassEmbedding",
    "DenoiserBlock",
    "LearnableNoiseSchedule",
    "NoPropCTNet",
    "NoPropDTNet",
    "NoPropFMNet",
    "class_prototypes",
    "cosine_alpha_bar",
    "dt_inference_coefficients",
    "dt_loss_weights",
    "noprop_dt_step",
]


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING:
        return getattr(importlib.import_module("lightning_bpfree.noprop.modules"), name)
    raise AttributeError(f"module 'lightning_bpfree.noprop' has no attribute {name!r}")
