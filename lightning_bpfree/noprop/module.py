"""LightningModules around the plain-PyTorch NoProp networks in :mod:`lightning_bpfree.noprop.algorithms`.

Batches are ``(images [B, C, H, W], labels [B])``; ``model(images)`` runs inference and returns class
logits ``[B, K]``. Validation and test accuracy are logged as ``val_acc`` / ``test_acc`` (torchmetrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_bpfree.noprop.algorithms import NoPropCTNet, NoPropDTNet, NoPropFMNet, noprop_dt_step
from lightning_bpfree.noprop.backbone import BackpropClassifier
from lightning_bpfree.validation import check_int, check_nonnegative_float, check_positive_float


def _no_closure() -> None:
    return None


class _Classifier(L.LightningModule):
    """What every variant shares: the construction of its plain-PyTorch network (``net_class``, given
    ``num_classes``, ``image_shape`` and the ``**net_options``), AdamW, ``forward`` giving logits, and
    accuracy logged per epoch.

    The variants' own arguments are those of their network; only ``lr`` and ``weight_decay`` are the
    module's, so each network's signature is written once, in :mod:`lightning_bpfree.noprop.algorithms`.
    """

    net_class: type[torch.nn.Module]
    net: torch.nn.Module

    def __init__(
        self,
        num_classes: int,
        image_shape: Sequence[int],
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        **net_options: Any,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, low=2)  # before torchmetrics gives its own message
        self.lr = check_positive_float("lr", lr)
        self.weight_decay = check_nonnegative_float("weight_decay", weight_decay)
        self.save_hyperparameters()  # num_classes, image_shape, lr, weight_decay and the net options given
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.net = self.net_class(num_classes, image_shape, **net_options)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def _adamw(self, parameters) -> torch.optim.Optimizer:
        return torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)

    def configure_optimizers(self) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
        return self._adamw(self.net.parameters())  # one network, one optimizer (NoPropDT overrides)

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
        lr: AdamW learning rate of every optimizer (paper: 1e-3).
        weight_decay: AdamW weight decay (paper: 1e-3).
        **net_options: the keyword arguments of :class:`~lightning_bpfree.noprop.NoPropDTNet`:
            ``num_blocks`` (``T``, paper: 10), ``eta`` (paper: 0.1), ``max_alpha_bar``,
            ``inference_noise``, ``inference_samples``, and the options every variant shares
            (``embedding``, ``embedding_dim``, ``prototypes``, ``train_embedding``, ``hidden``, ``channels``).
    """

    net_class = NoPropDTNet
    net: NoPropDTNet

    @property
    def automatic_optimization(self) -> bool:
        return False  # one optimizer per block, stepped in training_step

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

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss, parts = self.net.loss(images, labels)
        self.log("train_loss", loss, prog_bar=True)
        for name, value in parts.items():
            self.log(f"train_{name}", value)
        return loss


class NoPropCT(_SingleNetwork):
    """NoProp-CT: one time-conditioned network and a learnable noise schedule, ``t ~ U[0, 1]``.

    ``num_classes``, ``image_shape``, ``lr`` and ``weight_decay`` as in :class:`NoPropDT`; the other
    keyword arguments (``**net_options``) are those of :class:`~lightning_bpfree.noprop.NoPropCTNet`:
    ``eta`` (paper: 1), ``gamma_min``, ``gamma_max``, ``inference_steps``, ``solver`` (``"euler"`` or
    ``"heun"``), and the options every variant shares.
    """

    net_class = NoPropCTNet


class NoPropFM(_SingleNetwork):
    """NoProp-FM: flow matching from noise to the class embedding, Euler inference.

    ``num_classes``, ``image_shape``, ``lr`` and ``weight_decay`` as in :class:`NoPropDT`; the other
    keyword arguments are those of :class:`~lightning_bpfree.noprop.NoPropFMNet`: ``ce_weight``
    (weight of the cross-entropy on the extrapolated ``z_1``; 0 turns it off), ``inference_steps``,
    and the options every variant shares.
    """

    net_class = NoPropFMNet


class BackpropBaseline(_Classifier):
    """End-to-end backprop with the blocks' image encoder and head shape, cross-entropy, AdamW.

    ``num_classes``, ``image_shape``, ``lr`` and ``weight_decay`` as in :class:`NoPropDT`; ``hidden``
    and ``channels`` go to :class:`~lightning_bpfree.noprop.BackpropClassifier`.
    """

    net_class = BackpropClassifier

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss
