"""SOFT softmax-free linear attention: the module, the Newton pseudo-inverse, and a transformers drop-in.

``soft.py`` holds the numerics (plain PyTorch); ``huggingface.py`` switches a transformers model's
self-attention to SOFT; ``lightning.py`` is a small ViT classifier as a LightningModule; ``bench.py`` is
``bpfree soft-bench``. ``use_soft_attention`` is loaded lazily so that the module works without transformers.
"""

from __future__ import annotations

from typing import Any

from lightning_bpfree.attention.soft import (
    SOFTAttention,
    SOFTKernelAttention,
    gaussian_kernel,
    newton_pinv,
    newton_schulz_pinv,
)

__all__ = [
    "SOFTAttention",
    "SOFTKernelAttention",
    "gaussian_kernel",
    "newton_pinv",
    "newton_schulz_pinv",
    "use_soft_attention",
]


def __getattr__(name: str) -> Any:
    if name == "use_soft_attention":
        from lightning_bpfree.attention.huggingface import use_soft_attention

        return use_soft_attention
    raise AttributeError(f"module 'lightning_bpfree.attention' has no attribute {name!r}")
