"""``ZerothOrder`` inside a Lightning ``Trainer`` walks exactly the trajectory of a raw ``opt.step`` loop.

For every optimizer name: same initial weights, same seed, same batches, 5 steps; the weights after
each step are compared bitwise. Two ways to agree on the parameter groups: ``no_decay=None`` (one
group, ``model.parameters()`` in the raw loop), and the default ``no_decay`` with the raw loop built
from :func:`~lightning_bpfree.zo.weight_decay.weight_decay_groups` (the recipe in docs/zo.md).
"""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree import ZerothOrder
from lightning_bpfree.zo import OPTIMIZERS, make_optimizer
from lightning_bpfree.zo.weight_decay import weight_decay_groups

STEPS, BATCH = 5, 16
OPTIONS = {
    "zo-sgd": dict(lr=0.01),
    "zo-sgd-sign": dict(lr=0.01),
    "zo-sgd-mmt": dict(lr=0.01, momentum=0.9),
    "zo-sgd-cons": dict(lr=0.01),
    "zo-adam": dict(lr=0.01),
    "forward-grad": dict(lr=0.01),
}


def batches():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * BATCH, 6, generator=generator)
    y = torch.sin(x.sum(-1, keepdim=True))
    return TensorDataset(x, y)


class Net(pl.LightningModule):
    """A linear layer, a LayerNorm, a linear layer: biases and norm weights for the decay groups."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 1))
        self.after_each_step: list[list[torch.Tensor]] = []

    def loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.after_each_step.append([p.detach().clone() for p in self.parameters()])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)  # replaced by ZerothOrder


def with_raw_loop(name: str, options: dict, grouped: bool) -> list[list[torch.Tensor]]:
    module = Net().eval()  # ZerothOrder runs the perturbed forwards in eval mode
    params = weight_decay_groups(module, options["weight_decay"]) if grouped else module.parameters()
    opt = make_optimizer(name, params, **options)
    out = []
    for batch in DataLoader(batches(), batch_size=BATCH, shuffle=False):
        opt.step(lambda batch=batch: module.loss(batch))
        out.append([p.detach().clone() for p in module.parameters()])
    return out


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("grouped", [False, True], ids=["no_decay=None", "default-groups"])
def test_zeroth_order_trajectory_equals_a_raw_step_loop_bitwise(name, grouped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Lightning may write lightning_logs / checkpoints
    options = dict(OPTIONS[name], eps=1e-3, weight_decay=0.1, seed=5)
    callback = ZerothOrder(name, **options) if grouped else ZerothOrder(name, no_decay=None, **options)
    module = Net()
    trainer = pl.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(module, DataLoader(batches(), batch_size=BATCH, shuffle=False))
    lightning = module.after_each_step
    raw = with_raw_loop(name, options, grouped)
    assert len(lightning) == len(raw) == STEPS
    start = [p.detach() for p in Net().parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(raw[-1], start))  # the weights moved
    for step, (a_step, b_step) in enumerate(zip(lightning, raw)):
        for a, b in zip(a_step, b_step):
            assert torch.equal(a, b), f"{name}: step {step} differs by {(a - b).abs().max().item():.3g}"
