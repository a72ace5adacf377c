"""``FP4Recipe``: how each operand of the three GEMMs of a linear layer is quantized.

A linear layer ``Y = X W^T`` runs three GEMMs in training, each with two operands:

===========  =================  ===========================  ==============================
GEMM         product            operand names                contraction (block) dimension
===========  =================  ===========================  ==============================
``fprop``    ``Y = X W^T``      ``fprop_input``, ``fprop_weight``     in_features
``dgrad``    ``dX = dY W``      ``dgrad_grad_output``, ``dgrad_weight`` out_features
``wgrad``    ``dW = dY^T X``    ``wgrad_grad_output``, ``wgrad_input``  tokens
===========  =================  ===========================  ==============================

The default is the NVFP4 training recipe (arXiv 2509.25149): every operand NVFP4; weights in 16x16
tiles so the forward and the transposed backward copy hold the same values; round-to-nearest-even
for weights and activations; stochastic rounding for the gradient ``dY`` in both backward GEMMs;
the random Hadamard transform on the two wgrad operands.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lightning_bpfree.fp4.constants import (
    GEMMS,
    GRADIENT_OPERANDS,
    OPERANDS,
    ROUNDING_MODES,
    WEIGHT_OPERANDS,
    WGRAD_OPERANDS,
)
from lightning_bpfree.fp4.formats import get_format
from lightning_bpfree.validation import check_bool, check_choice


def check_names(argument: str, names: Any, allowed: Collection[str]) -> tuple[str, ...]:
    """``names`` (an iterable of names, not a single string) as a tuple, each one of ``allowed``."""
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(
            f"{argument} must be a sequence of names from {sorted(allowed)}, got {names!r} ({type(names).__name__})"
        )
    names = tuple(names)
    for name in names:
        check_choice(argument, name, allowed)
    return names


@dataclass(frozen=True)
class OperandSpec:
    """How one GEMM operand is quantized (resolved from an ``FP4Recipe``)."""

    fmt: str
    rounding: str
    block_2d: bool
    rht: bool

    def __post_init__(self) -> None:
        get_format(self.fmt)
        check_choice("rounding", self.rounding, ROUNDING_MODES)
        check_bool("block_2d", self.block_2d)
        check_bool("rht", self.rht)


@dataclass(frozen=True)
class FP4Recipe:
    """Which format, rounding, block shape and transform each GEMM operand gets.

    Args:
        fmt: the format of every operand unless ``formats`` overrides it (``"nvfp4"``, ``"mxfp4"``,
            ``"mxfp4_ceil"``, ``"ue5m3"``, ``"ue4m3"``).
        stochastic_rounding: stochastic rounding for the ``stochastic_operands`` (default the gradient
            ``dY`` in dgrad and wgrad); every other operand rounds to nearest even.
        rht: apply the random Hadamard transform to ``rht_operands`` (default the two wgrad operands).
        two_d_weights: quantize weights in ``B x B`` tiles instead of ``1 x B`` blocks.
        formats: per-operand format overrides, e.g. ``{"wgrad_grad_output": "mxfp4"}``.
        quantized_gemms: the GEMMs that run in FP4; the others use the high-precision operands.
        rht_operands: the operands the transform applies to when ``rht`` is on; only ``wgrad_*``
            operands are allowed (the transform must cancel along the contraction dimension).
        stochastic_operands: the operands that round stochastically when ``stochastic_rounding`` is on.
        rht_bf16: round the rotated values to bfloat16 before quantizing, as NVIDIA's kernel does.
    """

    fmt: str = "nvfp4"
    stochastic_rounding: bool = True
    rht: bool = True
    two_d_weights: bool = True
    formats: Mapping[str, str] = field(default_factory=dict)
    quantized_gemms: tuple[str, ...] = GEMMS
    rht_operands: tuple[str, ...] = ("wgrad_grad_output", "wgrad_input")
    stochastic_operands: tuple[str, ...] = GRADIENT_OPERANDS
    rht_bf16: bool = True

    def __post_init__(self) -> None:
        get_format(self.fmt)
        for flag in ("stochastic_rounding", "rht", "two_d_weights", "rht_bf16"):
            check_bool(flag, getattr(self, flag))
        if not isinstance(self.formats, Mapping):
            raise TypeError(f"formats must be a mapping of operand name to format, got {type(self.formats).__name__}")
        for name, fmt in dict(self.formats).items():
            check_choice("formats", name, OPERANDS)
            get_format(fmt)
        for argument, allowed in (
            ("quantized_gemms", GEMMS),
            ("rht_operands", WGRAD_OPERANDS),
            ("stochastic_operands", OPERANDS),
        ):
            object.__setattr__(self, argument, check_names(argument, getattr(self, argument), allowed))
        if len(set(self.rht_operands)) == 1:
            raise ValueError(
                "rht_operands must name both wgrad operands or none: the transform only cancels when "
                f"it rotates both, got {self.rht_operands}"
            )
        if self.two_d_weights:
            fprop, dgrad = (self.formats.get(name, self.fmt) for name in WEIGHT_OPERANDS)
            if fprop != dgrad:
                raise ValueError(
                    f"two_d_weights needs one format for fprop_weight and dgrad_weight, got {fprop!r} and {dgrad!r}"
                )

    @classmethod
    def nvfp4(cls, **overrides: Any) -> FP4Recipe:
        """The NVFP4 paper recipe (the default)."""
        return cls(**overrides)

    @classmethod
    def mxfp4(cls, **overrides: Any) -> FP4Recipe:
        """MXFP4 (E8M0 scales, blocks of 32, OCP floor rule) with the NVFP4 recipe's other techniques."""
        return cls(**{"fmt": "mxfp4", **overrides})

    @classmethod
    def ue5m3(cls, **overrides: Any) -> FP4Recipe:
        """E2M1 with UE5M3 block scales (blocks of 16, 2D weights, SR on dY, no RHT), the Graphcore recipe."""
        return cls(**{"fmt": "ue5m3", "rht": False, **overrides})

    @classmethod
    def preset(cls, name: str) -> FP4Recipe:
        """``"nvfp4"``, ``"mxfp4"`` or ``"ue5m3"``."""
        presets = {"nvfp4": cls.nvfp4, "mxfp4": cls.mxfp4, "ue5m3": cls.ue5m3}
        return presets[check_choice("recipe", name, presets)]()

    def replace(self, **changes: Any) -> FP4Recipe:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return replace(self, **changes)

    def operand(self, name: str) -> OperandSpec:
        """The resolved ``OperandSpec`` of operand ``name`` (one of ``OPERANDS``)."""
        check_choice("operand", name, OPERANDS)
        stochastic = self.stochastic_rounding and name in self.stochastic_operands
        return OperandSpec(
            fmt=self.formats.get(name, self.fmt),
            rounding="stochastic" if stochastic else "nearest",
            block_2d=self.two_d_weights and name in WEIGHT_OPERANDS,
            rht=self.rht and name in self.rht_operands,
        )

    def block_multiple(self) -> int:
        """The largest block size any operand uses: in/out features must be multiples of it."""
        return max(get_format(self.operand(name).fmt).block_size for name in OPERANDS)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (for checkpoints and logs)."""
        state = asdict(self)
        state["formats"] = dict(self.formats)
        return state

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> FP4Recipe:
        return cls(**dict(state))


def check_recipe(recipe: FP4Recipe | str | None, *, presets: bool = False) -> FP4Recipe:
    """``recipe`` itself, the default NVFP4 recipe for ``None``, or (with ``presets``) the preset it names.

    Raises ``TypeError`` for anything else, ``ValueError`` for an unknown preset name.
    """
    if recipe is None:
        return FP4Recipe()
    if presets and isinstance(recipe, str):
        return FP4Recipe.preset(recipe)
    if not isinstance(recipe, FP4Recipe):
        accepted = "an FP4Recipe, a preset name or None" if presets else "an FP4Recipe"
        raise TypeError(f"recipe must be {accepted}, got {type(recipe).__name__}")
    return recipe
