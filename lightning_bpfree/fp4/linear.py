"""FP4 linear layer: one ``autograd.Function`` running the three GEMMs of a linear layer in FP4.

Forward (``fprop``): ``Y = Q(X) Q(W)^T + b``. Backward: ``dX = Q(dY) Q(W)`` (``dgrad``) and
``dW = Q(dY^T H) Q(X^T H)^T`` (``wgrad``, ``H`` the random Hadamard transform along the tokens),
``db = sum(dY)`` in high precision. Each ``Q`` is the operand's quantizer from the ``FP4Recipe``;
products run on the dequantized values in ``compute_dtype`` (float32 by default), which is what an
FP4 tensor-core GEMM with a float32 accumulator computes up to summation order. Gradients pass
straight through the quantizers (straight-through estimator).

Only quantized tensors are kept for backward where the recipe quantizes the GEMM that uses them:
the packed wgrad copy of ``X`` (4.5 bits an element with NVFP4) and the packed weight. Random
draws of stochastic rounding come from the layer's ``torch.Generator`` in a fixed order: dgrad's
``dY`` first, then wgrad's ``dY``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lightning_bpfree.fp4.constants import COMPUTE_DTYPES, WGRAD_OPERANDS, WGRAD_SIGNS
from lightning_bpfree.fp4.formats import get_format
from lightning_bpfree.fp4.hadamard import random_hadamard_transform
from lightning_bpfree.fp4.quantize import (
    QuantizedTensor,
    dequantize,
    fake_quantize,
    quantize,
)
from lightning_bpfree.fp4.recipe import FP4Recipe, OperandSpec, check_recipe
from lightning_bpfree.validation import (
    check_bool,
    check_choice,
    check_float_tensor,
    check_generator,
    check_positive_int,
    check_seed,
)


def _quantizer_kwargs(spec: OperandSpec, generator: torch.Generator | None) -> dict:
    return dict(fmt=spec.fmt, block_2d=spec.block_2d, rounding=spec.rounding, generator=generator)


def wgrad_token_multiple(recipe: FP4Recipe) -> int:
    """Token counts are zero-padded to this multiple for the wgrad GEMM (blocks and the RHT run along tokens)."""
    sizes = [get_format(recipe.operand(name).fmt).block_size for name in WGRAD_OPERANDS]
    if recipe.rht:
        sizes.append(len(WGRAD_SIGNS))
    return math.lcm(*sizes)


def wgrad_operand(
    transposed: torch.Tensor, recipe: FP4Recipe, name: str, generator: torch.Generator | None, packed: bool
) -> torch.Tensor | QuantizedTensor:
    """Quantize a wgrad operand ``[features, tokens]``: pad the tokens, rotate if configured, quantize.

    Zero tokens add nothing to ``dY^T X``, and the transform cancels between the two operands.
    """
    spec = recipe.operand(name)
    pad = -transposed.shape[-1] % wgrad_token_multiple(recipe)
    operand = F.pad(transposed.float(), (0, pad)) if pad else transposed.float()
    if spec.rht:
        operand = random_hadamard_transform(operand, output_dtype=torch.bfloat16 if recipe.rht_bf16 else None)
    if packed:
        return quantize(operand, **_quantizer_kwargs(spec, generator))
    return fake_quantize(operand, **_quantizer_kwargs(spec, generator))


class FP4LinearFunction(torch.autograd.Function):
    """``Y = X W^T + b`` with fprop, dgrad and wgrad quantized per an ``FP4Recipe``; use ``fp4_linear``."""

    @staticmethod
    def forward(ctx, x, weight, bias, recipe, generator, compute_dtype):
        inputs = x.reshape(-1, x.shape[-1])
        gemms = recipe.quantized_gemms
        weight_spec = recipe.operand("fprop_weight")
        packed_weight = None
        if "fprop" in gemms:
            inputs_q = fake_quantize(inputs, **_quantizer_kwargs(recipe.operand("fprop_input"), generator))
            packed_weight = quantize(weight, **_quantizer_kwargs(weight_spec, generator))
            weight_q = dequantize(packed_weight, torch.float32)
        else:
            inputs_q, weight_q = inputs, weight
        output = (inputs_q.to(compute_dtype) @ weight_q.to(compute_dtype).T).to(x.dtype)
        if bias is not None:
            output = output + bias.to(x.dtype)

        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.recipe, ctx.generator, ctx.compute_dtype = recipe, generator, compute_dtype
        ctx.input_shape, ctx.input_dtype, ctx.num_tokens = x.shape, x.dtype, inputs.shape[0]
        ctx.has_bias = bias is not None
        keep_input = need_dw and "wgrad" not in gemms
        keep_weight = need_dx and "dgrad" not in gemms
        ctx.save_for_backward(inputs if keep_input else None, weight if keep_weight else None)
        ctx.weight_dtype = weight.dtype
        ctx.wgrad_input = None
        if need_dw and "wgrad" in gemms:
            ctx.wgrad_input = wgrad_operand(inputs.T, recipe, "wgrad_input", generator, packed=True)
        ctx.dgrad_weight, ctx.dgrad_weight_transposed = None, False
        if need_dx and "dgrad" in gemms:
            dgrad_spec = recipe.operand("dgrad_weight")
            if packed_weight is not None and dgrad_spec == weight_spec and weight_spec.block_2d:
                # Square tiles hold the same values for W and W^T: reuse the forward copy.
                ctx.dgrad_weight = packed_weight
            else:
                ctx.dgrad_weight = quantize(weight.T, **_quantizer_kwargs(dgrad_spec, generator))
                ctx.dgrad_weight_transposed = True
        return output.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_output):
        inputs, weight = ctx.saved_tensors
        recipe, generator, compute_dtype = ctx.recipe, ctx.generator, ctx.compute_dtype
        grad = grad_output.reshape(-1, grad_output.shape[-1]).float()
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if "dgrad" in recipe.quantized_gemms:
                grad_q = fake_quantize(grad, **_quantizer_kwargs(recipe.operand("dgrad_grad_output"), generator))
                weight_q = dequantize(ctx.dgrad_weight, torch.float32)
                weight_q = weight_q.T if ctx.dgrad_weight_transposed else weight_q
            else:
                grad_q, weight_q = grad, weight
            grad_input = (grad_q.to(compute_dtype) @ weight_q.to(compute_dtype)).to(ctx.input_dtype)
            grad_input = grad_input.reshape(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            if "wgrad" in recipe.quantized_gemms:
                grad_t = wgrad_operand(grad.T, recipe, "wgrad_grad_output", generator, packed=False)
                inputs_t = dequantize(ctx.wgrad_input, torch.float32)
            else:
                grad_t, inputs_t = grad.T, inputs.T
            grad_weight = (grad_t.to(compute_dtype) @ inputs_t.to(compute_dtype).T).to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0).to(ctx.weight_dtype)
        ctx.wgrad_input = ctx.dgrad_weight = None
        return grad_input, grad_weight, grad_bias, None, None, None


def check_linear_shape(in_features: int, out_features: int, recipe: FP4Recipe) -> None:
    """Raise ``ValueError`` unless both feature counts are multiples of the recipe's block size."""
    multiple = recipe.block_multiple()
    if in_features % multiple or out_features % multiple:
        raise ValueError(
            f"an FP4 linear needs in_features and out_features divisible by {multiple} (the recipe's block "
            f"size), got {in_features} x {out_features}; keep this layer in high precision"
        )


def fp4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    recipe: FP4Recipe | None = None,
    generator: torch.Generator | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``F.linear`` with its three GEMMs in FP4 as ``recipe`` says.

    Args:
        x: ``[..., in_features]``.
        weight: ``[out_features, in_features]``.
        bias: ``[out_features]`` or ``None`` (added in high precision).
        recipe: the ``FP4Recipe`` (default: NVFP4 paper recipe).
        generator: random source for stochastic rounding (on ``x``'s device).
        compute_dtype: dtype of the GEMMs on dequantized operands.

    Returns:
        ``[..., out_features]`` in ``x``'s dtype.
    """
    recipe = check_recipe(recipe)
    check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
    check_generator("generator", generator)
    check_float_tensor("x", x)
    check_float_tensor("weight", weight)
    if bias is not None:
        check_float_tensor("bias", bias)
    if x.ndim == 0 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty tensor [..., in_features], got shape {tuple(x.shape)}")
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., {x.shape[-1]}] does not match weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}")
    check_linear_shape(weight.shape[1], weight.shape[0], recipe)
    return FP4LinearFunction.apply(x, weight, bias, recipe, generator, compute_dtype)


class FP4Linear(nn.Linear):
    """A drop-in ``nn.Linear`` whose fprop, dgrad and wgrad GEMMs run in emulated FP4.

    Parameters stay in their own (high-precision, "master") dtype and are quantized on the fly.
    ``fp4_enabled = False`` turns the layer back into a plain linear (the late switch to high precision).

    Args:
        in_features: as ``nn.Linear``; a multiple of the recipe's block size.
        out_features: as ``nn.Linear``; a multiple of the recipe's block size.
        bias: as ``nn.Linear``.
        device: as ``nn.Linear``.
        dtype: as ``nn.Linear`` (the master-weight dtype).
        recipe: an ``FP4Recipe`` (default NVFP4); feature counts must be multiples of its block size.
        compute_dtype: dtype of the GEMMs on dequantized operands (float32, bfloat16 or float16).
        seed: seed of the layer's stochastic-rounding generator.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        recipe: FP4Recipe | None = None,
        compute_dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        # checked before nn.Linear allocates the weight
        recipe = check_recipe(recipe)
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        check_bool("bias", bias)
        check_linear_shape(in_features, out_features, recipe)
        check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
        seed = check_seed("seed", seed)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe
        self.compute_dtype = compute_dtype
        self.seed = seed
        self.fp4_enabled = True
        self._generator: torch.Generator | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        recipe: FP4Recipe | None = None,
        compute_dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> FP4Linear:
        """An ``FP4Linear`` sharing ``linear``'s parameter objects (optimizers keep working on them)."""
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
            recipe=recipe, compute_dtype=compute_dtype, seed=seed,
        )  # fmt: skip
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def generator(self, device: torch.device) -> torch.Generator:
        """The layer's stochastic-rounding generator on ``device`` (created from ``seed`` on first use)."""
        if self._generator is None or self._generator.device != torch.device(device):
            state = None if self._generator is None else self._generator.get_state()
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if state is not None and self._generator.device.type == "cpu":
                self._generator.set_state(state)
        return self._generator

    def generator_state(self) -> torch.Tensor | None:
        return None if self._generator is None else self._generator.get_state()

    def set_generator_state(self, state: torch.Tensor | None, device: torch.device | str = "cpu") -> None:
        if state is not None:
            self.generator(self.weight.device if self.weight.device.type != "meta" else device).set_state(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp4_enabled:
            return F.linear(x, self.weight, self.bias)
        return fp4_linear(x, self.weight, self.bias, self.recipe, self.generator(x.device), self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fmt={self.recipe.fmt}, fp4_enabled={self.fp4_enabled}"
