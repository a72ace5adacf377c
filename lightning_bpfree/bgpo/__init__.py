"""BGPO (Lin et al., arXiv 2510.11683): policy gradients for masked-diffusion language models with
memory constant in the number of Monte Carlo ELBO samples.

- ``losses.py``: the numerics as plain PyTorch: ``bgpo_loss``, the ELBO-ratio and diffu-GRPO
  baselines, stratified mask counts, group-relative advantages, gradient accumulation.
- ``masked_lm.py``: ``MaskedDiffusionLM``, a masked-diffusion LM around any bidirectional encoder.
- ``tasks.py``: ``AdditionTask``, a verifiable-reward task that trains in minutes on a CPU.
- ``module.py``: the ``BGPO`` and ``MaskedDiffusionSFT`` LightningModules; ``bench.py``:
  ``bpfree bgpo-bench``.

The Lightning names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_bpfree._lazy import lazy_exports
from lightning_bpfree.bgpo.losses import (
    OBJECTIVES,
    accumulate_policy_gradient,
    bgpo_loss,
    diffu_grpo_loss,
    elbo_ratio_loss,
    group_relative_advantages,
    prepare_policy_batch,
    stratified_mask_counts,
)
from lightning_bpfree.bgpo.masked_lm import MaskedDiffusionLM, tiny_diffusion_lm
from lightning_bpfree.bgpo.tasks import AdditionTask

if TYPE_CHECKING:
    from lightning_bpfree.bgpo.module import BGPO, MaskedDiffusionSFT

_EXPORTS = {"BGPO": "lightning_bpfree.bgpo.module", "MaskedDiffusionSFT": "lightning_bpfree.bgpo.module"}

__all__ = [
    "BGPO",
    "OBJECTIVES",
    "AdditionTask",
    "MaskedDiffusionLM",
    "MaskedDiffusionSFT",
    "accumulate_policy_gradient",
    "bgpo_loss",
    "diffu_grpo_loss",
    "elbo_ratio_loss",
    "group_relative_advantages",
    "prepare_policy_batch",
    "stratified_mask_counts",
    "tiny_diffusion_lm",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
