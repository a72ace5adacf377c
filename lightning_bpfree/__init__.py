"""lightning_bpfree: PyTorch Lightning plug-ins for training with less (or no) back-propagation.

The user-facing classes are importable from the top level; each loads from the module that defines it
on first use, so that ``import lightning_bpfree`` stays light and optional dependencies (transformers,
diffusers, gymnasium) are needed only by the pieces that use them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_bpfree._lazy import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lightning_bpfree.attention.huggingface import use_soft_attention
    from lightning_bpfree.attention.soft import SOFTAttention
    from lightning_bpfree.attribution.callback import ReAGentCallback
    from lightning_bpfree.bgpo.module import BGPO
    from lightning_bpfree.diffusion.adjoint import AdjointSampler
    from lightning_bpfree.diffusion.module import AdjointDPMCustomization
    from lightning_bpfree.fp4.precision import FP4Precision, NVFP4Precision
    from lightning_bpfree.fp4.recipe import FP4Recipe
    from lightning_bpfree.noprop.module import NoPropCT, NoPropDT, NoPropFM
    from lightning_bpfree.odice.module import ODICE
    from lightning_bpfree.zo.callback import ZerothOrder
    from lightning_bpfree.zo.optim import ZOSGD
    from lightning_bpfree.zo.strategy import ZODataParallelStrategy

_EXPORTS: dict[str, str] = {
    "ZerothOrder": "lightning_bpfree.zo.callback",
    "ZOSGD": "lightning_bpfree.zo.optim",
    "ZODataParallelStrategy": "lightning_bpfree.zo.strategy",
    "NVFP4Precision": "lightning_bpfree.fp4.precision",
    "FP4Precision": "lightning_bpfree.fp4.precision",
    "FP4Recipe": "lightning_bpfree.fp4.recipe",
    "SOFTAttention": "lightning_bpfree.attention.soft",
    "use_soft_attention": "lightning_bpfree.attention.huggingface",
    "AdjointSampler": "lightning_bpfree.diffusion.adjoint",
    "AdjointDPMCustomization": "lightning_bpfree.diffusion.module",
    "NoPropDT": "lightning_bpfree.noprop.module",
    "NoPropCT": "lightning_bpfree.noprop.module",
    "NoPropFM": "lightning_bpfree.noprop.module",
    "ODICE": "lightning_bpfree.odice.module",
    "BGPO": "lightning_bpfree.bgpo.module",
    "ReAGentCallback": "lightning_bpfree.attribution.callback",
}

__all__ = [
    "BGPO",
    "ODICE",
    "ZOSGD",
    "AdjointDPMCustomization",
    "AdjointSampler",
    "FP4Precision",
    "FP4Recipe",
    "NVFP4Precision",
    "NoPropCT",
    "NoPropDT",
    "NoPropFM",
    "ReAGentCallback",
    "SOFTAttention",
    "ZODataParallelStrategy",
    "ZerothOrder",
    "use_soft_attention",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
