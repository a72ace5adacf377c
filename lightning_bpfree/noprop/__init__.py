"""NoProp (Li, Teh, Pascanu, arXiv 2503.24322): classifiers trained as label denoisers, block by block.

The LightningModules :class:`NoPropDT`, :class:`NoPropCT`, :class:`NoPropFM` (and the
:class:`BackpropBaseline` they are compared with) load lazily, so the plain-PyTorch numerics in
``schedules``, ``backbone`` and ``algorithms`` import without Lightning; ``bench.py`` is
``bpfree noprop-bench``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_bpfree._lazy import lazy_exports
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

if TYPE_CHECKING:
    from lightning_bpfree.noprop.module import BackpropBaseline, NoPropCT, NoPropDT, NoPropFM

_EXPORTS = {
    name: "lightning_bpfree.noprop.module" for name in ("NoPropDT", "NoPropCT", "NoPropFM", "BackpropBaseline")
}

__all__ = [
    "BackpropBaseline",
    "BackpropClassifier",
    "ClassEmbedding",
    "DenoiserBlock",
    "LearnableNoiseSchedule",
    "NoPropCT",
    "NoPropCTNet",
    "NoPropDT",
    "NoPropDTNet",
    "NoPropFM",
    "NoPropFMNet",
    "class_prototypes",
    "cosine_alpha_bar",
    "dt_inference_coefficients",
    "dt_loss_weights",
    "noprop_dt_step",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
