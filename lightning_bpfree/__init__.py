"""lightning_bpfree: PyTorch Lightning plug-ins for training with less (or no) back-propagation.

The user-facing classes are importable from the top level; each is loaded lazily from its
capability's subpackage so that ``import lightning_bpfree`` stays light and optional dependencies
(transformers, diffusers, gymnasium) are only needed by the pieces that use them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "ZerothOrder": "lightning_bpfree.zo.callback",
    "ZOSGD": "lightning_bpfree.zo.optim",
    "ZODataParallelStrategy": "lightning_bpfree.zo.strategy",
    "NVFP4Precision": "lightning_bpfree.fp4.plugin",
    "FP4Precision": "lightning_bpfree.fp4.plugin",
    "FP4Recipe": "lightning_bpfree.fp4.recipe",
    "SOFTAttention": "lightning_bpfree.attention.soft",
    "use_soft_attention": "lightning_bpfree.attention.huggingface",
    "AdjointSampler": "lightning_bpfree.diffusion.adjoint",
    "AdjointDPMCustomization": "lightning_bpfree.diffusion.customization",
    "NoPropDT": "lightning_bpfree.noprop",
    "NoPropCT": "lightning_bpfree.noprop",
    "NoPropFM": "lightning_bpfree.noprop",
    "ODICE": "lightning_bpfree.rl.odice",
    "BGPO": "lightning_bpfree.rl.bgpo",
    "ReAGentCallback": "lightning_bpfree.attribution.reagent",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_bpfree' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
