"""Bit-exact FP4 numerics: E2M1 ties, the NVFP4 scale chain, MX / UE5M3 / UE4M3 scales, packing, SR, RHT."""

import numpy as np
import pytest
import torch

from lightning_bpfree.fp4 import (
    E8M0,
    FORMATS,
    UE4M3,
    UE5M3,
    FP4Format,
    dequantize,
    fake_quantize,
    hadamard_matrix,
    quantize,
    random_hadamard_transform,
)
from lightning_bpfree.fp4.formats import codes_to_e2m1, e2m1_to_codes, pack_codes, round_to_e2m1, unpack_codes
from lightning_bpfree.fp4.hadamard import sylvester_hadamard


def test_e2m1_round_half_to_even_ties_and_saturation():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 6.5, 1e30, 0.24, 0.26, 2.75, -0.75, -5.0, -7.0])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, 0.0, 0.5, 3.0, -1.0, -4.0, -6.0])
    torch.testing.assert_close(round_to_e2m1(x), expected, atol=0, rtol=0)
    codes = e2m1_to_codes(round_to_e2m1(x))
    assert codes.tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 7, 7, 0, 1, 5, 10, 14, 15]


def test_e2m1_codes_cover_the_grid_and_pack_two_a_byte():
    codes = torch.arange(16, dtype=torch.uint8)
    values = codes_to_e2m1(codes)
    assert values[:8].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert torch.equal(e2m1_to_codes(values), codes)  # -0.0 keeps its sign bit
    packed = pack_codes(codes)
    assert packed.tolist()[:2] == [0x10, 0x32]  # even element in the low nibble
    assert torch.equal(unpack_codes(packed), codes)


def test_nvfp4_hand_vector_with_every_tie():
    # Tensor amax 5.25 gives S_enc = 2688 / 5.25 = 512; block 1 (amax 3) gets scale ue4m3(3 * 512/6) = 256,
    # so encode = 1 / (256 / 512) = 2 and the elements land exactly on the E2M1 ties.
    ties = [0.125, 0.375, 0.625, 0.875, 1.25, 1.75, 2.5, 3.0]
    x = torch.zeros(2, 16)
    x[0, 0] = 5.25
    x[1] = torch.tensor(ties + [-t for t in ties])
    q = quantize(x, "nvfp4")
    assert q.tensor_scale.item() == 1 / 512
    assert q.scale_bits.flatten().tolist() == [0x7E, 0x78]  # 448 = 1.75 * 2^8 and 256 = 2^8 in E4M3
    expected = torch.tensor([0.0, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0, 3.0])
    torch.testing.assert_close(fake_quantize(x)[1], torch.cat([expected, -expected]), atol=0, rtol=0)
    assert fake_quantize(x)[0, 0].item() == 5.25


def _reference_nvfp4_block_scales(x: np.ndarray, single_rounding: bool = True) -> np.ndarray:
    """Scalar float32 transcription of the kernel's scale chain, with PyTorch's float8 cast as the E4M3 rounding."""
    f32 = np.float32
    amax = f32(np.abs(x).max())
    s_enc = f32(2688.0) / amax if amax > 0 else f32(1.0)
    out = []
    for block in x.reshape(-1, 16):
        block_amax = f32(np.abs(block).max())
        unrounded = block_amax * (s_enc * f32(1.0 / 6.0)) if single_rounding else (block_amax / f32(6.0)) * s_enc
        clamped = torch.tensor(min(f32(unrounded), f32(448.0)), dtype=torch.float32)
        out.append(clamped.to(torch.float8_e4m3fn).float().item())
    return np.array(out, dtype=np.float32)


def test_nvfp4_block_scales_use_one_rounding_not_two():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=generator) * torch.rand(64, 1, generator=generator) * 10
    scales = quantize(x).block_scales().flatten().numpy()
    reference = _reference_nvfp4_block_scales(x.numpy())
    np.testing.assert_array_equal(scales, reference)
    # Tensor amax 1 and block amax 0.6785714: amax * 448 / 6 sits next to 304, the tie between the E4M3
    # values 288 and 320; one rounding lands above it (320), two roundings below (288).
    trap = torch.zeros(2, 16)
    trap[0, 0], trap[1, 0] = 1.0, 0.6785714
    assert quantize(trap).block_scales().flatten().tolist() == [448.0, 320.0]
    assert _reference_nvfp4_block_scales(trap.numpy(), single_rounding=False).tolist() == [448.0, 288.0]


def test_zero_tensor_and_zero_block():
    for fmt in FORMATS:
        zeros = torch.zeros(3, 64)
        q = quantize(zeros, fmt)
        assert torch.equal(dequantize(q), zeros) and torch.isfinite(q.tensor_scale)
        assert not q.codes.any()
    x = torch.zeros(1, 32)
    x[0, 16:] = torch.linspace(-3, 3, 16)
    q = quantize(x, "nvfp4")
    assert q.scale_bits[0, 0].item() == 0
    assert torch.equal(fake_quantize(x)[0, :16], torch.zeros(16))


def test_subnormal_and_underflowing_block_scales():
    # ue4m3 (no tensor scale): amax 6 * 3 * 2^-9 gives the E4M3 subnormal scale 3 * 2^-9 (code 3).
    x = torch.zeros(2, 16)
    x[0, 0] = 6 * 3 * 2.0**-9
    x[1, 0], x[1, 1] = 1e-4, -5e-5  # amax / 6 is below half the smallest subnormal 2^-9: scale 0, no clamp
    q = quantize(x, "ue4m3")
    assert q.scale_bits.flatten().tolist() == [3, 0]
    assert q.block_scales()[0].item() == 3 * 2.0**-9
    out = dequantize(q)
    assert out[0, 0].item() == x[0, 0].item()
    assert torch.equal(out[1], torch.zeros(16)) and torch.isfinite(out).all()
    # NVFP4: a tiny block next to a large one underflows the same way (literal zero scale).
    y = torch.zeros(2, 16)
    y[0, 0], y[1, 0] = 6.0, 1e-6
    assert quantize(y).scale_bits[1].item() == 0 and fake_quantize(y)[1, 0].item() == 0.0


def test_block_scale_clamped_before_the_cast():
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1] = 6000.0, 1.0  # 6000 / 6 = 1000 > 448: clamp, then elements saturate at 6
    q = quantize(x, "ue4m3")
    assert q.block_scales().item() == 448.0
    assert fake_quantize(x, "ue4m3")[0, :2].tolist() == [2688.0, 0.0]


def test_two_d_blocks_share_one_scale_per_tile():
    x = torch.zeros(32, 32)
    x[0, 0], x[15, 15] = 6.0, 0.75
    x[16:, 16:] = 0.5
    q = quantize(x, "ue4m3", block_2d=True)
    assert q.scale_bits.shape == (2, 2)
    assert q.block_scales().tolist() == [[1.0, 0.0], [0.0, 11 / 128]]  # 0.5 / 6 rounds to 11 * 2^-7
    two_d = fake_quantize(x, "ue4m3", block_2d=True)
    assert two_d[15, 15].item() == 1.0  # 0.75 is a tie at scale 1 -> 1
    assert fake_quantize(x, "ue4m3")[15, 15].item() == 0.75  # its own 1x16 block has scale 0.125
    assert torch.equal(fake_quantize(x.T.contiguous(), block_2d=True), fake_quantize(x, block_2d=True).T)


def test_mxfp4_scales_floor_rule_and_round_up_variant():
    x = torch.zeros(3, 32)
    x[0, :3] = torch.tensor([5.0, 2.5, 1.0])  # floor(log2 5) = 2 -> scale 1: 5 -> 4, 2.5 -> 2
    x[1, :2] = torch.tensor([7.0, 5.0])  # scale 1: 7 saturates to 6 (OCP rule)
    x[2, :2] = torch.tensor([0.3, 0.1])  # floor(log2 0.3) = -2 -> scale 2^-4
    q = quantize(x, "mxfp4")
    assert q.scale_bits.flatten().tolist() == [127, 127, 123]
    out = dequantize(q)
    assert out[0, :3].tolist() == [4.0, 2.0, 1.0]
    assert out[1, :2].tolist() == [6.0, 4.0]
    assert out[2, :2].tolist() == [0.25, 0.09375]  # 0.1 * 16 = 1.6 -> 1.5
    ceil = quantize(x, "mxfp4_ceil")  # 2^ceil(log2(amax / 6)): 7/6 -> 2, no saturation
    assert ceil.scale_bits.flatten().tolist() == [127, 128, 123]
    assert dequantize(ceil)[1, :2].tolist() == [8.0, 4.0]  # 3.5 -> 4 and 2.5 -> 2, times 2


def test_ue5m3_range_beyond_e4m3():
    raw = FP4Format("ue5m3_raw", 16, UE5M3)  # the scale format alone, without a tensor scale
    x = torch.zeros(2, 16)
    x[0, 0] = 360000.0  # scale 60000 rounds to 61440 = 1.875 * 2^15, the UE5M3 max
    x[1, 0] = 6 * 2.0**-17  # scale 2^-17, the smallest UE5M3 subnormal (code 1)
    q = quantize(x, raw)
    assert q.block_scales().flatten().tolist() == [61440.0, 2.0**-17]
    assert q.scale_bits.flatten().tolist() == [0b11110111, 1]
    out = dequantize(q)
    assert out[0, 0].item() == 6 * 61440.0 and out[1, 0].item() == x[1, 0].item()
    # The "ue5m3" format adds the FP32 tensor scale (target 448): a block 10^6 times below the tensor's
    # amax still gets a scale (10 * 2^-17), where an E4M3 block scale underflows to 0.
    y = torch.zeros(2, 16)
    y[0, 0], y[1, 0] = 6.0, 1e-6
    assert quantize(y, "ue5m3").scale_bits[1].item() == 10 and fake_quantize(y, "nvfp4")[1, 0].item() == 0.0
    assert abs(fake_quantize(y, "ue5m3")[1, 0].item() - 1e-6) < 0.1e-6


def test_ue4m3_scale_format_matches_torch_float8():
    values = torch.cat([torch.rand(20000) * 480, torch.rand(20000) * 0.02, torch.rand(2000) * 2.0**-9])
    reference = torch.clamp(values, max=448).to(torch.float8_e4m3fn)
    assert torch.equal(UE4M3.round(values), reference.float())
    assert torch.equal(UE4M3.encode(UE4M3.round(values)), reference.view(torch.uint8))
    codes = torch.arange(127, dtype=torch.uint8)  # every finite non-negative code
    assert torch.equal(UE4M3.decode(codes), codes.view(torch.float8_e4m3fn).float())
    assert UE5M3.max_value == float(UE5M3.decode(torch.tensor([0b11110111], dtype=torch.uint8)))
    assert E8M0.decode(torch.tensor([0, 127, 254], dtype=torch.uint8)).tolist() == [2.0**-127, 1.0, 2.0**127]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("block_2d", [False, True])
def test_packed_round_trip_equals_fake_quantize(fmt, block_2d):
    x = (torch.randn(2, 64, 96) * 3).to(torch.bfloat16)
    q = quantize(x, fmt, block_2d=block_2d)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (2, 64, 48)
    block = FORMATS[fmt].block_size
    assert q.nbytes == x.numel() // 2 + x.numel() // (block * block if block_2d else block) + 4
    out = dequantize(q)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.equal(out, fake_quantize(x, fmt, block_2d=block_2d))
    rebuilt = type(q)(
        pack_codes(unpack_codes(q.codes)), q.scale_bits, q.tensor_scale, q.fmt, q.shape, q.dtype, block_2d
    )
    assert torch.equal(dequantize(rebuilt), out)


def test_mx_fake_quantize_is_idempotent_and_error_is_bounded():
    x = torch.randn(16, 128)
    once = fake_quantize(x, "mxfp4")
    assert torch.equal(fake_quantize(once, "mxfp4"), once)
    for fmt in FORMATS:
        relative = (fake_quantize(x, fmt) - x).norm() / x.norm()
        assert 0.02 < relative < 0.15, (fmt, relative)


def test_padding_and_bad_inputs():
    x = torch.randn(5, 20)
    with pytest.raises(ValueError, match="multiple of the nvfp4 block size 16"):
        quantize(x)
    with pytest.raises(ValueError, match="second-to-last"):
        fake_quantize(torch.randn(20, 32), block_2d=True)
    padded = fake_quantize(x, pad=True)
    assert padded.shape == x.shape
    assert torch.equal(padded[:, :16], fake_quantize(torch.nn.functional.pad(x, (0, 12)))[:, :16])
    assert dequantize(quantize(x, pad=True)).shape == x.shape
    with pytest.raises(ValueError, match="fmt must be one of"):
        fake_quantize(torch.randn(2, 16), fmt="fp4")
    with pytest.raises(ValueError, match="rounding must be one of"):
        fake_quantize(torch.randn(2, 16), rounding="up")
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.ones(2, 16, dtype=torch.int32))
    with pytest.raises(TypeError, match="QuantizedTensor"):
        dequantize(torch.zeros(2))


def test_stochastic_rounding_is_unbiased_and_stays_on_neighbours():
    generator = torch.Generator().manual_seed(0)
    for value, low, high in ((1.2, 1.0, 1.5), (5.0, 4.0, 6.0), (-0.1, -0.5, 0.0), (2.75, 2.0, 3.0)):
        x = torch.full((200_000,), value)
        out = round_to_e2m1(x, "stochastic", generator)
        assert set(out.unique().tolist()) == {low, high}
        assert abs(out.mean().item() - value) < 4e-3, value
    block = torch.randn(64, 32)
    draws = torch.stack([fake_quantize(block, rounding="stochastic", generator=generator) for _ in range(400)])
    nearest = fake_quantize(block)
    assert (draws.mean(0) - block).abs().mean() < 0.25 * (nearest - block).abs().mean()
    first = fake_quantize(block, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    again = fake_quantize(block, rounding="stochastic", generator=torch.Generator().manual_seed(3))
    other = fake_quantize(block, rounding="stochastic", generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_hadamard_is_orthogonal_and_cancels_in_a_product():
    h16 = sylvester_hadamard(16)
    assert torch.equal(h16 @ h16.T, 16 * torch.eye(16))
    matrix = hadamard_matrix()
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(16), atol=1e-6, rtol=0)
    a, b = torch.randn(8, 64), torch.randn(12, 64)
    rotated = random_hadamard_transform(a, output_dtype=None) @ random_hadamard_transform(b, output_dtype=None).T
    torch.testing.assert_close(rotated, a @ b.T, atol=1e-4, rtol=1e-5)
    assert random_hadamard_transform(a).dtype == torch.float32
    assert torch.equal(random_hadamard_transform(a), random_hadamard_transform(a).bfloat16().float())
    with pytest.raises(ValueError, match="power of two"):
        sylvester_hadamard(12)
    with pytest.raises(ValueError, match="multiple of the RHT size"):
        random_hadamard_transform(torch.randn(3, 20))
