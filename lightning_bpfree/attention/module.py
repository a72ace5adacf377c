"""The Lightning layer: a ViT image classifier whose attention is SOFT or softmax."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_bpfree.attention.vit import TinyViT


class ViTClassifier(L.LightningModule):
    """Image classification with :class:`~lightning_bpfree.attention.vit.TinyViT`.

    Logs ``train_loss``, ``val_loss`` and ``val_acc`` (``test_*`` in ``trainer.test``).

    Args:
        attention: ``"soft"`` (SOFT linear attention), ``"sdpa"`` or ``"eager"`` (softmax).
        lr: AdamW learning rate (one-cycle schedule over the estimated training steps).
        weight_decay: AdamW weight decay.
        **vit_options: :class:`TinyViT` options (``image_size``, ``patch_size``, ``dim``, ``depth``,
            ``num_heads``) and SOFT options (``num_landmarks``, ``newton_iters``, ``normalize``, ...).
    """

    def __init__(self, attention: str = "soft", lr: float = 2e-3, weight_decay: float = 0.05, **vit_options: Any):
        super().__init__()
        self.save_hyperparameters()
        self.model = TinyViT(attention=attention, **vit_options)
        self.lr = lr
        self.weight_decay = weight_decay

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, labels = batch
        logits = self(images)
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels), prog_bar=True)
        self.log(f"{stage}_acc", (logits.argmax(-1) == labels).float().mean(), prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=steps, pct_start=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
