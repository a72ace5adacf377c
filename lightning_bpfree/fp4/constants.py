"""Constants of the FP4 formats, recipes and backends, in one place.

Plain values only (no code): the E2M1 element grid, the block-scale formats' limits, block sizes,
the names of the GEMMs and their operands, and the backend names. The numerics (``formats``,
``quantize``, ``hadamard``, ``linear``, ``recipe``) and the plugin import them from here.
"""

from __future__ import annotations

import torch

# -- E2M1 elements: 1 sign, 2 exponent, 1 mantissa bit; no Inf/NaN ---------------------------------
E2M1_MAX = 6.0
E2M1_MAX_EXPONENT = 2  # 6 = 1.5 * 2**2: the MX scale rule subtracts this from floor(log2(amax))
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Magnitude of each 3-bit E2M1 code; bit 3 of a 4-bit code is the sign."""

# -- block-scale formats ----------------------------------------------------------------------------
UE4M3_MAX = 448.0  # FP8 E4M3 without its sign: 1.75 * 2**8
UE5M3_MAX = 61440.0  # 1.875 * 2**15, the top exponent reserved as in IEEE formats
E8M0_BIAS = 127
E8M0_MAX = 2.0**E8M0_BIAS  # code 254; 255 is NaN (the scale of a block holding NaN or Inf)
SCALE_RULES = ("chain", "mx_floor", "mx_ceil")
"""How a block scale is chosen (see ``FP4Format``)."""

# -- block sizes and the tensor scale -----------------------------------------------------------------
NVFP4_BLOCK_SIZE = 16
MXFP4_BLOCK_SIZE = 32
NVFP4_TENSOR_SCALE_TARGET = UE4M3_MAX  # the tensor amax maps to 6 * 448, the top of the block-scale range

# -- rounding and dtype limits ---------------------------------------------------------------------
ROUNDING_MODES = ("nearest", "stochastic")
FLOAT32_MAX = torch.finfo(torch.float32).max
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes the GEMMs of an FP4 linear may run in, on dequantized operands."""

# -- random Hadamard transform ----------------------------------------------------------------------
WGRAD_SIGNS: tuple[int, ...] = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
"""The fixed sign vector of the 16-point transform (the one NVIDIA's NVFP4 recipe uses for wgrad operands)."""

# -- GEMMs of a linear layer and their operands -----------------------------------------------------
GEMMS = ("fprop", "dgrad", "wgrad")
OPERANDS = (
    "fprop_input",
    "fprop_weight",
    "dgrad_grad_output",
    "dgrad_weight",
    "wgrad_grad_output",
    "wgrad_input",
)
GRADIENT_OPERANDS = ("dgrad_grad_output", "wgrad_grad_output")
WEIGHT_OPERANDS = ("fprop_weight", "dgrad_weight")
WGRAD_OPERANDS = ("wgrad_grad_output", "wgrad_input")

# -- backends -------------------------------------------------------------------------------------------
BACKENDS = ("auto", "emulate", "transformer_engine")
NVFP4_CAPABILITIES = ((10, 0), (10, 3))  # full recipe (RHT + SR) only on SM100 / SM103
