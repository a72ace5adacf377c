"""FP4 training precision: bit-exact NVFP4 / MXFP4 / UE5M3 / UE4M3 emulation, FP4 linear layers and
the ``NVFP4Precision`` / ``FP4Precision`` Lightning plugins.

The format constants sit in ``constants``; the numerics (``formats``, ``quantize``, ``hadamard``,
``linear``, ``recipe``, ``convert``, ``transformer_engine``) are plain PyTorch; the Lightning precision
plugins live in ``precision.py`` and load on first use; ``bench.py`` is ``bpfree fp4-bench``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_bpfree._lazy import lazy_exports
from lightning_bpfree.fp4.convert import ConversionReport, convert_to_fp4, fp4_layers
from lightning_bpfree.fp4.formats import E8M0, FORMATS, UE4M3, UE5M3, FP4Format, ScaleFormat, round_to_e2m1
from lightning_bpfree.fp4.hadamard import hadamard_matrix, random_hadamard_transform
from lightning_bpfree.fp4.linear import FP4Linear, FP4LinearFunction, fp4_linear
from lightning_bpfree.fp4.quantize import QuantizedTensor, dequantize, fake_quantize, quantize
from lightning_bpfree.fp4.recipe import FP4Recipe, OperandSpec

if TYPE_CHECKING:
    from lightning_bpfree.fp4.precision import FP4Precision, NVFP4Precision

_EXPORTS = {
    "FP4Precision": "lightning_bpfree.fp4.precision",
    "NVFP4Precision": "lightning_bpfree.fp4.precision",
}

__all__ = [
    "ConversionReport",
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
    "convert_to_fp4",
    "dequantize",
    "fake_quantize",
    "fp4_layers",
    "fp4_linear",
    "hadamard_matrix",
    "quantize",
    "random_hadamard_transform",
    "round_to_e2m1",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
