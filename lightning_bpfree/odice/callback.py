"""``OfflineEvaluation``: roll an offline-RL policy out in its environment during training and log the return."""

from __future__ import annotations

import lightning as L
import numpy as np

from lightning_bpfree.odice.datasets import evaluate_policy, normalized_return
from lightning_bpfree.validation import check_positive_int

__all__ = ["OfflineEvaluation"]


class OfflineEvaluation(L.Callback):
    """Roll the policy out every ``every_n_steps`` training steps and log its return.

    Logs ``eval/return`` (mean undiscounted return over ``episodes``), ``eval/normalized_return``
    (0 random, 100 expert; see :func:`~lightning_bpfree.odice.datasets.normalized_return`) and
    ``eval/cos_forward_backward`` (mean of cos(g_f, g_b) over the steps since the last evaluation,
    when the module reports it). Every row is also kept in :attr:`history`. The policy is also
    evaluated once before training (step 0) and at the end if the last step was not an evaluation step.
    """

    def __init__(self, env_id: str, every_n_steps: int = 1000, episodes: int = 10, seed: int = 12345):
        check_positive_int("every_n_steps", every_n_steps)
        check_positive_int("episodes", episodes)
        normalized_return(env_id, 0.0)  # validates env_id
        self.env_id, self.every_n_steps, self.episodes, self.seed = env_id, every_n_steps, episodes, seed
        self.history: list[dict[str, float]] = []
        self._cosines: list[float] = []

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        episode_return = evaluate_policy(self.env_id, pl_module.act, self.episodes, seed=self.seed)
        pl_module.train(was_training)
        row = {
            "step": float(trainer.global_step),
            "return": episode_return,
            "normalized_return": normalized_return(self.env_id, episode_return),
        }
        if self._cosines:
            row["cos_forward_backward"] = float(np.mean(self._cosines))
            self._cosines = []
        self.history.append(row)
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in row.items() if k != "step"}, step=trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        cosine = getattr(pl_module, "last_diagnostics", {}).get("cos_forward_backward")
        if cosine is not None:
            self._cosines.append(cosine)
        if trainer.global_step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.history and self.history[-1]["step"] != trainer.global_step:
            self._evaluate(trainer, pl_module)
