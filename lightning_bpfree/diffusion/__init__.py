"""AdjointDPM: gradients through diffusion sampling by the adjoint probability-flow ODE.

``AdjointSampler`` (plain PyTorch) is imported eagerly; ``AdjointDPMCustomization`` imports Lightning, so
it loads on first access.
"""

from typing import Any

from lightning_bpfree.diffusion.adjoint import AdjointSampler, ProbabilityFlowODE, rho_of_alphas_cumprod

__all__ = ["AdjointDPMCustomization", "AdjointSampler", "ProbabilityFlowODE", "rho_of_alphas_cumprod"]


def __getattr__(name: str) -> Any:
    if name == "AdjointDPMCustomization":
        from lightning_bpfree.diffusion.customization import AdjointDPMCustomization

        return AdjointDPMCustomization
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
