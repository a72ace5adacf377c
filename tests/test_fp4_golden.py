"""Golden FP4 vectors derived without the package's own code.

Every expected value here comes from one of three independent sources:

- hand-worked E2M1 rounding (each derivation written in a comment);
- PyTorch's own ``.to(torch.float8_e4m3fn)`` cast for the E4M3 block scales (clamped to 448 first,
  because the cast does not saturate);
- the published formulas written out: TransformerEngine's NVFP4 scale chain (global encode scale
  ``S_enc = 448 * 6 / amax``, block scale ``e4m3(block_amax / 6 * S_enc)`` evaluated in the kernel's order
  ``block_amax * (S_enc * (1/6))``, decode ``code * block_scale / S_enc`` with the stored float32 decode
  scale ``1 / S_enc``) and the OCP MX E8M0 rule ``2^(floor(log2 amax) - 2)``.

``golden_quantize`` below is the independent reference quantizer that ``test_fp4_linear`` also uses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_bpfree.fp4 import dequantize, fake_quantize, quantize
from lightning_bpfree.fp4.formats import round_to_e2m1

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # code index 0..7 (sign in bit 3)
FLT_MAX = float(np.finfo(np.float32).max)


def golden_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value of float32 ``x``, ties to the even code index, saturating at +-6.

    A brute-force search over the eight grid points: no step arithmetic, so it shares nothing with the
    package's ``round_to_e2m1``.
    """
    magnitude = x.abs().clamp(max=6.0)
    distance = (magnitude[..., None] - E2M1_GRID).abs()
    tied = distance == distance.min(dim=-1, keepdim=True).values
    # a tie is always between two neighbouring codes, one even and one odd: prefer the even one
    preference = torch.where(tied, 1 + (torch.arange(8) % 2 == 0).int(), 0)
    return torch.copysign(E2M1_GRID[preference.argmax(dim=-1)], x)


def golden_e2m1_stochastic(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """TransformerEngine's software stochastic rounding (8 random bits an element), written out.

    ``u = r / 256``; ``step = 0.5 | 1 | 2`` for ``|x| < 2 | < 4 | <= 6``; ``t = |x| + u * step``;
    ``q = min(floor(t / step_t) * step_t, 6)`` with ``step_t`` taken at ``t``; the sign is kept. The bits
    are drawn in row-major order of the padded tensor, one ``randint(0, 256)`` per element.
    """
    r = torch.randint(0, 256, x.shape, generator=generator, dtype=torch.uint8).float()

    def step(v: torch.Tensor) -> torch.Tensor:
        return torch.where(v < 2, 0.5, torch.where(v < 4, 1.0, 2.0))

    magnitude = x.abs().clamp(max=6.0)
    t = magnitude + (r / 256) * step(magnitude)
    return torch.copysign(torch.clamp(torch.floor(t / step(t)) * step(t), max=6.0), x)


def golden_e4m3(value: torch.Tensor) -> torch.Tensor:
    """Round to FP8 E4M3 with PyTorch's own cast, after the clamp to 448 (the cast does not saturate)."""
    return torch.clamp(value, max=448.0).to(torch.float8_e4m3fn).float()


def golden_ue5m3(value: torch.Tensor) -> torch.Tensor:
    """Round to unsigned E5M3 (bias 15, 3 mantissa bits, min normal 2^-14, max 61440), half to even.

    numpy's frexp gives ``v = m * 2^e`` with ``m`` in [0.5, 1), so the unit in the last place of a normal
    value is ``2^(e - 1 - 3)``; below 2^-14 the spacing stays at the subnormal ulp 2^-17. ``np.rint``
    rounds half to even.
    """
    v = np.minimum(value.numpy().astype(np.float64), 61440.0)
    _, e = np.frexp(v)
    ulp = np.exp2(np.maximum(e - 1, -14) - 3)
    return torch.from_numpy(np.minimum(np.rint(v / ulp) * ulp, 61440.0).astype(np.float32))


def golden_quantize(
    x: torch.Tensor,
    scale_round=golden_e4m3,
    block_2d: bool = False,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fake-quantize a 2-D float tensor with the TransformerEngine NVFP4 formula (blocks of 16).

    ``scale_round`` rounds the block scales (E4M3 for NVFP4, ``golden_ue5m3`` for the UE5M3 format, which
    keeps the same 448 tensor-scale target). Returns float32 of ``x``'s shape.
    """
    x = x.detach().float()
    rows, cols = x.shape
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    amax = x.abs().max()
    s_enc = f32(448.0 * 6.0) / amax if amax > 0 else f32(1.0)  # global encode scale
    s_enc = torch.clamp(s_enc, max=FLT_MAX)
    if block_2d:
        blocks = x.reshape(rows // 16, 16, cols // 16, 16)
        block_amax = blocks.abs().amax(dim=(1, 3))[:, None, :, None]
    else:
        blocks = x.reshape(rows, cols // 16, 16)
        block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = scale_round(block_amax * (s_enc * f32(1.0 / 6.0)))  # scale_round saturates
    decode_global = f32(1.0) / s_enc  # the float32 tensor scale stored with the codes
    encode = torch.clamp(f32(1.0) / (block_scale * decode_global), max=FLT_MAX)
    scaled = torch.clamp(blocks * encode, -6.0, 6.0).reshape(rows, cols)
    codes = golden_e2m1(scaled) if rounding == "nearest" else golden_e2m1_stochastic(scaled, generator)
    return ((codes.reshape(blocks.shape) * block_scale) * decode_global).reshape(rows, cols)


# --- E2M1 rounding: ties and near-ties, worked by hand -----------------------------------------------

BELOW = lambda v: float(np.nextafter(np.float32(v), np.float32(0)))  # noqa: E731  one float32 ulp closer to 0
ABOVE = lambda v: float(np.nextafter(np.float32(v), np.float32(10)))  # noqa: E731  one float32 ulp further out

HAND_E2M1 = [
    # (input, expected, derivation)
    (0.25, 0.0, "halfway 0 (code 0) / 0.5 (code 1): even code 0"),
    (0.75, 1.0, "halfway 0.5 (code 1) / 1.0 (code 2): even code 2"),
    (1.25, 1.0, "halfway 1.0 (code 2) / 1.5 (code 3): even code 2"),
    (1.75, 2.0, "halfway 1.5 (code 3) / 2.0 (code 4): even code 4"),
    (2.5, 2.0, "halfway 2 (code 4) / 3 (code 5): even code 4"),
    (3.5, 4.0, "halfway 3 (code 5) / 4 (code 6): even code 6"),
    (5.0, 4.0, "halfway 4 (code 6) / 6 (code 7): even code 6"),
    (BELOW(0.25), 0.0, "just below the 0/0.5 midpoint: nearer 0"),
    (ABOVE(0.25), 0.5, "just above the 0/0.5 midpoint: nearer 0.5"),
    (ABOVE(1.25), 1.5, "just above the 1/1.5 midpoint: nearer 1.5"),
    (ABOVE(2.5), 3.0, "just above the 2/3 midpoint: nearer 3"),
    (BELOW(3.5), 3.0, "just below the 3/4 midpoint: nearer 3"),
    (BELOW(5.0), 4.0, "just below the 4/6 midpoint: nearer 4"),
    (ABOVE(5.0), 6.0, "just above the 4/6 midpoint: nearer 6"),
    (6.0, 6.0, "the largest value"),
    (6.9, 6.0, "above 6 saturates (satfinite)"),
    (2.75, 3.0, "3/4 of the way from 2 to 3: nearer 3"),
    (-0.75, -1.0, "the sign is kept, the tie goes to the even code 2"),
    (-5.0, -4.0, "negative tie 4/6: even code 6"),
    (-7.0, -6.0, "negative saturation"),
]


def test_golden_e2m1_reference_reproduces_the_hand_derivations():
    x = torch.tensor([v for v, _, _ in HAND_E2M1])
    assert golden_e2m1(x).tolist() == [e for _, e, _ in HAND_E2M1]


def test_fake_quantize_rounds_ties_and_near_ties_as_derived_by_hand():
    # Each block of 16 holds 6.0, so its UE4M3 block scale is e4m3(6/6) = 1 (no tensor scale with "ue4m3")
    # and every element reaches the E2M1 rounding unscaled. Inputs above 6 would raise the block amax,
    # so saturation is checked on round-half-even's own entry point below.
    pairs = [(v, e) for v, e, _ in HAND_E2M1 if abs(v) <= 6]
    x = torch.zeros(2, 16)
    x[:, 0] = 6.0
    x.view(-1)[torch.tensor([i for i in range(32) if i % 16])[: len(pairs)]] = torch.tensor([v for v, _ in pairs])
    out = fake_quantize(x, "ue4m3")
    assert out.view(-1)[torch.tensor([i for i in range(32) if i % 16])[: len(pairs)]].tolist() == [e for _, e in pairs]
    saturating = [(v, e) for v, e, _ in HAND_E2M1 if abs(v) > 6]
    assert round_to_e2m1(torch.tensor([v for v, _ in saturating])).tolist() == [e for _, e in saturating]


# --- NVFP4 scales: the TE formula with torch's float8 cast -------------------------------------------


def test_nvfp4_hand_worked_scale_chain():
    # Tensor amax 6: S_enc = 448 * 6 / 6 = 448, decode scale fp32(1/448) (not exact: 448 = 7 * 2^6).
    # Block 0 (amax 6): 6/6 * 448 = 448 -> E4M3 448 = 1.75 * 2^8: exponent field 8 + 7 = 15, mantissa 110:
    #   byte 0b1111_110 = 0x7E. Element 6 -> encode 1 / (448 * fp32(1/448)) = 1 -> code 6, decoded as
    #   (6 * 448) * fp32(1/448) = 6.0000005 in float32, one ulp above 6; torchao's order
    #   (fp32(1/448) * 448) * 6 gives exactly 6 (docs/fp4.md, "Differences from torchao").
    # Block 1 (amax 3): 3/6 * 448 = 224 = 1.75 * 2^7: field 14, mantissa 110 -> 0x76; encode = 2, so
    #   3 -> 6 and 1.3 -> 2.6 -> 3 (nearer 3 than 2) and decode 3 * 224/448 = 1.5.
    # Block 2 (amax 0.01): 0.01/6 * 448 = 0.74667 -> E4M3 near 0.75 = 1.5 * 2^-1: field 6, mantissa 100
    #   -> 0x34; encode = 1 / (0.75/448) = 597.33, so 0.01 -> 5.97 -> code 6 -> 6 * 0.75/448 = 0.010044...
    x = torch.zeros(3, 16)
    x[0, 0], x[1, 0], x[1, 1], x[2, 0] = 6.0, 3.0, 1.3, 0.01
    q = quantize(x, "nvfp4")
    assert q.scale_bits.flatten().tolist() == [0x7E, 0x76, 0x34]
    assert q.tensor_scale.item() == np.float32(1.0) / np.float32(448.0)
    out = dequantize(q)
    f32, decode = np.float32, np.float32(1) / np.float32(448)
    assert out[0, 0].item() == float((f32(6) * f32(448)) * decode) == float(np.nextafter(f32(6), f32(7)))
    assert float((decode * f32(448)) * f32(6)) == 6.0  # the other multiplication order
    assert out[1, 0].item() == float((f32(6) * f32(224)) * decode)
    assert out[1, 1].item() == float((f32(3) * f32(224)) * decode)
    assert out[2, 0].item() == float((f32(6) * f32(0.75)) * decode)


@pytest.mark.parametrize("block_2d", [False, True])
def test_nvfp4_scale_bytes_and_values_equal_the_te_formula(block_2d):
    # Magnitudes from 1e-7 to 1e3 across rows, so blocks span subnormal, underflowing and large scales.
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(64, 128, generator=generator) * torch.logspace(-7, 3, 64)[:, None]
    q = quantize(x, "nvfp4", block_2d=block_2d)
    amax = x.abs().max()
    s_enc = torch.tensor(2688.0) / amax
    block_amax = x.reshape(4, 16, 8, 16).abs().amax(dim=(1, 3)) if block_2d else x.reshape(64, 8, 16).abs().amax(dim=-1)
    scale_byte = torch.clamp(block_amax * (s_enc * torch.tensor(1.0 / 6.0)), max=448.0).to(torch.float8_e4m3fn)
    assert torch.equal(q.scale_bits, scale_byte.view(torch.uint8))
    assert (q.scale_bits == 0).any() and (q.scale_bits >= 0x78).any()  # underflowing and large blocks occur
    assert torch.equal(dequantize(q), golden_quantize(x, block_2d=block_2d))
    assert torch.equal(fake_quantize(x, block_2d=block_2d), golden_quantize(x, block_2d=block_2d))


def test_ue5m3_and_stochastic_rounding_equal_the_written_out_formulas():
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(32, 64, generator=generator) * torch.logspace(-8, 1, 32)[:, None]
    assert torch.equal(fake_quantize(x, "ue5m3"), golden_quantize(x, scale_round=golden_ue5m3))
    ours = fake_quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(9))
    golden = golden_quantize(x, rounding="stochastic", generator=torch.Generator().manual_seed(9))
    assert torch.equal(ours, golden)


# --- MXFP4: E8M0 scales 2^(floor(log2 amax) - 2) ----------------------------------------------------


def test_mxfp4_e8m0_scales_follow_the_ocp_floor_rule():
    # amax 5     : floor(log2 5) = 2      -> 2^0  -> E8M0 code 0 + 127 = 127; 5 -> 5 is the 4/6 tie -> 4
    # amax 100   : floor(log2 100) = 6    -> 2^4  -> code 131; 100/16 = 6.25 saturates -> 6 -> 96
    # amax 0.3   : floor(log2 0.3) = -2   -> 2^-4 -> code 123; 0.3 * 16 = 4.8 -> 4 -> 0.25
    # amax 2^-20 : floor = -20            -> 2^-22 -> code 105; 2^-20 * 2^22 = 4 -> exact
    amaxes = [5.0, 100.0, 0.3, 2.0**-20]
    x = torch.zeros(4, 32)
    x[:, 0] = torch.tensor(amaxes)
    q = quantize(x, "mxfp4")
    assert q.scale_bits.flatten().tolist() == [math.floor(math.log2(a)) - 2 + 127 for a in amaxes]
    assert q.scale_bits.flatten().tolist() == [127, 131, 123, 105]
    assert dequantize(q)[:, 0].tolist() == [4.0, 96.0, 0.25, 2.0**-20]


# --- packing: element 2i in the low nibble ----------------------------------------------------------


def test_packed_nibble_order():
    # ue4m3 with a 6.0 in the block: scale 1. Codes: 6 -> 7, 0.5 -> 1, -6 -> 8|7 = 15, 3 -> 5, 1 -> 2,
    # -0.5 -> 8|1 = 9. Bytes pair (element 2i, element 2i+1) as low | high << 4.
    x = torch.zeros(1, 16)
    x[0, :6] = torch.tensor([6.0, 0.5, -6.0, 3.0, 1.0, -0.5])
    q = quantize(x, "ue4m3")
    assert q.codes[0, :3].tolist() == [0x17, 0x5F, 0x92]
    assert q.codes[0, 3:].tolist() == [0] * 5
