"""Bad input and non-finite values at every public FP4 entry point (issue 15).

Every wrong argument gets a ``TypeError`` / ``ValueError`` naming it; non-finite data follows the
documented semantics (docs/fp4.md, "Bad input and non-finite values").
"""

import math

import pytest
import torch
from torch import nn

from lightning_bpfree.fp4 import (
    E8M0,
    UE4M3,
    UE5M3,
    FP4Linear,
    FP4Precision,
    FP4Recipe,
    NVFP4Precision,
    OperandSpec,
    ScaleFormat,
    convert_to_fp4,
    dequantize,
    fake_quantize,
    fp4_linear,
    quantize,
    random_hadamard_transform,
)

FORMAT_NAMES = ("nvfp4", "ue4m3", "ue5m3", "mxfp4", "mxfp4_ceil")
NAN, INF = float("nan"), float("inf")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal with NaN at the same places (torch.equal on NaN-aware terms)."""
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


# -- section 2 item 6: booleans refuse strings -------------------------------------------------------
@pytest.mark.parametrize("flag", ["stochastic_rounding", "rht", "two_d_weights", "rht_bf16"])
@pytest.mark.parametrize("value", ["false", 0, 1, None])
def test_recipe_flags_refuse_non_bools(flag, value):
    with pytest.raises(TypeError, match=flag):
        FP4Recipe(**{flag: value})


@pytest.mark.parametrize("flag", ["block_2d", "rht"])
def test_operand_spec_flags_refuse_non_bools(flag):
    spec = {"fmt": "nvfp4", "rounding": "nearest", "block_2d": False, "rht": False}
    with pytest.raises(TypeError, match=flag):
        OperandSpec(**{**spec, flag: "false"})


@pytest.mark.parametrize("flag", ["block_2d", "pad"])
@pytest.mark.parametrize("function", [quantize, fake_quantize])
def test_quantize_flags_refuse_non_bools(function, flag):
    with pytest.raises(TypeError, match=flag):
        function(torch.ones(16, 16), **{flag: "false"})


def test_fp4_linear_bias_flag_refuses_strings():
    with pytest.raises(TypeError, match="bias"):
        FP4Linear(16, 16, bias="false")


# -- section 2 item 7: NVFP4Precision refuses non-NVFP4 preset names -----------------------------------
@pytest.mark.parametrize("name", ["mxfp4", "ue5m3"])
def test_nvfp4_precision_refuses_other_presets_by_name(name):
    with pytest.raises(ValueError, match="NVFP4"):
        NVFP4Precision(name)
    with pytest.raises(ValueError, match="NVFP4"):
        NVFP4Precision(FP4Recipe.preset(name))


def test_nvfp4_precision_accepts_its_own_preset_and_refuses_junk():
    assert NVFP4Precision("nvfp4", backend="emulate").recipe == FP4Recipe()
    with pytest.raises(ValueError, match="recipe"):
        NVFP4Precision("nvfp5")
    with pytest.raises(TypeError, match="recipe"):
        NVFP4Precision(3)


# -- section 2 item 8: non-finite values ----------------------------------------------------------------
def _with_non_finite(fmt: str, value: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x with ``value`` at [0, 3], the same x with 0 there, mask of the block holding [0, 3])."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    block = 32 if fmt.startswith("mx") else 16
    clean = x.clone()
    clean[0, 3] = 0.0
    x[0, 3] = value
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[0, :block] = True
    return x, clean, mask


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_non_finite_element_never_changes_other_blocks(fmt, value, rounding):
    x, clean, mask = _with_non_finite(fmt, value)
    kwargs = {"rounding": rounding}
    out = fake_quantize(x, fmt, generator=torch.Generator().manual_seed(0), **kwargs)
    expected = fake_quantize(clean, fmt, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(out[~mask], expected[~mask])
    packed = dequantize(quantize(x, fmt, generator=torch.Generator().manual_seed(0), **kwargs))
    assert _same(packed, out)


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_nan_makes_its_block_nan_with_the_nan_scale_code(fmt):
    x, _, mask = _with_non_finite(fmt, NAN)
    out = fake_quantize(x, fmt)
    assert torch.isnan(out[mask]).all() and not torch.isnan(out[~mask]).any()
    q = quantize(x, fmt)
    scale_format = q.fmt.scale_format
    assert q.scale_bits[0, 0].item() == {"ue4m3": 0x7F, "ue5m3": 0xFF, "e8m0": 0xFF}[scale_format.name]
    assert torch.isfinite(q.tensor_scale)
    assert (q.scale_bits[1:] != scale_format.nan_code).all()


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp4_ceil"])
@pytest.mark.parametrize("value", [INF, -INF])
def test_mx_inf_block_reads_back_nan(fmt, value):
    x, _, mask = _with_non_finite(fmt, value)
    out = fake_quantize(x, fmt)
    assert torch.isnan(out[mask]).all() and torch.isfinite(out[~mask]).all()
    assert quantize(x, fmt).scale_bits[0, 0].item() == 0xFF


@pytest.mark.parametrize(("fmt", "scale_max"), [("nvfp4", 448.0), ("ue4m3", 448.0), ("ue5m3", 61440.0)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_chain_inf_saturates_its_block_scale(fmt, scale_max, sign):
    x, clean, mask = _with_non_finite(fmt, sign * INF)
    q = quantize(x, fmt)
    assert q.block_scales()[0, 0].item() == scale_max
    out = fake_quantize(x, fmt)
    assert out[0, 3].item() == sign * (torch.tensor(6.0 * scale_max) * q.tensor_scale).item()  # float32 decode
    assert torch.isfinite(out).all()
    if fmt == "nvfp4":  # the tensor scale comes from the finite elements: inf reads back about their amax
        assert math.isclose(abs(out[0, 3].item()), clean.abs().max().item(), rel_tol=1e-6)
    if fmt == "ue4m3":
        assert out[0, 3].item() == sign * 2688.0


def test_issue_examples_one_nan_or_inf_in_128_nvfp4_values():
    x = torch.randn(128, generator=torch.Generator().manual_seed(0))
    base = fake_quantize(x)
    for value in (NAN, INF):
        y = x.clone()
        y[5] = value
        out = fake_quantize(y)
        assert torch.equal(out[16:], base[16:])  # was: all NaN (NaN) / 118 of 127 changed (inf)
        assert _same(dequantize(quantize(y)), out)


def test_all_non_finite_tensor_has_unit_tensor_scale():
    q = quantize(torch.tensor([NAN, INF] * 8))
    assert q.tensor_scale.item() == 1.0
    assert torch.isnan(dequantize(q)).all()


def test_block_2d_nan_stays_in_its_tile():
    x = torch.randn(32, 32, generator=torch.Generator().manual_seed(2))
    x[3, 20] = NAN
    out = fake_quantize(x, block_2d=True)
    assert torch.isnan(out[:16, 16:]).all() and not torch.isnan(out[16:]).any() and not torch.isnan(out[:, :16]).any()
    assert _same(dequantize(quantize(x, block_2d=True)), out)


@pytest.mark.parametrize("scale_format", [UE4M3, UE5M3, E8M0])
def test_scale_formats_encode_nan_to_the_all_ones_code(scale_format):
    bits = scale_format.encode(torch.tensor([NAN, scale_format.max_value]))
    assert bits[0].item() == scale_format.nan_code and bits[1].item() < scale_format.nan_code
    decoded = scale_format.decode(bits)
    assert math.isnan(decoded[0].item()) and decoded[1].item() == scale_format.max_value


def test_scale_format_max_must_lie_below_the_nan_code():
    with pytest.raises(ValueError, match="max_value"):
        ScaleFormat("bad", exponent_bits=4, mantissa_bits=3, bias=7, max_value=480.0)


# -- section 3: keep_high_precision=None -----------------------------------------------------------------
def test_keep_high_precision_none_keeps_no_layer_by_name():
    plugin = FP4Precision(keep_high_precision=None)
    assert plugin.keep_high_precision == ()
    model = nn.Sequential(nn.Linear(16, 16))
    model.lm_head = nn.Linear(16, 16)
    report = convert_to_fp4(model, keep_high_precision=None)
    assert report.converted == ["0", "lm_head"]


@pytest.mark.parametrize("patterns", [3, [1], ["lm_head", None]])
def test_keep_high_precision_refuses_non_strings(patterns):
    with pytest.raises(TypeError, match="keep_high_precision"):
        FP4Precision(keep_high_precision=patterns)
    with pytest.raises(TypeError, match="keep_high_precision"):
        convert_to_fp4(nn.Sequential(nn.Linear(16, 16)), keep_high_precision=patterns)


# -- the walk: numerics ---------------------------------------------------------------------------------
@pytest.mark.parametrize("function", [quantize, fake_quantize])
@pytest.mark.parametrize(
    ("x", "kwargs", "error", "match"),
    [
        ([1.0] * 16, {}, TypeError, "x must be"),
        (torch.ones(16, dtype=torch.int32), {}, TypeError, "x must be"),
        (torch.ones(16, dtype=torch.bool), {}, TypeError, "x must be"),
        (torch.ones(16, dtype=torch.complex64), {}, TypeError, "x must be"),
        (torch.tensor(1.0), {}, ValueError, "x must be"),
        (torch.ones(0), {}, ValueError, "x must be"),
        (torch.ones(4, 0), {}, ValueError, "x must be"),
        (torch.ones(16), {"block_2d": True}, ValueError, "x must be"),
        (torch.ones(4, 15), {}, ValueError, "dimension of x"),
        (torch.ones(15, 16), {"block_2d": True}, ValueError, "dimension of x"),
        (torch.ones(4, 16), {"fmt": "nvfp8"}, ValueError, "fmt"),
        (torch.ones(4, 16), {"fmt": None}, ValueError, "fmt"),
        (torch.ones(4, 16), {"fmt": ["nvfp4"]}, ValueError, "fmt"),
        (torch.ones(4, 16), {"rounding": "up"}, ValueError, "rounding"),
        (torch.ones(4, 16), {"rounding": None}, ValueError, "rounding"),
        (torch.ones(4, 16), {"rounding": "stochastic", "generator": 0}, TypeError, "generator"),
    ],
)
def test_quantizers_refuse_bad_input(function, x, kwargs, error, match):
    with pytest.raises(error, match=match):
        function(x, **kwargs)


def test_quantizers_pad_and_accept_other_float_dtypes():
    assert fake_quantize(torch.ones(3, 15), pad=True).shape == (3, 15)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        assert fake_quantize(torch.ones(2, 16, dtype=dtype)).dtype == dtype


def test_dequantize_refuses_bad_input():
    with pytest.raises(TypeError, match="q must be"):
        dequantize(torch.ones(16))
    q = quantize(torch.ones(16))
    with pytest.raises(TypeError, match="dtype"):
        dequantize(q, torch.int32)
    with pytest.raises(TypeError, match="dtype"):
        dequantize(q, "float32")
    assert dequantize(q, torch.float64).dtype == torch.float64


# -- the walk: recipes -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"fmt": "fp4"}, ValueError, "fmt"),
        ({"formats": ["nvfp4"]}, TypeError, "formats"),
        ({"formats": {"fprop_input": "int4"}}, ValueError, "fmt"),
        ({"formats": {"input": "nvfp4"}}, ValueError, "formats"),
        ({"quantized_gemms": None}, TypeError, "quantized_gemms"),
        ({"quantized_gemms": "fprop"}, TypeError, "quantized_gemms"),
        ({"quantized_gemms": ("fprop", "backprop")}, ValueError, "quantized_gemms"),
        ({"rht_operands": 5}, TypeError, "rht_operands"),
        ({"rht_operands": ("fprop_input", "wgrad_input")}, ValueError, "rht_operands"),
        ({"rht_operands": ("wgrad_input",)}, ValueError, "rht_operands"),
        ({"stochastic_operands": None}, TypeError, "stochastic_operands"),
        ({"stochastic_operands": ("dY",)}, ValueError, "stochastic_operands"),
        ({"formats": {"fprop_weight": "mxfp4"}}, ValueError, "two_d_weights"),
        ({"unknown": 1}, TypeError, "unknown"),
    ],
)
def test_recipe_refuses_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        FP4Recipe(**kwargs)


def test_recipe_presets_and_operands_refuse_unknown_names():
    with pytest.raises(ValueError, match="recipe"):
        FP4Recipe.preset("int4")
    with pytest.raises(ValueError, match="operand"):
        FP4Recipe().operand("dX")
    with pytest.raises(ValueError, match="rounding"):
        OperandSpec("nvfp4", "down", False, False)
    with pytest.raises(ValueError, match="fmt"):
        OperandSpec("fp4", "nearest", False, False)


# -- the walk: layers -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("16", 16), {}, TypeError, "in_features"),
        ((16, 16.0), {}, TypeError, "out_features"),
        ((0, 16), {}, ValueError, "in_features"),
        ((-16, 16), {}, ValueError, "in_features"),
        ((16, 24), {}, ValueError, "out_features"),
        ((16, 16), {"recipe": "nvfp4"}, TypeError, "recipe"),
        ((16, 16), {"compute_dtype": torch.int8}, ValueError, "compute_dtype"),
        ((16, 16), {"seed": -1}, ValueError, "seed"),
        ((16, 16), {"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_fp4_linear_layer_refuses_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        FP4Linear(*args, **kwargs)


W = torch.ones(16, 16)


@pytest.mark.parametrize(
    ("x", "weight", "kwargs", "error", "match"),
    [
        ([1.0] * 16, W, {}, TypeError, "x must be"),
        (torch.ones(2, 16, dtype=torch.long), W, {}, TypeError, "x must be"),
        (torch.ones(2, 16), W.numpy(), {}, TypeError, "weight"),
        (torch.ones(2, 16), W.int(), {}, TypeError, "weight"),
        (torch.ones(2, 16), W, {"bias": torch.ones(8)}, ValueError, "bias"),
        (torch.ones(2, 16), W, {"bias": [0.0] * 16}, TypeError, "bias"),
        (torch.tensor(1.0), W, {}, ValueError, "x must be"),
        (torch.ones(0, 16), W, {}, ValueError, "x must be"),
        (torch.ones(2, 8), W, {}, ValueError, "weight"),
        (torch.ones(2, 16), torch.ones(16), {}, ValueError, "weight"),
        (torch.ones(2, 24), torch.ones(16, 24), {}, ValueError, "in_features"),
        (torch.ones(2, 16), W, {"recipe": "mxfp4"}, TypeError, "recipe"),
        (torch.ones(2, 16), W, {"generator": 0}, TypeError, "generator"),
        (torch.ones(2, 16), W, {"compute_dtype": "float32"}, ValueError, "compute_dtype"),
    ],
)
def test_fp4_linear_function_refuses_bad_input(x, weight, kwargs, error, match):
    with pytest.raises(error, match=match):
        fp4_linear(x, weight, **kwargs)


def test_fp4_linear_propagates_non_finite_input_only_to_its_rows():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    x[1, 2] = NAN
    out = fp4_linear(x, torch.randn(16, 16, generator=torch.Generator().manual_seed(4)))
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()


def test_convert_to_fp4_refuses_bad_input_and_leaves_the_model_unchanged():
    with pytest.raises(TypeError, match="module"):
        convert_to_fp4("model")
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    for kwargs, error, match in [
        ({"recipe": "nvfp4"}, TypeError, "recipe"),
        ({"compute_dtype": torch.int32}, ValueError, "compute_dtype"),
        ({"seed": -1}, ValueError, "seed"),
        ({"high_precision_first_n": -1}, ValueError, "high_precision_first_n"),
        ({"high_precision_last_n": 1.0}, TypeError, "high_precision_last_n"),
        ({"high_precision_last_n": 1}, ValueError, "high_precision_first_n/last_n"),
    ]:
        with pytest.raises(error, match=match):
            convert_to_fp4(model, **kwargs)
        assert all(type(m) is nn.Linear for m in model)


# -- the walk: plugins -------------------------------------------------------------------------------------
@pytest.mark.parametrize("plugin", [FP4Precision, NVFP4Precision])
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"switch_to_high_precision_at_step": -1}, ValueError, "switch_to_high_precision_at_step"),
        ({"switch_to_high_precision_at_step": 1.5}, TypeError, "switch_to_high_precision_at_step"),
        ({"switch_to_high_precision_at_step": NAN}, TypeError, "switch_to_high_precision_at_step"),
        ({"switch_gemms": None}, TypeError, "switch_gemms"),
        ({"switch_gemms": "fprop"}, TypeError, "switch_gemms"),
        ({"switch_gemms": ()}, ValueError, "switch_gemms"),
        ({"switch_gemms": ("forward",)}, ValueError, "switch_gemms"),
        ({"high_precision_first_n": -1}, ValueError, "high_precision_first_n"),
        ({"high_precision_last_n": "2"}, TypeError, "high_precision_last_n"),
        ({"compute_dtype": torch.float64}, ValueError, "compute_dtype"),
        ({"seed": "0"}, TypeError, "seed"),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"keep_high_precision": 5}, TypeError, "keep_high_precision"),
        ({"stochastic_rounding": False}, TypeError, "stochastic_rounding"),
    ],
)
def test_plugins_refuse_bad_input(plugin, kwargs, error, match):
    with pytest.raises(error, match=match):
        plugin(**kwargs)


def test_fp4_precision_refuses_unknown_recipes():
    with pytest.raises(ValueError, match="recipe"):
        FP4Precision("fp8")
    with pytest.raises(TypeError, match="recipe"):
        FP4Precision({"fmt": "nvfp4"})


# -- the walk: random Hadamard transform ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("x", "kwargs", "error", "match"),
    [
        ([1.0] * 16, {}, TypeError, "x must be"),
        (torch.ones(16, dtype=torch.int64), {}, TypeError, "x must be"),
        (torch.tensor(1.0), {}, ValueError, "x must have"),
        (torch.ones(2, 15), {}, ValueError, "dimension of x"),
        (torch.ones(16), {"signs": (1, 1, 1)}, ValueError, "signs"),
        (torch.ones(16), {"signs": (1, 0) * 8}, ValueError, "signs"),
        (torch.ones(16), {"signs": ()}, ValueError, "signs"),
        (torch.ones(16), {"signs": "abc"}, TypeError, "signs"),
        (torch.ones(16), {"output_dtype": "bf16"}, TypeError, "output_dtype"),
        (torch.ones(16), {"output_dtype": torch.int8}, TypeError, "output_dtype"),
    ],
)
def test_random_hadamard_transform_refuses_bad_input(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        random_hadamard_transform(x, **kwargs)


def test_random_hadamard_transform_keeps_non_finite_values_in_their_chunk():
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    x[0, 20] = INF
    out = random_hadamard_transform(x)
    assert not torch.isfinite(out[0, 16:]).any()
    assert torch.isfinite(out[0, :16]).all() and torch.isfinite(out[1]).all()
