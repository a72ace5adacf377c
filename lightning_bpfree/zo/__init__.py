"""Zeroth-order training: MeZO and the ZO-Bench optimizers, the ``ZerothOrder`` callback."""

from lightning_bpfree.zo.callback import ZerothOrder
from lightning_bpfree.zo.optim import OPTIMIZERS, ZOSGD, ZOEstimate, ZOOptimizer, make_optimizer
from lightning_bpfree.zo.perturbation import SeededNoise, mix_seed

__all__ = ["OPTIMIZERS", "SeededNoise", "ZOEstimate", "ZOOptimizer", "ZOSGD", "ZerothOrder", "make_optimizer", "mix_seed"]
