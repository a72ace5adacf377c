"""Swap a model's ``nn.Linear`` layers for ``FP4Linear`` in place, keeping the sensitive ones high precision.

Stays high precision: layers matching a ``keep_high_precision`` name pattern (default the LM head),
output-embedding heads and linears whose weight is tied to an ``nn.Embedding``, linears inside the
first / last N transformer blocks, and linears whose feature counts are not multiples of the block
size (with a warning naming them). Embeddings, norms and everything that is not an ``nn.Linear`` are
never touched. Replacement is in place (DDP ignores ``convert_module``'s return value) and the new
layers share the old parameter objects.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch

import torch
from torch import nn

from lightning_bpfree.fp4.constants import COMPUTE_DTYPES
from lightning_bpfree.fp4.linear import FP4Linear
from lightning_bpfree.fp4.recipe import FP4Recipe, check_recipe
from lightning_bpfree.validation import check_choice, check_int, check_seed


@dataclass
class ConversionReport:
    """Which linear layers went FP4 and why the others stayed high precision.

    Attributes:
        converted: qualified names of the layers now ``FP4Linear`` (in module order).
        kept: qualified name -> reason, for every ``nn.Linear`` left in high precision.
        blocks: qualified name of the block list used for first/last-N (``None`` if none found) and its length.
    """

    converted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    blocks: tuple[str | None, int] = (None, 0)

    def fraction_converted(self) -> float:
        total = len(self.converted) + len(self.kept)
        return len(self.converted) / total if total else 0.0


def matches_pattern(name: str, pattern: str) -> bool:
    """Whether the qualified module ``name`` matches ``pattern``: a glob over the whole name, or over
    a dotted run of its components (``"lm_head"`` matches ``model.lm_head`` and ``lm_head.proj``)."""
    return any(fnmatch(name, form) for form in (pattern, f"*.{pattern}", f"{pattern}.*", f"*.{pattern}.*"))


def find_blocks(module: nn.Module) -> tuple[str | None, int]:
    """The ``nn.ModuleList`` holding the model's repeated blocks: the one with most linear-bearing children."""
    best: tuple[str | None, int] = (None, 0)
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList):
            count = sum(any(isinstance(m, nn.Linear) for m in block.modules()) for block in child)
            if count > best[1]:
                best = (name, count)
    return best


def _head_weights(module: nn.Module) -> set[int]:
    """ids of weights that belong to embeddings or output-embedding heads."""
    ids = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    for m in module.modules():
        getter = getattr(m, "get_output_embeddings", None)
        if callable(getter):
            try:
                head = getter()
            except (NotImplementedError, AttributeError):
                head = None
            if isinstance(head, nn.Linear):
                ids.add(id(head.weight))
    return ids


def _block_index(name: str, blocks_name: str | None) -> int | None:
    if blocks_name is None:
        return None
    prefix = f"{blocks_name}." if blocks_name else ""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


@dataclass(frozen=True)
class KeepHighPrecision:
    """Which linear layers stay high precision besides output heads and embedding-tied weights.

    Args:
        patterns: name patterns (see ``matches_pattern``); a single string is one pattern, ``None`` (like
            ``()``) keeps no layer by name.
        first_n: keep every linear of the first N blocks.
        last_n: keep every linear of the last N blocks.
    """

    patterns: tuple[str, ...] = ("lm_head",)
    first_n: int = 0
    last_n: int = 0

    def __post_init__(self) -> None:
        patterns = self.patterns
        if patterns is None:
            patterns = ()
        elif isinstance(patterns, str):
            patterns = (patterns,)
        elif not isinstance(patterns, Iterable):
            raise TypeError(f"keep_high_precision must be a name pattern, a sequence of them or None, got {patterns!r}")
        patterns = tuple(patterns)
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise TypeError(f"keep_high_precision patterns must be strings, got {pattern!r} in {patterns!r}")
        object.__setattr__(self, "patterns", patterns)
        check_int("high_precision_first_n", self.first_n, low=0)
        check_int("high_precision_last_n", self.last_n, low=0)


def plan_conversion(
    module: nn.Module, recipe: FP4Recipe | None = None, keep: KeepHighPrecision | None = None
) -> ConversionReport:
    """Decide, without changing ``module``, which ``nn.Linear`` layers go FP4 (as ``convert_to_fp4`` would)."""
    recipe = check_recipe(recipe)
    keep = keep or KeepHighPrecision()
    keep_high_precision, high_precision_first_n, high_precision_last_n = keep.patterns, keep.first_n, keep.last_n
    blocks_name, num_blocks = find_blocks(module)
    if (high_precision_first_n or high_precision_last_n) and blocks_name is None:
        raise ValueError("high_precision_first_n/last_n need a model whose blocks sit in an nn.ModuleList")
    head_weights = _head_weights(module)
    multiple = recipe.block_multiple()
    report = ConversionReport(blocks=(blocks_name, num_blocks))
    for name, child in module.named_modules():
        if not isinstance(child, nn.Linear) or isinstance(child, FP4Linear):
            continue
        index = _block_index(name, blocks_name)
        pattern = next((p for p in keep_high_precision if matches_pattern(name, p)), None)
        if not name:
            report.kept[name] = "the root module cannot be replaced in place"
        elif pattern is not None:
            report.kept[name] = f"matches keep_high_precision pattern {pattern!r}"
        elif id(child.weight) in head_weights:
            report.kept[name] = "output head / tied to an embedding"
        elif index is not None and index < high_precision_first_n:
            report.kept[name] = f"in the first {high_precision_first_n} blocks"
        elif index is not None and index >= num_blocks - high_precision_last_n:
            report.kept[name] = f"in the last {high_precision_last_n} blocks"
        elif child.in_features % multiple or child.out_features % multiple:
            report.kept[name] = f"shape {child.out_features}x{child.in_features} not divisible by {multiple}"
        else:
            report.converted.append(name)
    incompatible = [name for name, reason in report.kept.items() if reason.startswith("shape")]
    if incompatible:
        warnings.warn(
            f"kept {len(incompatible)} linear layer(s) in high precision because their feature counts are not "
            f"multiples of the FP4 block size {multiple}: {', '.join(incompatible)}",
            stacklevel=3,
        )
    return report


def replace_module(module: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at qualified ``name`` of ``module`` to ``new`` (in place)."""
    parent_name, _, attribute = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, attribute, new)


def convert_to_fp4(
    module: nn.Module,
    recipe: FP4Recipe | None = None,
    *,
    keep_high_precision: Sequence[str] | str | None = ("lm_head",),
    high_precision_first_n: int = 0,
    high_precision_last_n: int = 0,
    compute_dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> ConversionReport:
    """Replace ``module``'s eligible ``nn.Linear`` children by ``FP4Linear`` in place.

    Args:
        module: the model (modified in place).
        recipe: the ``FP4Recipe`` of the new layers (default NVFP4).
        keep_high_precision: name patterns (see ``matches_pattern``) of layers to keep; ``None`` keeps none
            by name.
        high_precision_first_n: keep every linear of the first N blocks.
        high_precision_last_n: keep every linear of the last N blocks.
        compute_dtype: GEMM dtype of the FP4 layers.
        seed: layer ``i`` (in module order) gets stochastic-rounding seed ``seed + i``.

    Returns:
        a ``ConversionReport``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    recipe = check_recipe(recipe)
    keep = KeepHighPrecision(keep_high_precision, high_precision_first_n, high_precision_last_n)
    check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
    check_seed("seed", seed)
    report = plan_conversion(module, recipe, keep)
    for offset, name in enumerate(report.converted):
        layer = FP4Linear.from_linear(module.get_submodule(name), recipe, compute_dtype, seed=seed + offset)
        replace_module(module, name, layer)
    return report


def fp4_layers(module: nn.Module) -> dict[str, FP4Linear]:
    """The ``FP4Linear`` layers of ``module`` by qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, FP4Linear)}
