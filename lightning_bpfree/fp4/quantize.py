"""Block quantization to FP4: ``quantize`` (packed), ``dequantize`` and ``fake_quantize``.

The NVFP4 scale chain follows the kernel's order of operations exactly (all float32)::

    S_enc  = min(6 * 448 / amax_tensor, FLT_MAX)          (1 if amax is 0 or S_enc is 0)
    S_dec  = ue4m3(min(amax_block * (S_enc * (1/6)), 448)) one rounding, no lower clamp
    encode = min(1 / (S_dec * (1/S_enc)), FLT_MAX)
    code   = e2m1(clamp(x * encode, -6, 6))
    x_hat  = (e2m1_value * S_dec) * (1/S_enc)

so ``(amax_block / 6) * S_enc`` (two roundings) is *not* what is computed, a block whose scale
underflows gets a literal 0 scale (its elements dequantize to 0), and block scales are clamped to
448 before the cast (PyTorch's float8 cast does not saturate). Formats without a tensor scale run
the same chain with ``S_enc = 1``; MX formats use a power-of-two scale from the block amax's exponent.

Non-finite elements (NaN, +-inf) never change a value outside their own block (``1 x B`` block, or
``B x B`` tile with ``block_2d``):

- the tensor amax behind ``S_enc`` is taken over the finite elements only (0, so ``S_enc = 1``, when
  there are none);
- MX formats (``mxfp4``, ``mxfp4_ceil``), per the OCP MX v1.0 specification: a block holding any NaN or
  inf gets the NaN scale (E8M0 code 0xFF), so every element of that block reads back NaN;
- chain formats (``nvfp4``, ``ue4m3``, ``ue5m3``) evaluate the kernel formulas above with NaN
  propagating, as TransformerEngine's PyTorch reference quantizer does: a block holding a NaN has a NaN
  block amax, hence a NaN scale (the all-ones code: UE4M3 0x7F, UE5M3 0xFF), and the whole block reads
  back NaN. A block holding +-inf and no NaN has block amax +inf, so its scale saturates at the scale
  format's maximum ``M`` (448 for UE4M3, 61440 for UE5M3); each +-inf saturates to the E2M1 code +-6 and
  reads back ``+-(6 * M) * (1 / S_enc)`` (for ``nvfp4`` that is the largest magnitude the tensor scale
  can represent, about the tensor's finite amax; for ``ue4m3`` it is +-2688), and the block's finite
  elements are quantized on that coarse scale;
- a NaN-scale block stores E2M1 code 0 for every element; stochastic rounding draws the same random bits
  whatever the data, so the other blocks get exactly the values they get without the non-finite element.

``dequantize(quantize(x))`` equals ``fake_quantize(x)`` everywhere, non-finite inputs included (same NaN
positions, equal values elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_bpfree.fp4.constants import E2M1_MAX, E2M1_MAX_EXPONENT, FLOAT32_MAX, ROUNDING_MODES
from lightning_bpfree.fp4.formats import (
    FP4Format,
    codes_to_e2m1,
    e2m1_to_codes,
    floor_log2,
    get_format,
    pack_codes,
    round_to_e2m1,
    unpack_codes,
)
from lightning_bpfree.validation import check_bool, check_choice, check_float_tensor, check_generator


@dataclass
class QuantizedTensor:
    """The packed FP4 form of a tensor.

    Attributes:
        codes: uint8 ``[..., R, K_pad / 2]``: two E2M1 codes a byte, element ``2i`` in the low nibble.
        scale_bits: uint8 block-scale codes of ``fmt.scale_format``; ``[..., R, K_pad / B]`` for 1D blocks,
            ``[..., R_pad / B, K_pad / B]`` for 2D tiles (B the block size).
        tensor_scale: float32 0-dim decode scale ``1 / S_enc`` (1 for formats without a tensor scale).
        fmt: the format.
        shape: shape of the original tensor (before padding).
        dtype: dtype of the original tensor (what ``dequantize`` returns by default).
        block_2d: whether the blocks are ``B x B`` tiles over the last two dimensions.
    """

    codes: torch.Tensor
    scale_bits: torch.Tensor
    tensor_scale: torch.Tensor
    fmt: FP4Format
    shape: torch.Size
    dtype: torch.dtype
    block_2d: bool = False

    def block_scales(self) -> torch.Tensor:
        """Float32 block scales (same layout as ``scale_bits``)."""
        return self.fmt.scale_format.decode(self.scale_bits)

    def element_values(self) -> torch.Tensor:
        """Float32 E2M1 values of the padded tensor ``[..., R_pad, K_pad]`` (before scaling)."""
        return codes_to_e2m1(unpack_codes(self.codes))

    @property
    def nbytes(self) -> int:
        """Bytes held by codes, block scales and the tensor scale."""
        return self.codes.numel() + self.scale_bits.numel() + 4

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self, dtype)


def _check_input(x: torch.Tensor, fmt: FP4Format, block_2d: bool, pad: bool) -> None:
    check_float_tensor("x", x)
    if x.ndim < (2 if block_2d else 1) or x.numel() == 0:
        raise ValueError(f"x must be non-empty with at least {2 if block_2d else 1} dimension(s), got {tuple(x.shape)}")
    if pad:
        return
    block = fmt.block_size
    if x.shape[-1] % block:
        raise ValueError(
            f"the last dimension of x ({x.shape[-1]}) must be a multiple of the {fmt.name} block size {block}; "
            "pass pad=True to zero-pad it"
        )
    if block_2d and x.shape[-2] % block:
        raise ValueError(
            f"with block_2d=True the second-to-last dimension of x ({x.shape[-2]}) must be a multiple of "
            f"the {fmt.name} block size {block}; pass pad=True to zero-pad it"
        )


def _pad_to_blocks(x: torch.Tensor, block: int, block_2d: bool) -> torch.Tensor:
    pad_last = -x.shape[-1] % block
    pad_rows = -x.shape[-2] % block if block_2d else 0
    if pad_last or pad_rows:
        x = torch.nn.functional.pad(x, (0, pad_last, 0, pad_rows))
    return x


def _block_view(x: torch.Tensor, block: int, block_2d: bool) -> torch.Tensor:
    """``[..., R, K]`` -> ``[..., R, K/B, B]`` (1D) or ``[..., R/B, B, K/B, B]`` (2D)."""
    if block_2d:
        return x.reshape(*x.shape[:-2], x.shape[-2] // block, block, x.shape[-1] // block, block)
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _per_block(scale: torch.Tensor, block_2d: bool) -> torch.Tensor:
    """Block-grid tensor broadcastable against ``_block_view``."""
    return scale[..., :, None, :, None] if block_2d else scale[..., None]


def tensor_encode_scale(amax: torch.Tensor, fmt: FP4Format) -> torch.Tensor:
    """The float32 tensor encode scale ``S_enc`` of the chain rule (1 without a tensor scale)."""
    if fmt.scale_rule != "chain" or fmt.tensor_scale_target is None:
        return torch.ones((), dtype=torch.float32, device=amax.device)
    target = torch.tensor(E2M1_MAX * fmt.tensor_scale_target, dtype=torch.float32, device=amax.device)
    scale = torch.clamp(target / amax, max=FLOAT32_MAX)
    return torch.where((amax == 0) | (scale == 0), torch.ones_like(scale), scale)


def _scales_and_values(
    x: torch.Tensor, fmt: FP4Format, block_2d: bool, rounding: str, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize padded float32 ``x``: returns (E2M1 values in the block view, block scales, tensor decode scale)."""
    blocks = _block_view(x, fmt.block_size, block_2d)
    reduce_dims = (-3, -1) if block_2d else (-1,)
    # amax propagates NaN and inf, so a block holding either has a non-finite amax
    block_amax = blocks.abs().amax(dim=reduce_dims)
    if fmt.scale_rule == "chain":
        # the tensor amax ignores non-finite elements, so they cannot change other blocks
        finite_amax = torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x)).amax()
        s_enc = tensor_encode_scale(finite_amax, fmt)
        one = torch.ones((), dtype=torch.float32, device=x.device)
        sixth = torch.tensor(1.0 / E2M1_MAX, dtype=torch.float32, device=x.device)
        decode_tensor = one / s_enc
        # a NaN block amax stays NaN through the chain (a NaN scale); +inf saturates to the scale maximum
        block_scale = fmt.scale_format.round(block_amax * (s_enc * sixth))
        encode = torch.clamp(one / (block_scale * decode_tensor), max=FLOAT32_MAX)
        scaled = torch.clamp(blocks * _per_block(encode, block_2d), -E2M1_MAX, E2M1_MAX)
        nan_block = torch.isnan(block_scale)
    else:
        if fmt.scale_rule == "mx_floor":
            exponent = floor_log2(block_amax) - E2M1_MAX_EXPONENT
        else:  # mx_ceil: smallest power of two not below amax / 6
            ratio = block_amax / E2M1_MAX
            exponent = floor_log2(ratio) + (torch.frexp(ratio).mantissa != 0.5).to(torch.int32)
        exponent = torch.clamp(exponent, -fmt.scale_format.bias, fmt.scale_format.bias)
        # OCP MX: a block holding NaN or Inf gets the NaN scale (E8M0 0xFF)
        nan_block = ~torch.isfinite(block_amax)
        block_scale = torch.where(nan_block, float("nan"), torch.ldexp(torch.ones_like(block_amax), exponent))
        decode_tensor = torch.ones((), dtype=torch.float32, device=x.device)
        scaled = torch.ldexp(blocks, -_per_block(exponent, block_2d))
    # Elements of a NaN-scale block are stored as code 0; they decode to NaN through the scale. The
    # random draws of stochastic rounding do not depend on the data, so finite blocks are unchanged.
    values = round_to_e2m1(scaled, rounding, generator)
    values = torch.where(_per_block(nan_block, block_2d), torch.zeros_like(values), values)
    return values, block_scale, decode_tensor


def _quantize_blocks(
    x: torch.Tensor, fmt: str | FP4Format, block_2d: bool, rounding: str, generator: torch.Generator | None, pad: bool
) -> tuple[FP4Format, torch.Size, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check, pad and quantize ``x``, the part ``quantize`` and ``fake_quantize`` share.

    Returns:
        (format, padded shape, E2M1 values in the block view, block scales, tensor decode scale).
    """
    fmt = get_format(fmt)
    check_choice("rounding", rounding, ROUNDING_MODES)
    check_bool("block_2d", block_2d)
    check_bool("pad", pad)
    check_generator("generator", generator)
    _check_input(x, fmt, block_2d, pad)
    padded = _pad_to_blocks(x.float(), fmt.block_size, block_2d)
    return fmt, padded.shape, *_scales_and_values(padded, fmt, block_2d, rounding, generator)


def _decode(
    values: torch.Tensor,
    block_scale: torch.Tensor,
    tensor_scale: torch.Tensor,
    block_2d: bool,
    padded_shape: torch.Size,
    shape: torch.Size,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``(e2m1 * block_scale) * tensor_scale`` from the block view, cropped to ``shape``, in ``dtype``.

    The one decode of ``dequantize`` and ``fake_quantize``, so the two agree bit for bit.
    """
    decoded = ((values * _per_block(block_scale, block_2d)) * tensor_scale).reshape(padded_shape)
    if decoded.shape != shape:
        decoded = decoded[tuple(slice(0, n) for n in shape)]
    return decoded.to(dtype)


def quantize(
    x: torch.Tensor,
    fmt: str | FP4Format = "nvfp4",
    *,
    block_2d: bool = False,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    pad: bool = False,
) -> QuantizedTensor:
    """Quantize ``x`` to packed FP4 (codes two a byte, block scales, tensor scale).

    Args:
        x: floating-point tensor ``[..., K]`` (``[..., R, K]`` with ``block_2d``); blocks run along the
            last dimension.
        fmt: ``"nvfp4"``, ``"mxfp4"``, ``"mxfp4_ceil"``, ``"ue5m3"``, ``"ue4m3"`` or an ``FP4Format``.
        block_2d: ``B x B`` tiles over the last two dimensions (for weights) instead of ``1 x B`` blocks.
        rounding: ``"nearest"`` (half to even) or ``"stochastic"`` (8 random bits per element).
        generator: random source of stochastic rounding (on ``x``'s device); ``None`` uses the global one.
        pad: zero-pad dimensions that are not a multiple of the block size instead of raising.

    Returns:
        a ``QuantizedTensor``; ``dequantize`` of it equals ``fake_quantize(x, ...)`` bit for bit (NaN at the
        same places).

    Non-finite elements: see the module docstring. A block holding NaN (and, for MX formats, inf) gets the
    NaN scale code and E2M1 codes 0; inf in an ``nvfp4`` / ``ue4m3`` / ``ue5m3`` block saturates the
    block scale at its maximum and is stored as code +-6. The tensor scale is always finite and
    comes from the finite elements only.

    Raises:
        TypeError: ``x`` is not a floating-point tensor, a flag is not a bool, ``generator`` is not a
            ``torch.Generator``.
        ValueError: ``x`` is 0-d or empty (or 1-d with ``block_2d``), a blocked dimension is not a multiple
            of the block size and ``pad`` is off, or ``fmt`` / ``rounding`` is unknown.
    """
    fmt, padded_shape, values, block_scale, decode_tensor = _quantize_blocks(x, fmt, block_2d, rounding, generator, pad)
    codes = pack_codes(e2m1_to_codes(values.reshape(padded_shape)))
    return QuantizedTensor(codes, fmt.scale_format.encode(block_scale), decode_tensor, fmt, x.shape, x.dtype, block_2d)


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode ``q``: ``(e2m1 * block_scale) * tensor_scale``, cropped to the original shape.

    Returns:
        tensor of ``q.shape`` in ``dtype`` (default: the dtype ``q`` was quantized from).
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    values = q.element_values()
    blocks = _block_view(values, q.fmt.block_size, q.block_2d)
    return _decode(blocks, q.block_scales(), q.tensor_scale, q.block_2d, values.shape, q.shape, dtype or q.dtype)


def fake_quantize(
    x: torch.Tensor,
    fmt: str | FP4Format = "nvfp4",
    *,
    block_2d: bool = False,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    pad: bool = False,
) -> torch.Tensor:
    """Quantize ``x`` to FP4 and back: the values an FP4 GEMM would see, same shape and dtype as ``x``.

    Arguments and errors as in ``quantize``. Equal bit for bit to ``dequantize(quantize(x, ...))`` but skips
    packing.

    Non-finite elements never change a value outside their own block; their block reads back:

    - ``mxfp4`` / ``mxfp4_ceil``: all NaN if the block holds any NaN or inf (OCP MX NaN scale);
    - ``nvfp4`` / ``ue4m3`` / ``ue5m3``: all NaN if the block holds a NaN; with inf and no NaN, each +-inf
      reads back ``+-(6 * M) / S_enc`` (``M`` the block-scale maximum, 448 or 61440) and the block's finite
      elements are rounded on that saturated scale.
    """
    fmt, padded_shape, values, block_scale, decode_tensor = _quantize_blocks(x, fmt, block_2d, rounding, generator, pad)
    return _decode(values, block_scale, decode_tensor, block_2d, padded_shape, x.shape, x.dtype)
