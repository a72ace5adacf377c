"""Element and scale formats of block-scaled FP4, and their rounding.

Every FP4 format here stores E2M1 elements (1 sign, 2 exponent, 1 mantissa bit; magnitudes
0, 0.5, 1, 1.5, 2, 3, 4, 6; no Inf/NaN) in blocks that share one scale. They differ in the scale:

============  =====  ==========================  ======================================
format        block  block scale                 tensor scale
============  =====  ==========================  ======================================
``nvfp4``     16     UE4M3 (bias 7, max 448)     FP32, maps the tensor amax to 6 * 448
``ue4m3``     16     UE4M3 (bias 7, max 448)     none
``ue5m3``     16     UE5M3 (bias 15, max 61440)  FP32, maps the tensor amax to 6 * 448
``mxfp4``     32     E8M0 (power of two)         none; OCP rule ``2^(floor(log2 amax) - 2)``
``mxfp4_ceil`` 32    E8M0 (power of two)         none; round-up rule ``2^ceil(log2(amax / 6))``
============  =====  ==========================  ======================================

All arithmetic is float32 and bit-exact with respect to the hardware's definition: rounding to
E2M1 is round-half-to-even on the code (ties 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
3.5 -> 4, 5 -> 4) with saturation at 6, and stochastic rounding draws 8 random bits per element, as
the ``cvt.rs.satfinite.e2m1x4`` instruction does. The numerics are plain PyTorch, so they run on any
device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_bpfree.fp4.constants import (
    E2M1_MAX,
    E2M1_VALUES,
    E8M0_BIAS,
    E8M0_MAX,
    MXFP4_BLOCK_SIZE,
    NVFP4_BLOCK_SIZE,
    NVFP4_TENSOR_SCALE_TARGET,
    ROUNDING_MODES,
    SCALE_RULES,
    UE4M3_MAX,
    UE5M3_MAX,
)
from lightning_bpfree.validation import check_choice, check_int


@dataclass(frozen=True)
class ScaleFormat:
    """An unsigned minifloat used for block scales.

    Args:
        name: display name, e.g. ``"ue4m3"``.
        exponent_bits: exponent field width (the code is ``exponent << mantissa_bits | mantissa``).
        mantissa_bits: mantissa field width.
        bias: exponent bias; a normal value is ``(1 + m / 2**mantissa_bits) * 2**(e - bias)``.
        max_value: largest finite value; block scales saturate there.
        subnormals: whether exponent field 0 encodes subnormals (and zero). E8M0 has neither: its
            code ``e`` is exactly ``2**(e - bias)``.

    The all-ones code (``nan_code``: 0x7F for UE4M3, 0xFF for UE5M3 and E8M0) is NaN, as in FP8 E4M3
    and the OCP E8M0 scale; ``max_value`` must lie below it. A block whose scale is NaN reads back NaN.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max_value: float
    subnormals: bool = True

    def __post_init__(self) -> None:
        if self.exponent_bits + self.mantissa_bits > 8:
            raise ValueError(f"scale format {self.name!r} must fit in 8 bits")
        all_ones = (2.0 - 2.0**-self.mantissa_bits) * 2.0 ** ((1 << self.exponent_bits) - 1 - self.bias)
        if not self.max_value < all_ones:
            raise ValueError(
                f"max_value of scale format {self.name!r} must lie below its all-ones (NaN) code's value "
                f"{all_ones:g}, got {self.max_value:g}"
            )

    @property
    def nan_code(self) -> int:
        """The NaN code: every bit of the format set."""
        return (1 << (self.exponent_bits + self.mantissa_bits)) - 1

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.bias if self.subnormals else -self.bias

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.min_normal_exponent - self.mantissa_bits)

    def round(self, value: torch.Tensor) -> torch.Tensor:
        """Round non-negative float32 ``value`` to this format (half to even), saturating at ``max_value``.

        Values below half the smallest subnormal round to 0 (there is no lower clamp); ``+inf`` saturates to
        ``max_value`` and NaN stays NaN.
        """
        value = torch.clamp(value.float(), max=self.max_value)
        exponent = torch.clamp(floor_log2(value), min=self.min_normal_exponent)
        ulp = torch.ldexp(torch.ones_like(value), exponent - self.mantissa_bits)
        # value / ulp is exact (ulp is a power of two) and torch.round rounds half to even.
        return torch.clamp(torch.round(value / ulp) * ulp, max=self.max_value)

    def encode(self, value: torch.Tensor) -> torch.Tensor:
        """Bit codes (uint8) of ``value``, which must already be representable (the output of ``round``); NaN
        gives ``nan_code``."""
        value = value.float()
        nan = torch.isnan(value)
        value = torch.where(nan, torch.zeros_like(value), value)
        exponent = torch.clamp(floor_log2(value), min=self.min_normal_exponent)
        normal = value >= 2.0**self.min_normal_exponent
        exponent_field = torch.where(normal, exponent + self.bias, torch.zeros_like(exponent))
        unit = torch.ldexp(torch.ones_like(value), exponent - self.mantissa_bits)
        mantissa = torch.round(value / unit).to(torch.int32)
        mantissa = torch.where(normal, mantissa - (1 << self.mantissa_bits), mantissa)
        bits = (exponent_field << self.mantissa_bits) | mantissa
        return torch.where(nan, torch.full_like(bits, self.nan_code), bits).to(torch.uint8)

    def decode(self, bits: torch.Tensor) -> torch.Tensor:
        """Float32 values of uint8 codes ``bits`` (``nan_code`` decodes to NaN)."""
        bits = bits.to(torch.int32)
        exponent_field = bits >> self.mantissa_bits
        mantissa = (bits & ((1 << self.mantissa_bits) - 1)).float()
        one = torch.ones_like(mantissa)
        values = torch.ldexp(one + mantissa / 2**self.mantissa_bits, exponent_field - self.bias)
        if self.subnormals:
            values = torch.where(exponent_field > 0, values, mantissa * self.smallest_subnormal)
        return torch.where(bits == self.nan_code, torch.full_like(values, float("nan")), values)


UE4M3 = ScaleFormat("ue4m3", exponent_bits=4, mantissa_bits=3, bias=7, max_value=UE4M3_MAX)
"""The FP8 E4M3 block scale of NVFP4 with its unused sign bit: max 448, smallest subnormal 2^-9."""
UE5M3 = ScaleFormat("ue5m3", exponent_bits=5, mantissa_bits=3, bias=15, max_value=UE5M3_MAX)
"""Unsigned E5M3 with IEEE-style reserved top exponent: max 61440 = 1.875 * 2^15, min normal 2^-14,
smallest subnormal 2^-17 (the Graphcore numerics). Pass another ``ScaleFormat`` for the 114688 variant."""
E8M0 = ScaleFormat("e8m0", exponent_bits=8, mantissa_bits=0, bias=E8M0_BIAS, max_value=E8M0_MAX, subnormals=False)
"""The OCP MX shared scale: a power of two 2^-127 .. 2^127; code 255 is NaN (a block holding NaN or Inf)."""


@dataclass(frozen=True)
class FP4Format:
    """E2M1 elements in blocks of ``block_size`` sharing one ``scale_format`` scale.

    Args:
        name: the name ``fake_quantize(fmt=...)`` accepts.
        block_size: elements per block along the last dimension (``block_size``^2 tiles in 2D mode).
        scale_format: the block-scale minifloat.
        scale_rule: ``"chain"`` (amax / 6 rounded to the scale format, optionally after a tensor scale;
            NVFP4 style), ``"mx_floor"`` (OCP MX: ``2^(floor(log2 amax) - 2)``, elements above 6
            saturate) or ``"mx_ceil"`` (``2^ceil(log2(amax / 6))``, never saturates).
        tensor_scale_target: with the chain rule, the FP32 tensor scale maps the tensor's amax onto
            ``6 * tensor_scale_target`` (448 for NVFP4, so the largest block scale lands on the E4M3 max);
            ``None`` means no tensor scale.
    """

    name: str
    block_size: int
    scale_format: ScaleFormat
    scale_rule: str = "chain"
    tensor_scale_target: float | None = None

    def __post_init__(self) -> None:
        check_choice("scale_rule", self.scale_rule, SCALE_RULES)
        # packing puts two codes in a byte, so a block must hold an even number of elements
        if check_int("block_size", self.block_size, low=2) % 2:
            raise ValueError(f"block_size must be an even number >= 2, got {self.block_size}")


FORMATS: dict[str, FP4Format] = {
    "nvfp4": FP4Format("nvfp4", NVFP4_BLOCK_SIZE, UE4M3, "chain", tensor_scale_target=NVFP4_TENSOR_SCALE_TARGET),
    "ue4m3": FP4Format("ue4m3", NVFP4_BLOCK_SIZE, UE4M3, "chain"),
    "ue5m3": FP4Format("ue5m3", NVFP4_BLOCK_SIZE, UE5M3, "chain", tensor_scale_target=NVFP4_TENSOR_SCALE_TARGET),
    "mxfp4": FP4Format("mxfp4", MXFP4_BLOCK_SIZE, E8M0, "mx_floor"),
    "mxfp4_ceil": FP4Format("mxfp4_ceil", MXFP4_BLOCK_SIZE, E8M0, "mx_ceil"),
}


def get_format(fmt: str | FP4Format) -> FP4Format:
    """The ``FP4Format`` named ``fmt`` (or ``fmt`` itself)."""
    if isinstance(fmt, FP4Format):
        return fmt
    return FORMATS[check_choice("fmt", fmt, FORMATS)]


def floor_log2(value: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(log2(value))`` (int32) of positive float32 values; 0 maps to -150 (below every format)."""
    mantissa, exponent = torch.frexp(value)
    # frexp gives value = mantissa * 2**exponent with mantissa in [0.5, 1).
    return torch.where(value > 0, exponent - 1, torch.full_like(exponent, -150))


def _e2m1_step(magnitude: torch.Tensor) -> torch.Tensor:
    """Grid spacing of E2M1 at ``magnitude``: 0.5 below 2, 1 below 4, 2 above."""
    return torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0))


def round_to_e2m1(x: torch.Tensor, rounding: str = "nearest", generator: torch.Generator | None = None) -> torch.Tensor:
    """Round float32 ``x`` (already divided by its block scale) to the E2M1 grid, saturating at +-6.

    ``nearest`` rounds half to even on the code, as ``cvt.rn.satfinite.e2m1`` does. ``stochastic``
    draws one 8-bit random integer ``r`` per element from ``generator`` and rounds ``|x|`` down after
    adding ``r / 256`` of the local grid step, so each value lands on one of its two neighbours with
    probabilities proportional to the distances (unbiased up to 1/256 of a step).

    Returns:
        float32 tensor of E2M1 values (signed; ``-0.0`` for negative inputs that round to zero).
    """
    check_choice("rounding", rounding, ROUNDING_MODES)
    magnitude = torch.clamp(x.abs(), max=E2M1_MAX)
    if rounding == "nearest":
        step = _e2m1_step(magnitude)
        # magnitude / step is exact; torch.round is half-to-even, and even integers are even codes.
        rounded = torch.round(magnitude / step) * step
    else:
        random_bits = torch.randint(0, 256, x.shape, generator=generator, device=x.device, dtype=torch.uint8)
        pushed = magnitude + random_bits.float() * (1.0 / 256.0) * _e2m1_step(magnitude)
        step = _e2m1_step(pushed)
        rounded = torch.clamp(torch.floor(pushed / step) * step, max=E2M1_MAX)
    return torch.copysign(rounded, x)


def e2m1_to_codes(values: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8, sign in bit 3) of E2M1 ``values``."""
    magnitude = values.abs()
    index = torch.where(magnitude < 4, torch.where(magnitude < 2, magnitude * 2, magnitude + 2), magnitude / 2 + 4)
    sign = torch.signbit(values).to(torch.uint8) << 3
    return index.to(torch.uint8) | sign


def codes_to_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Float32 E2M1 values of 4-bit ``codes`` (sign in bit 3)."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=codes.device)
    return table[codes.long() & 0xF]


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes a byte along the last dimension (even length): element ``2i`` in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"the last dimension must be even to pack two codes a byte, got {codes.shape[-1]}")
    pairs = codes.view(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 ``[..., n]`` -> 4-bit codes ``[..., 2n]``."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
