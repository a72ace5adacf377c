"""Forward-only explanations of causal LM predictions, and faithfulness metrics.

- ``reagent_attribution``: ReAGent token importance from forward passes only (any model that maps
  token ids to logits, including black-box, zeroth-order-trained or FP4-quantised ones).
- ``jvp_attribution``: gradient x input of each response token's probability by forward-mode AD,
  with ``importance_density`` and ``instruction_score`` (Wu et al., 2023).
- ``SoftSufficiency`` / ``SoftComprehensiveness`` (and the hard ``Sufficiency`` /
  ``Comprehensiveness``): torchmetrics Metrics of how faithful an attribution is.
- ``ReAGentCallback``: heatmaps of fixed prompts during validation (imports Lightning on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_bpfree._lazy import lazy_exports
from lightning_bpfree.attribution.baselines import (
    attention_attribution,
    gradient_x_input,
    integrated_gradients,
    random_attribution,
)
from lightning_bpfree.attribution.density import importance_density, instruction_score, jvp_attribution
from lightning_bpfree.attribution.metrics import (
    Comprehensiveness,
    SoftComprehensiveness,
    SoftSufficiency,
    Sufficiency,
    normalized_comprehensiveness,
    normalized_sufficiency,
)
from lightning_bpfree.attribution.reagent import ReAGentResult, reagent_attribution
from lightning_bpfree.attribution.samplers import (
    FrequencyTokenSampler,
    LanguageModelTokenSampler,
    UniformTokenSampler,
)

if TYPE_CHECKING:
    from lightning_bpfree.attribution.callback import ReAGentCallback

_EXPORTS = {"ReAGentCallback": "lightning_bpfree.attribution.callback"}

__all__ = [
    "Comprehensiveness",
    "FrequencyTokenSampler",
    "LanguageModelTokenSampler",
    "ReAGentCallback",
    "ReAGentResult",
    "SoftComprehensiveness",
    "SoftSufficiency",
    "Sufficiency",
    "UniformTokenSampler",
    "attention_attribution",
    "gradient_x_input",
    "importance_density",
    "instruction_score",
    "integrated_gradients",
    "jvp_attribution",
    "normalized_comprehensiveness",
    "normalized_sufficiency",
    "random_attribution",
    "reagent_attribution",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
