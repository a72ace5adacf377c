"""AdjointDPM (Pan et al., ICLR 2024): gradients through diffusion sampling by the adjoint
probability-flow ODE.

``adjoint.py`` holds the sampler (plain PyTorch); ``targets.py`` what a customization optimizes (weight
selection, noise, conditioning tokens; plain PyTorch); ``module.py`` the ``AdjointDPMCustomization``
LightningModule, which loads on first use; ``bench.py`` is ``bpfree diffusion-bench``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_bpfree._lazy import lazy_exports
from lightning_bpfree.diffusion.adjoint import AdjointSampler, ProbabilityFlowODE, rho_of_alphas_cumprod

if TYPE_CHECKING:
    from lightning_bpfree.diffusion.module import AdjointDPMCustomization

_EXPORTS = {"AdjointDPMCustomization": "lightning_bpfree.diffusion.module"}

__all__ = ["AdjointDPMCustomization", "AdjointSampler", "ProbabilityFlowODE", "rho_of_alphas_cumprod"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
