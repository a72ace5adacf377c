"""SOFT softmax-free linear attention (Lu et al., NeurIPS 2021): the layer, the Newton pseudo-inverse,
a transformers drop-in and a ViT classifier.

``soft.py`` holds the numerics (plain PyTorch); ``huggingface.py`` switches a transformers model's
self-attention to SOFT; ``vit.py`` is a small ViT; ``module.py`` its LightningModule; ``bench.py`` is
``bpfree attention-bench``. The names that need transformers or Lightning load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_bpfree._lazy import lazy_exports
from lightning_bpfree.attention.soft import (
    SOFTAttention,
    SOFTKernelAttention,
    gaussian_kernel,
    newton_pinv,
    newton_schulz_pinv,
)

if TYPE_CHECKING:
    from lightning_bpfree.attention.huggingface import use_soft_attention
    from lightning_bpfree.attention.module import ViTClassifier

_EXPORTS = {
    "use_soft_attention": "lightning_bpfree.attention.huggingface",
    "ViTClassifier": "lightning_bpfree.attention.module",
}

__all__ = [
    "SOFTAttention",
    "SOFTKernelAttention",
    "ViTClassifier",
    "gaussian_kernel",
    "newton_pinv",
    "newton_schulz_pinv",
    "use_soft_attention",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
