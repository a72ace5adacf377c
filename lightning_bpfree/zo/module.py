"""A plain LightningModule around a transformers causal LM, as a user would write it.

Nothing in it knows about zeroth-order training: ``training_step`` returns the loss and
``configure_optimizers`` returns AdamW. Trained as is, it is first-order fine-tuning; with
``Trainer(callbacks=[ZerothOrder(...)])`` the same module is trained with forward passes only.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

from lightning_bpfree.validation import check_nonnegative_float


class CausalLMModule(pl.LightningModule):
    """Next-token fine-tuning of a causal LM on batches of token ids.

    Args:
        model: a transformers ``*ForCausalLM`` (or a peft model around one).
        lr: AdamW learning rate, used only when no ZerothOrder callback replaces the optimizer.

    Batches are ``(input_ids,)`` or ``input_ids`` int64 ``[B, T]``; the loss is the mean
    next-token cross-entropy in nats. Logs ``train_loss`` and ``val_loss`` / ``val_ppl``.
    """

    def __init__(self, model: torch.nn.Module, lr: float = 1e-4):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
        lr = check_nonnegative_float("lr", lr)
        super().__init__()
        self.model = model.train()  # loaders return eval-mode models; Lightning trains in the mode it finds
        self.lr = lr
        self.val_history: list[tuple[int, float]] = []
        self._val_losses: list[torch.Tensor] = []

    @staticmethod
    def _ids(batch) -> torch.Tensor:
        return batch[0] if isinstance(batch, list | tuple) else batch

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self._ids(batch))
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._val_losses.append(self.loss(self._ids(batch)).detach().float())

    def on_validation_epoch_end(self) -> None:
        if not self._val_losses:
            return
        loss = torch.stack(self._val_losses).mean()
        self._val_losses.clear()
        self.val_history.append((self.global_step, loss.item()))
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_ppl", math.exp(min(loss.item(), 50.0)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)
