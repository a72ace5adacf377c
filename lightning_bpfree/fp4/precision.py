"""Lightning precision plugins: ``NVFP4Precision`` and ``FP4Precision``.

``Trainer(plugins=[NVFP4Precision()])`` trains with every eligible ``nn.Linear`` in emulated NVFP4
(the three GEMMs per ``FP4Recipe``) while master weights, optimizer state, embeddings, norms and the
LM head stay in their own precision. The plugin converts layers in place in ``convert_module``,
counts optimizer steps for the late switch to high precision, and stores that count, the recipe and
the stochastic-rounding generator states in checkpoints.

Where TransformerEngine and a GPU with NVFP4 tensor cores (compute capability 10.0 or 10.3) are
present, ``NVFP4Precision(backend="auto")`` hands the layers to TransformerEngine's
``NVFP4BlockScaling`` recipe instead of the emulation.

Sharded models (``ModelParallelStrategy`` with FSDP2's ``fully_shard`` in ``configure_model``):
Lightning calls ``convert_module`` after ``configure_model``, so the layers are already sharded.
FSDP2 keeps references to each ``nn.Linear`` object and gathers its weight into that object for the
forward; a new ``FP4Linear`` sharing the sharded weight would compute on a shard. The plugin then
turns each eligible ``nn.Linear`` into an ``FP4Linear`` in place (same object, same parameters, its
class changed), which gives the layers converting before ``fully_shard`` would: the same choice of
layers, the same seeds, and each forward quantizes the whole gathered weight (its tensor scale is
the whole weight's). Tensor parallel layouts and the TransformerEngine backend are refused there.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_bpfree.fp4.constants import BACKENDS, COMPUTE_DTYPES, GEMMS, NVFP4_CAPABILITIES, OPERANDS
from lightning_bpfree.fp4.convert import (
    ConversionReport,
    KeepHighPrecision,
    convert_to_fp4,
    fp4_layers,
    plan_conversion,
)
from lightning_bpfree.fp4.linear import FP4Linear
from lightning_bpfree.fp4.recipe import FP4Recipe, check_names, check_recipe
from lightning_bpfree.fp4.transformer_engine import (
    convert_to_transformer_engine,
    nvfp4_hardware_available,
    select_backend,
    transformer_engine_autocast,
    transformer_engine_available,
    transformer_engine_recipe,
)
from lightning_bpfree.validation import check_choice, check_int, check_optional, check_seed

# Re-exported: these names were defined here before the TransformerEngine code moved out.
__all__ = [
    "BACKENDS",
    "NVFP4_CAPABILITIES",
    "FP4Precision",
    "NVFP4Precision",
    "nvfp4_hardware_available",
    "select_backend",
    "transformer_engine_available",
]


def _fsdp_sharded(module: nn.Module) -> bool:
    """Whether FSDP2's ``fully_shard`` was applied to ``module`` or one of its submodules."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded
    fsdp_module = getattr(fsdp, "FSDPModule", None)
    return fsdp_module is not None and any(isinstance(m, fsdp_module) for m in module.modules())


def _check_fsdp_layout(name: str, linear: nn.Module) -> None:
    """Refuse a linear that FSDP2 alone does not explain (tensor parallel weights, fully_shard on the linear)."""
    if type(linear) is not nn.Linear:
        raise ValueError(
            f"cannot make the sharded layer {name!r} ({type(linear).__name__}) FP4 in place: apply fully_shard to "
            "the blocks holding the linear layers, not to the nn.Linear modules themselves"
        )
    for param in linear.parameters(recurse=False):
        shards = [p for p in getattr(param, "placements", ()) if not p.is_replicate()]
        if len(shards) > 1 or any(not (p.is_shard() and p.dim == 0) for p in shards):
            raise ValueError(
                f"FP4 layers support FSDP2 (parameters sharded along dim 0), got placements {param.placements} for "
                f"{name!r}; tensor parallelism is not supported"
            )


class FP4Precision(Precision):
    """Train with emulated FP4 linear layers under any ``FP4Recipe``.

    Args:
        recipe: an ``FP4Recipe`` or a preset name (``"nvfp4"``, ``"mxfp4"``, ``"ue5m3"``); default NVFP4.
        keep_high_precision: name patterns of linear layers to keep (default the LM head); a single string
            is one pattern, ``None`` or ``()`` keeps no layer by name. Output heads and weights tied to
            embeddings are kept anyway.
        high_precision_first_n: keep the linears of the first N blocks.
        high_precision_last_n: keep the linears of the last N blocks (the paper keeps ~15% of linears,
            mostly at the end, in BF16).
        switch_to_high_precision_at_step: after this many optimizer steps, run ``switch_gemms`` in high
            precision for the rest of training (the paper's late switch; ``None`` never switches).
        switch_gemms: which GEMMs the switch moves to high precision (default all; ``("fprop",)`` is the
            forward-only switch).
        compute_dtype: dtype of the GEMMs on dequantized operands: float32, bfloat16 or float16.
        seed: base seed of the per-layer stochastic-rounding generators.
        backend: ``"emulate"`` (default here), ``"auto"`` or ``"transformer_engine"``.
    """

    def __init__(
        self,
        recipe: FP4Recipe | str | None = None,
        *,
        keep_high_precision: Sequence[str] | str | None = ("lm_head",),
        high_precision_first_n: int = 0,
        high_precision_last_n: int = 0,
        switch_to_high_precision_at_step: int | None = None,
        switch_gemms: Sequence[str] = GEMMS,
        compute_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        backend: str = "emulate",
    ) -> None:
        recipe = check_recipe(recipe, presets=True)
        self.keep = KeepHighPrecision(keep_high_precision, high_precision_first_n, high_precision_last_n)
        step = check_optional(check_int, "switch_to_high_precision_at_step", switch_to_high_precision_at_step, low=0)
        switch_gemms = check_names("switch_gemms", switch_gemms, GEMMS)
        if not switch_gemms:
            raise ValueError(f"switch_gemms must be a non-empty subset of {GEMMS}, got ()")
        self.recipe = recipe
        self.keep_high_precision = self.keep.patterns
        self.high_precision_first_n = self.keep.first_n
        self.high_precision_last_n = self.keep.last_n
        self.switch_to_high_precision_at_step = step
        self.switch_gemms = switch_gemms
        self.compute_dtype = check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
        self.seed = check_seed("seed", seed)
        self.backend = select_backend(backend, recipe)
        self.optimizer_steps = 0
        self.switched = False
        self.report: ConversionReport | None = None
        self._layers: dict[str, nn.Module] = {}
        self._pending_generator_states: dict[str, torch.Tensor] = {}
        self._te_recipe: Any = None

    # -- conversion ---------------------------------------------------------------------------------
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Swap eligible ``nn.Linear`` layers in place (the return value is ``module`` itself).

        Under FSDP2 (``fully_shard`` already applied by ``configure_model``) the layers are converted
        by changing their class in place: see the module docstring.
        """
        sharded = _fsdp_sharded(module)
        if sharded and self.backend == "transformer_engine":
            raise ValueError(
                "backend='transformer_engine' does not support FSDP2-sharded models (it replaces the layers FSDP "
                "tracks); use backend='emulate'"
            )
        if sharded:
            self.report = self._convert_sharded(module)
            self._layers = dict(fp4_layers(module))
            rank_zero_info(
                f"{type(self).__name__}: {len(self.report.converted)} sharded linear layers made {self.recipe.fmt} "
                f"in place, {len(self.report.kept)} kept in high precision ({', '.join(self.report.kept) or 'none'})"
            )
        elif self.backend == "transformer_engine":
            self._te_recipe = transformer_engine_recipe(self.recipe)
            self.report, self._layers = convert_to_transformer_engine(module, self.recipe, self.keep)
        else:
            self.report = convert_to_fp4(
                module, self.recipe, keep_high_precision=self.keep.patterns, high_precision_first_n=self.keep.first_n,
                high_precision_last_n=self.keep.last_n, compute_dtype=self.compute_dtype, seed=self.seed,
            )  # fmt: skip
            self._layers = dict(fp4_layers(module))
            rank_zero_info(
                f"{type(self).__name__}: {len(self.report.converted)} linear layers in {self.recipe.fmt}, "
                f"{len(self.report.kept)} kept in high precision ({', '.join(self.report.kept) or 'none'})"
            )
        self._apply_pending_generator_states()
        self._maybe_switch()
        return module

    def _convert_sharded(self, module: nn.Module) -> ConversionReport:
        """Turn the eligible ``nn.Linear`` layers of an FSDP2-sharded ``module`` into ``FP4Linear`` in place.

        The layer objects and their (sharded) parameters stay those FSDP2 tracks; each gets the
        attributes ``FP4Linear.__init__`` sets, with the seeds ``convert_to_fp4`` would give.
        """
        report = plan_conversion(module, self.recipe, self.keep)
        for name in report.converted:  # all checked before any is changed
            _check_fsdp_layout(name, module.get_submodule(name))
        for offset, name in enumerate(report.converted):
            linear = module.get_submodule(name)
            linear.__class__ = FP4Linear
            linear.recipe = self.recipe
            linear.compute_dtype = self.compute_dtype
            linear.seed = self.seed + offset
            linear.fp4_enabled = True
            linear._generator = None
        return report

    def forward_context(self) -> AbstractContextManager:
        if self.backend != "transformer_engine" or self.switched:
            return nullcontext()
        return transformer_engine_autocast(self._te_recipe)

    # -- late switch ----------------------------------------------------------------------------------
    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, model, closure, **kwargs)
        self.optimizer_steps += 1
        self._maybe_switch()
        return output

    def _maybe_switch(self) -> None:
        step = self.switch_to_high_precision_at_step
        if self.switched or step is None or self.optimizer_steps < step or not self._layers:
            return
        remaining = tuple(g for g in self.recipe.quantized_gemms if g not in self.switch_gemms)
        for layer in self._layers.values():
            if hasattr(layer, "fp4_enabled"):
                layer.recipe = layer.recipe.replace(quantized_gemms=remaining)
                layer.fp4_enabled = bool(remaining)
        self.switched = True
        rank_zero_info(
            f"{type(self).__name__}: switched {', '.join(self.switch_gemms)} to high precision after "
            f"{self.optimizer_steps} optimizer steps"
        )

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        generators = {}
        for name, layer in self._layers.items():
            state = layer.generator_state() if hasattr(layer, "generator_state") else None
            if state is not None:
                generators[name] = state
        return {
            "recipe": self.recipe.to_dict(),
            "optimizer_steps": self.optimizer_steps,
            "switched": self.switched,
            "converted_layers": list(self._layers),
            "generator_states": generators,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_recipe = FP4Recipe.from_dict(state_dict["recipe"])
        if saved_recipe != self.recipe:
            rank_zero_warn(f"resuming with recipe {self.recipe} but the checkpoint was trained with {saved_recipe}")
        self.optimizer_steps = int(state_dict["optimizer_steps"])
        self._pending_generator_states = dict(state_dict.get("generator_states", {}))
        self._apply_pending_generator_states()
        self._maybe_switch()

    def _apply_pending_generator_states(self) -> None:
        if not self._layers:
            return
        for name, state in self._pending_generator_states.items():
            layer = self._layers.get(name)
            if layer is not None and hasattr(layer, "set_generator_state"):
                layer.set_generator_state(state)
        self._pending_generator_states = {}


class NVFP4Precision(FP4Precision):
    """NVFP4 training (arXiv 2509.25149): ``Trainer(plugins=[NVFP4Precision()])``.

    Same options as ``FP4Precision``; the recipe (an ``FP4Recipe``, the preset name ``"nvfp4"`` or
    ``None``) must use NVFP4 for every operand, so ``"mxfp4"`` and ``"ue5m3"`` are refused like the
    recipe objects they name. ``backend`` defaults to ``"auto"`` (TransformerEngine on compute capability
    10.0 / 10.3 GPUs, emulation elsewhere).
    """

    def __init__(self, recipe: FP4Recipe | str | None = None, *, backend: str = "auto", **options: Any) -> None:
        recipe = check_recipe(recipe, presets=True)
        formats = {recipe.operand(name).fmt for name in OPERANDS}
        if formats != {"nvfp4"}:
            raise ValueError(
                f"NVFP4Precision needs an all-NVFP4 recipe, got formats {sorted(formats)}; use FP4Precision"
            )
        super().__init__(recipe, backend=backend, **options)
