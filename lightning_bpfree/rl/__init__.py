"""Offline RL and RL for diffusion language models.

- :mod:`lightning_bpfree.rl.odice`: ``orthogonal_project`` and the ``ODICE`` LightningModule
  (orthogonal-gradient DICE for offline RL); datasets in :mod:`lightning_bpfree.rl.datasets`.
- :mod:`lightning_bpfree.rl.bgpo`: ``bgpo_loss`` and ``BGPO`` (constant-memory policy gradients for
  masked-diffusion language models).

Names are loaded lazily so that importing one method never imports the other (or gymnasium).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "orthogonal_project": "lightning_bpfree.rl.odice",
    "ODICE": "lightning_bpfree.rl.odice",
    "bgpo_loss": "lightning_bpfree.rl.bgpo",
    "BGPO": "lightning_bpfree.rl.bgpo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_bpfree.rl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
