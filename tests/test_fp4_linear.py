"""FP4 linear: forward and the three GEMMs' gradients equal autograd on the dequantized operands."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_fp4_golden import golden_e4m3, golden_quantize, golden_ue5m3

from lightning_bpfree.fp4 import FP4Linear, FP4Recipe, QuantizedTensor, fp4_linear
from lightning_bpfree.fp4 import linear as linear_module

# TransformerEngine's wgrad sign vector (transformer_engine/pytorch/tensor/nvfp4_tensor.py), written out
TE_SIGNS = [1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1]


def _golden_rht(t):
    """``diag(signs) @ H16 / 4`` on 16-element chunks of the last dimension, rounded to bf16 as TE does."""
    h16 = np.array([[1.0]])
    for _ in range(4):
        h16 = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h16)  # Sylvester construction
    matrix = torch.tensor(np.array(TE_SIGNS, dtype=np.float64)[:, None] * h16 / 4, dtype=torch.float32)
    return (t.reshape(-1, 16) @ matrix).reshape(t.shape).bfloat16().float()


def _operands(tokens=40, in_features=32, out_features=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens // 2, in_features, generator=generator, requires_grad=True)
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.2).requires_grad_()
    bias = torch.randn(out_features, generator=generator, requires_grad=True)
    grad_out = torch.randn(2, tokens // 2, out_features, generator=generator)
    return x, weight, bias, grad_out


def _reference(x, weight, bias, grad_out, recipe, seed):
    """The recipe's GEMMs on operands quantized by the independent ``golden_quantize`` (no package numerics)."""
    generator = torch.Generator().manual_seed(seed)
    scale_rounds = {"nvfp4": golden_e4m3, "ue5m3": golden_ue5m3}

    def q(t, name):
        spec = recipe.operand(name)
        return golden_quantize(t, scale_rounds[spec.fmt], spec.block_2d, spec.rounding, generator)

    x2, dy = x.detach().reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    x_q, w_q = q(x2, "fprop_input"), q(weight.detach(), "fprop_weight")
    output = F.linear(x_q, w_q, bias.detach())
    w_d = w_q if recipe.two_d_weights else q(weight.detach().T, "dgrad_weight").T
    grad_input = q(dy, "dgrad_grad_output") @ w_d
    pad = -dy.shape[0] % 16

    def wgrad_operand(t, name):
        t = F.pad(t, (0, pad))
        if recipe.operand(name).rht:
            t = _golden_rht(t)
        return q(t, name)

    x_t = wgrad_operand(x2.T, "wgrad_input")  # quantized in forward, so it draws first only if stochastic
    grad_weight = wgrad_operand(dy.T, "wgrad_grad_output") @ x_t.T
    return output.reshape(*x.shape[:-1], -1), grad_input.reshape(x.shape), grad_weight, dy.sum(0)


@pytest.mark.parametrize(
    "recipe",
    [FP4Recipe(), FP4Recipe(rht=False, stochastic_rounding=False, two_d_weights=False), FP4Recipe.ue5m3()],
    ids=["nvfp4", "nvfp4-plain", "ue5m3"],
)
def test_forward_and_gradients_equal_autograd_on_dequantized_operands(recipe):
    x, weight, bias, grad_out = _operands()  # 40 tokens: wgrad pads them to 48
    output = fp4_linear(x, weight, bias, recipe, generator=torch.Generator().manual_seed(7))
    output.backward(grad_out)
    ref_out, ref_dx, ref_dw, ref_db = _reference(x, weight, bias, grad_out, recipe, seed=7)
    torch.testing.assert_close(output, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(x.grad, ref_dx, atol=0, rtol=0)
    torch.testing.assert_close(weight.grad, ref_dw, atol=0, rtol=0)
    torch.testing.assert_close(bias.grad, ref_db, atol=0, rtol=0)


def test_gradients_approximate_the_high_precision_ones():
    x, weight, bias, grad_out = _operands(tokens=256, in_features=64, out_features=64)
    fp4_linear(x, weight, bias, generator=torch.Generator().manual_seed(11)).backward(grad_out)
    fp4_grads = x.grad.clone(), weight.grad.clone()
    _, golden_dx, golden_dw, _ = _reference(x, weight, bias, grad_out, FP4Recipe(), seed=11)
    x.grad = weight.grad = None
    F.linear(x, weight, bias).backward(grad_out)
    for approx, golden, exact in zip(fp4_grads, (golden_dx, golden_dw), (x.grad, weight.grad)):
        relative = ((approx - exact).norm() / exact.norm()).item()
        assert 0.01 < relative < 0.3, relative
        # the distance to the fp32 gradient is exactly the independent reference's, not merely "small"
        assert torch.equal(approx, golden)
        assert relative == ((golden - exact).norm() / exact.norm()).item()


def test_no_quantized_gemm_is_exactly_nn_linear():
    x, weight, bias, grad_out = _operands()
    output = fp4_linear(x, weight, bias, FP4Recipe(quantized_gemms=()))
    output.backward(grad_out)
    grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    reference = F.linear(x, weight, bias)
    reference.backward(grad_out)
    assert torch.equal(output, reference)
    torch.testing.assert_close(grads, (x.grad, weight.grad), atol=1e-6, rtol=1e-6)


def test_only_packed_fp4_tensors_are_saved_for_backward():
    x, weight, bias, _ = _operands()
    output = fp4_linear(x, weight, bias)
    node = output.grad_fn
    assert node.saved_tensors == (None, None)
    assert isinstance(node.wgrad_input, QuantizedTensor) and node.wgrad_input.codes.dtype == torch.uint8
    assert isinstance(node.dgrad_weight, QuantizedTensor) and not node.dgrad_weight_transposed  # 2D: reused
    assert node.wgrad_input.codes.numel() == x.shape[-1] * 48 // 2  # [in_features, tokens padded to 48] / 2
    no_2d = fp4_linear(x, weight, bias, FP4Recipe(two_d_weights=False)).grad_fn
    assert no_2d.dgrad_weight_transposed  # 1x16 blocks along out_features need their own copy
    frozen = fp4_linear(x, weight.detach(), None).grad_fn
    assert frozen.wgrad_input is None  # no weight gradient, nothing kept for wgrad


def test_hadamard_transform_runs_only_on_wgrad_operands(monkeypatch):
    calls = []
    original = linear_module.random_hadamard_transform

    def counting(t, *args, **kwargs):
        calls.append(tuple(t.shape))
        return original(t, *args, **kwargs)

    monkeypatch.setattr(linear_module, "random_hadamard_transform", counting)
    x, weight, bias, grad_out = _operands()
    fp4_linear(x, weight, bias).backward(grad_out)
    assert calls == [(32, 48), (48, 48)]  # X^T and dY^T, tokens padded to 48
    calls.clear()
    fp4_linear(x, weight, bias, FP4Recipe(rht=False)).backward(grad_out)
    assert calls == []


def test_stochastic_rounding_depends_on_the_generator_only():
    x, weight, bias, grad_out = _operands()
    grads = []
    for seed in (1, 1, 2):
        x.grad = weight.grad = None
        fp4_linear(x, weight, bias, generator=torch.Generator().manual_seed(seed)).backward(grad_out)
        grads.append((x.grad.clone(), weight.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert not torch.equal(grads[0][0], grads[2][0]) and not torch.equal(grads[0][1], grads[2][1])


def test_module_shares_parameters_and_switches_off():
    linear = torch.nn.Linear(32, 16)
    layer = FP4Linear.from_linear(linear, FP4Recipe(), seed=3)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(4, 32)
    assert not torch.equal(layer(x), linear(x))
    layer.fp4_enabled = False
    assert torch.equal(layer(x), linear(x))
    bf16 = FP4Linear.from_linear(linear, compute_dtype=torch.bfloat16)
    layer.fp4_enabled = True
    torch.testing.assert_close(bf16(x), layer(x), atol=0.05, rtol=0.02)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="divisible by 16"):
        FP4Linear(30, 32)
    with pytest.raises(ValueError, match="divisible by 32"):
        FP4Linear(48, 32, recipe=FP4Recipe.mxfp4())
    with pytest.raises(ValueError, match="compute_dtype"):
        FP4Linear(32, 32, compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="FP4Recipe"):
        fp4_linear(torch.randn(2, 32), torch.randn(16, 32), recipe="nvfp4")
    with pytest.raises(ValueError, match="does not match"):
        fp4_linear(torch.randn(2, 16), torch.randn(16, 32))
    with pytest.raises(ValueError, match="quantized_gemms"):
        FP4Recipe(quantized_gemms=("forward",))
    with pytest.raises(ValueError, match="both wgrad operands"):
        FP4Recipe(rht_operands=("wgrad_input",))
    with pytest.raises(ValueError, match="fmt must be one of"):
        FP4Recipe(formats={"fprop_input": "int4"})
    with pytest.raises(ValueError, match="two_d_weights"):
        FP4Recipe(formats={"dgrad_weight": "mxfp4"})


def test_recipe_resolves_operands_and_round_trips():
    recipe = FP4Recipe()
    assert recipe.operand("fprop_weight").block_2d and recipe.operand("fprop_weight").rounding == "nearest"
    assert recipe.operand("dgrad_grad_output").rounding == "stochastic"
    assert recipe.operand("wgrad_input").rht and not recipe.operand("fprop_input").rht
    mixed = FP4Recipe(formats={"wgrad_grad_output": "mxfp4"}, two_d_weights=False)
    assert mixed.operand("wgrad_grad_output").fmt == "mxfp4" and mixed.block_multiple() == 32
    assert FP4Recipe.from_dict(mixed.to_dict()) == mixed
    assert FP4Recipe.ue5m3().operand("wgrad_input").rht is False
