"""Zeroth-order training: MeZO and the ZO-Bench optimizers, the ``ZerothOrder`` callback."""

from lightning_bpfree.zo.blocks import find_blocks
from lightning_bpfree.zo.callback import ZerothOrder
from lightning_bpfree.zo.hybrid import FirstOrderPart
from lightning_bpfree.zo.optim import (
    OPTIMIZERS,
    ZOSGD,
    ForwardGradient,
    ZOAdam,
    ZOEstimate,
    ZOOptimizer,
    ZOSGDConservative,
    ZOSGDMomentum,
    ZOSGDSign,
    make_optimizer,
)
from lightning_bpfree.zo.peft_schemes import SCHEMES, apply_scheme
from lightning_bpfree.zo.perturbation import SeededNoise, mix_seed
from lightning_bpfree.zo.sparsity import GradientSparsity

__all__ = [
    "OPTIMIZERS", "SCHEMES", "FirstOrderPart", "ForwardGradient", "GradientSparsity", "SeededNoise", "ZOAdam",
    "ZOEstimate", "ZOOptimizer", "ZOSGD", "ZOSGDConservative", "ZOSGDMomentum", "ZOSGDSign", "ZerothOrder",
    "apply_scheme", "find_blocks", "make_optimizer", "mix_seed",
]  # fmt: skip
