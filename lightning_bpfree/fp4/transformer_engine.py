"""Hand a model's linear layers to TransformerEngine's NVFP4 kernels (SM100 / SM103 GPUs).

Three parts: probing whether TransformerEngine and NVFP4 tensor cores are present
(``select_backend``), building TE's ``NVFP4BlockScaling`` recipe from an ``FP4Recipe``, and the
model surgery (``convert_to_transformer_engine``: the same layers ``convert_to_fp4`` would pick
become ``transformer_engine.pytorch.Linear`` with the old weights). TransformerEngine is imported on
use only, so this module loads without it.
"""

from __future__ import annotations

import importlib
import importlib.util
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from lightning_bpfree.fp4.constants import BACKENDS, GEMMS, NVFP4_CAPABILITIES, OPERANDS
from lightning_bpfree.fp4.convert import ConversionReport, KeepHighPrecision, plan_conversion, replace_module
from lightning_bpfree.fp4.recipe import FP4Recipe
from lightning_bpfree.validation import check_choice


def nvfp4_hardware_available() -> bool:
    """Whether the current CUDA device has the full NVFP4 recipe in hardware (compute capability 10.0 / 10.3)."""
    return torch.cuda.is_available() and tuple(torch.cuda.get_device_capability()) in NVFP4_CAPABILITIES


def transformer_engine_available() -> bool:
    """Whether the ``transformer_engine`` package is installed (without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def select_backend(backend: str, recipe: FP4Recipe) -> str:
    """``"transformer_engine"`` or ``"emulate"`` for the requested ``backend``.

    ``"auto"`` picks TransformerEngine only for an all-NVFP4 recipe with TE installed on NVFP4 hardware;
    ``"transformer_engine"`` raises ``RuntimeError`` when that is not the case.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "emulate":
        return "emulate"
    all_nvfp4 = all(recipe.operand(name).fmt == "nvfp4" for name in OPERANDS)
    te_usable = all_nvfp4 and set(recipe.quantized_gemms) == set(GEMMS)
    te_usable = te_usable and transformer_engine_available() and nvfp4_hardware_available()
    if backend == "transformer_engine" and not te_usable:
        raise RuntimeError(
            "backend='transformer_engine' needs transformer_engine installed, a GPU of compute capability "
            "10.0/10.3, and an all-NVFP4 recipe quantizing every GEMM; use backend='emulate' or 'auto'"
        )
    return "transformer_engine" if te_usable else "emulate"


def transformer_engine_recipe(recipe: FP4Recipe) -> Any:
    """TE's ``NVFP4BlockScaling`` with ``recipe``'s RHT, stochastic rounding and 2D-weight switches."""
    te_recipe = importlib.import_module("transformer_engine.common.recipe")
    return te_recipe.NVFP4BlockScaling(
        disable_rht=not recipe.rht,
        disable_stochastic_rounding=not recipe.stochastic_rounding,
        disable_2d_quantization=not recipe.two_d_weights,
    )


def convert_to_transformer_engine(
    module: nn.Module, recipe: FP4Recipe, keep: KeepHighPrecision | None = None
) -> tuple[ConversionReport, dict[str, nn.Module]]:
    """Replace ``module``'s eligible ``nn.Linear`` layers by TE linears in place, copying their weights.

    Returns:
        (the ``ConversionReport``, the new layers by qualified name).
    """
    te = importlib.import_module("transformer_engine.pytorch")
    report = plan_conversion(module, recipe, keep)
    layers = {}
    for name in report.converted:
        old = module.get_submodule(name)
        new = te.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                        params_dtype=old.weight.dtype, device=old.weight.device)  # fmt: skip
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        replace_module(module, name, new)
        layers[name] = new
    return report, layers


def transformer_engine_autocast(te_recipe: Any) -> AbstractContextManager:
    """TE's autocast with ``te_recipe`` (``te.autocast`` where present, else the older ``fp8_autocast``)."""
    te = importlib.import_module("transformer_engine.pytorch")
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=te_recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=te_recipe)
