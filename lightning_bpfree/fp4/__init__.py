"""FP4 training precision: bit-exact NVFP4 / MXFP4 / UE5M3 / UE4M3 emulation, FP4 linear layers and
the ``NVFP4Precision`` / ``FP4Precision`` Lightning plugins.

The numerics (``formats``, ``quantize``, ``hadamard``, ``linear``, ``recipe``) are plain PyTorch; the
Lightning plugins live in ``plugin`` and are imported lazily.
"""

from __future__ import annotations

from typing import Any

from lightning_bpfree.fp4.formats import E8M0, FORMATS, UE4M3, UE5M3, FP4Format, ScaleFormat, round_to_e2m1
from lightning_bpfree.fp4.hadamard import hadamard_matrix, random_hadamard_transform
from lightning_bpfree.fp4.linear import FP4Linear, FP4LinearFunction, fp4_linear
from lightning_bpfree.fp4.quantize import QuantizedTensor, dequantize, fake_quantize, quantize
from lightning_bpfree.fp4.recipe import FP4Recipe, OperandSpec

__all__ = [
    "E8M0",
    "FORMATS",
    "FP4Format",
    "FP4Linear",
    "FP4LinearFunction",
    "FP4Precision",
    "FP4Recipe",
    "NVFP4Precision",
    "OperandSpec",
    "QuantizedTensor",
    "ScaleFormat",
    "UE4M3",
    "UE5M3",
    "dequantize",
    "fake_quantize",
    "fp4_linear",
    "hadamard_matrix",
    "quantize",
    "random_hadamard_transform",
    "round_to_e2m1",
]


def __getattr__(name: str) -> Any:
    if name in ("NVFP4Precision", "FP4Precision", "convert_to_fp4"):
        from lightning_bpfree.fp4 import plugin

        return getattr(plugin, name)
    raise AttributeError(f"module 'lightning_bpfree.fp4' has no attribute {name!r}")
