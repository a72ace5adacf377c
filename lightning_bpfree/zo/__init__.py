"""Zeroth-order training: MeZO and the ZO-Bench optimizers, the ``ZerothOrder`` callback.

Names are imported on first use, so that the plain-PyTorch parts (optimizers, noise, blocks,
sparsity, schemes) load without Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_bpfree._lazy import lazy_exports

if TYPE_CHECKING:  # for type checkers and the API docs; at run time names load on first use
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
    from lightning_bpfree.zo.strategy import ZODataParallelStrategy
    from lightning_bpfree.zo.weight_decay import BIAS_AND_NORM, mezo_no_decay, weight_decay_groups

_EXPORTS = {
    "ZerothOrder": "lightning_bpfree.zo.callback",
    "ZODataParallelStrategy": "lightning_bpfree.zo.strategy",
    "OPTIMIZERS": "lightning_bpfree.zo.optim",
    "ZOSGD": "lightning_bpfree.zo.optim",
    "ZOSGDSign": "lightning_bpfree.zo.optim",
    "ZOSGDMomentum": "lightning_bpfree.zo.optim",
    "ZOSGDConservative": "lightning_bpfree.zo.optim",
    "ZOAdam": "lightning_bpfree.zo.optim",
    "ForwardGradient": "lightning_bpfree.zo.optim",
    "ZOEstimate": "lightning_bpfree.zo.optim",
    "ZOOptimizer": "lightning_bpfree.zo.optim",
    "make_optimizer": "lightning_bpfree.zo.optim",
    "SeededNoise": "lightning_bpfree.zo.perturbation",
    "mix_seed": "lightning_bpfree.zo.perturbation",
    "find_blocks": "lightning_bpfree.zo.blocks",
    "GradientSparsity": "lightning_bpfree.zo.sparsity",
    "FirstOrderPart": "lightning_bpfree.zo.hybrid",
    "SCHEMES": "lightning_bpfree.zo.peft_schemes",
    "apply_scheme": "lightning_bpfree.zo.peft_schemes",
    "BIAS_AND_NORM": "lightning_bpfree.zo.weight_decay",
    "mezo_no_decay": "lightning_bpfree.zo.weight_decay",
    "weight_decay_groups": "lightning_bpfree.zo.weight_decay",
}

__all__ = [
    "OPTIMIZERS", "SCHEMES", "FirstOrderPart", "ForwardGradient", "GradientSparsity", "SeededNoise", "ZOAdam",
    "ZODataParallelStrategy", "ZOEstimate", "ZOOptimizer", "ZOSGD", "ZOSGDConservative", "ZOSGDMomentum", "ZOSGDSign",
    "ZerothOrder", "apply_scheme", "find_blocks", "make_optimizer", "mix_seed",
    "BIAS_AND_NORM", "mezo_no_decay", "weight_decay_groups",
]  # fmt: skip
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
