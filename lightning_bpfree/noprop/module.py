"""LightningModules around the plain-PyTorch NoProp networks in :mod:`lightning_bpfree.noprop.algorithms`.

Batches are ``(images [B, C, H, W], labels [B])``; ``model(images)`` runs inference and returns class
logits ``[B, K]``. Validation and test accuracy are logged as ``val_acc`` / ``test_acc`` (torchmetrics).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_bpfree.noprop.algorithms import NoPropCTNet, NoPropDTNet, NoPropFMNet, noprop_dt_step
from lightning_bpfree.noprop.backbone import BackpropClassifier


def _no_closure() -> None:
    return None


class _Classifier(L.LightningModule):
    """Evaluation shared by every variant: ``forward`` gives logits, accuracy is logged per epoch."""

    net: torch.nn.Module

    def __init__(self, num_classes: int, lr: float, weight_decay: float) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.lr, self.weight_decay = lr, weight_decay
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def _adamw(self, parameters) -> torch.optim.Optimizer:
        return torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.val_accuracy.update(self(images), labels)
        self.log("val_acc", self.val_accuracy, prog_bar=True, on_epoch=True, on_step=False)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.test_accuracy.update(self(images), labels)
        self.log("test_acc", self.test_accuracy, on_epoch=True, on_step=False)


class NoPropDT(_Classifier):
    """NoProp-DT: ``num_blocks`` blocks, each with its own AdamW, each trained only on its own loss.

    Uses Lightning manual optimization: ``configure_optimizers`` returns one optimizer per block and a
    last one for the output layer and class embeddings. ``trainer.global_step`` advances once per batch
    (only the head optimizer's step is counted), so ``max_steps`` counts batches.

    Args:
        num_classes: ``K``.
        image_shape: ``(C, H, W)`` of the inputs.
        num_blocks: ``T`` (paper: 10).
        embedding: ``"one-hot"``, ``"learned"`` (orthogonal init) or ``"prototype"`` (needs ``prototypes``,
            e.g. :func:`lightning_bpfree.noprop.class_prototypes`).
        embedding_dim: ``d``; default ``K`` (``C*H*W`` for prototypes); ``d == C*H*W`` feeds the noisy
            label to the convolutions as an image.
        prototypes: ``[K, d]`` or ``[K, C, H, W]`` initial class embeddings.
        train_embedding: override whether the embeddings are trained (default: all but one-hot).
        eta: denoising-loss scale (paper: 0.1).
        max_alpha_bar: signal fraction of ``z_T``.
        hidden: width of the hidden layers.
        channels: conv widths of the image encoder.
        inference_noise: keep the ``sqrt(c_t) eps`` term at inference.
        inference_samples: inference chains whose class probabilities are averaged (1: one chain).
        lr: AdamW learning rate of every optimizer (paper: 1e-3).
        weight_decay: AdamW weight decay (paper: 1e-3).
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: Sequence[int],
        num_blocks: int = 10,
        embedding: str = "learned",
        embedding_dim: int | None = None,
        prototypes: Tensor | None = None,
        train_embedding: bool | None = None,
        eta: float = 0.1,
        max_alpha_bar: float = 0.999,
        hidden: int = 128,
        channels: Sequence[int] = (16, 32),
        inference_noise: bool = True,
        inference_samples: int = 1,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
    ) -> None:
        super().__init__(num_classes, lr, weight_decay)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.net = NoPropDTNet(
            num_classes, image_shape, num_blocks, embedding, embedding_dim, prototypes, train_embedding,
            eta, max_alpha_bar, hidden, channels, inference_noise, inference_samples,
        )  # fmt: skip

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        blocks = [self._adamw(block.parameters()) for block in self.net.blocks]
        return blocks + [self._adamw(self.net.head_parameters())]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        *block_optimizers, head_optimizer = self.optimizers()
        head_step = head_optimizer

        def step(optimizer) -> None:
            if optimizer is head_step:
                optimizer.step()  # the one counted step of this batch
            else:
                self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=_no_closure)

        losses = noprop_dt_step(
            self.net,
            block_optimizers,
            head_optimizer,
            images,
            labels,
            backward=self.manual_backward,
            step=step,
        )
        block_losses = [value for key, value in losses.items() if key.startswith("block_")]
        self.log("train_head_loss", losses["head"], prog_bar=True)
        self.log("train_block_loss", sum(block_losses) / len(block_losses), prog_bar=True)
        return torch.tensor(sum(losses.values()))


class _SingleNetwork(_Classifier):
    """CT and FM train one network with one optimizer (automatic optimization)."""

    net: NoPropCTNet | NoPropFMNet

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self._adamw(self.net.parameters())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss, parts = self.net.loss(images, labels)
        self.log("train_loss", loss, prog_bar=True)
        for name, value in parts.items():
            self.log(f"train_{name}", value)
        return loss


class NoPropCT(_SingleNetwork):
    """NoProp-CT: one time-conditioned network and a learnable noise schedule, ``t ~ U[0, 1]``.

    Args:
        num_classes: as :class:`NoPropDT`.
        image_shape: as :class:`NoPropDT`.
        embedding: as :class:`NoPropDT`.
        embedding_dim: as :class:`NoPropDT`.
        prototypes: as :class:`NoPropDT`.
        train_embedding: as :class:`NoPropDT`.
        eta: denoising-loss scale (paper: 1).
        gamma_min: ``gamma(1)``, the low end of the log-SNR range.
        gamma_max: ``gamma(0)``, the high end of the log-SNR range.
        inference_steps: ODE steps at inference.
        solver: ``"euler"`` or ``"heun"``.
        hidden: width of the hidden layers.
        channels: conv widths of the image encoder.
        lr: AdamW learning rate of every optimizer (paper: 1e-3).
        weight_decay: AdamW weight decay (paper: 1e-3).
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: Sequence[int],
        embedding: str = "learned",
        embedding_dim: int | None = None,
        prototypes: Tensor | None = None,
        train_embedding: bool | None = None,
        eta: float = 1.0,
        gamma_min: float = -4.0,
        gamma_max: float = 4.0,
        inference_steps: int = 20,
        solver: str = "euler",
        hidden: int = 128,
        channels: Sequence[int] = (16, 32),
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
    ) -> None:
        super().__init__(num_classes, lr, weight_decay)
        self.save_hyperparameters()
        self.net = NoPropCTNet(
            num_classes, image_shape, embedding, embedding_dim, prototypes, train_embedding,
            eta, gamma_min, gamma_max, inference_steps, solver, hidden, channels,
        )  # fmt: skip


class NoPropFM(_SingleNetwork):
    """NoProp-FM: flow matching from noise to the class embedding, Euler inference.

    Args:
        num_classes: as :class:`NoPropDT`.
        image_shape: as :class:`NoPropDT`.
        embedding: as :class:`NoPropDT`.
        embedding_dim: as :class:`NoPropDT`.
        prototypes: as :class:`NoPropDT`.
        train_embedding: as :class:`NoPropDT`.
        ce_weight: weight of the cross-entropy on the extrapolated ``z_1`` (0 turns it off).
        inference_steps: Euler steps at inference.
        hidden: width of the hidden layers.
        channels: conv widths of the image encoder.
        lr: AdamW learning rate of every optimizer (paper: 1e-3).
        weight_decay: AdamW weight decay (paper: 1e-3).
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: Sequence[int],
        embedding: str = "learned",
        embedding_dim: int | None = None,
        prototypes: Tensor | None = None,
        train_embedding: bool | None = None,
        ce_weight: float = 1.0,
        inference_steps: int = 20,
        hidden: int = 128,
        channels: Sequence[int] = (16, 32),
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
    ) -> None:
        super().__init__(num_classes, lr, weight_decay)
        self.save_hyperparameters()
        self.net = NoPropFMNet(
            num_classes, image_shape, embedding, embedding_dim, prototypes, train_embedding,
            ce_weight, inference_steps, hidden, channels,
        )  # fmt: skip


class BackpropBaseline(_Classifier):
    """End-to-end backprop with the blocks' image encoder and head shape, cross-entropy, AdamW."""

    def __init__(
        self,
        num_classes: int,
        image_shape: Sequence[int],
        hidden: int = 128,
        channels: Sequence[int] = (16, 32),
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
    ) -> None:
        super().__init__(num_classes, lr, weight_decay)
        self.save_hyperparameters()
        self.net = BackpropClassifier(num_classes, image_shape, hidden, channels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self._adamw(self.net.parameters())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss
