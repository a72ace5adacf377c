"""Every ZO-Bench optimizer and enhancement through ``ZerothOrder`` in a Lightning Trainer."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree.zo import OPTIMIZERS, FirstOrderPart, GradientSparsity, ZerothOrder, find_blocks


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())


class OptimizerSpy(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.optimizer_type = type(trainer.optimizers[0])


def fit(callback, module, steps=5):  # odd: sign steps of +-lr cannot cancel out
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    y = (x @ torch.randn(8, 1, generator=generator)).squeeze(-1)
    spy = OptimizerSpy()
    trainer = pl.Trainer(
        callbacks=[callback, spy], max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    trainer.spy = spy
    return trainer


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_name_trains_through_the_callback(name):
    torch.manual_seed(0)
    module = Regressor()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = fit(ZerothOrder(optimizer=name, lr=1e-2, eps=1e-3, seed=0), module)
    assert trainer.global_step == 5
    assert trainer.spy.optimizer_type is OPTIMIZERS[name]
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert all(p.grad is None for p in module.parameters())
    assert torch.isfinite(trainer.callback_metrics["zo/loss"])


def test_hybrid_blocks_and_sparsity_through_the_callback():
    torch.manual_seed(0)
    module = Regressor()
    head_before = [p.detach().clone() for p in module.net[2].parameters()]
    body_before = [p.detach().clone() for p in module.net[0].parameters()]
    callback = ZerothOrder(
        optimizer="zo-adam", lr=1e-2, seed=0,
        first_order=FirstOrderPart(module.net[2].parameters(), lr=1e-2),
        blocks=find_blocks(module.net[:1], "module"), sparsity=GradientSparsity(0.5, resample_every=100),
    )  # fmt: skip
    trainer = fit(callback, module)
    assert trainer.global_step == 5
    assert all(not torch.equal(a, b) for a, b in zip(head_before, module.net[2].parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(body_before, module.net[0].parameters()))
    weight_moved = module.net[0].weight != body_before[0]
    assert weight_moved.float().mean().item() == 0.5  # the masked half never moves
