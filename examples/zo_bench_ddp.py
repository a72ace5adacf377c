"""Data-parallel zeroth-order training on 2 CPU processes with ``ZODataParallelStrategy``.

Each rank trains on half of every batch; the loss
scalars are all-reduced, so the ranks end with bitwise identical weights (checked at the end).
``strategy="ddp"`` (Lightning's own DDPStrategy) gives the same weights: the ``ZerothOrder``
callback detects it and shares the seed and averages the losses itself.

    python examples/zo_bench_ddp.py            # 100 steps: about 10 s on two CPU cores (one process each)
    python examples/zo_bench_ddp.py --quick    # 20 steps: about 9 s
"""

import argparse

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree.zo import ZerothOrder
from lightning_bpfree.zo.strategy import ZODataParallelStrategy


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)  # replaced by ZerothOrder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 100, --quick 20)")
    parser.add_argument("--quick", action="store_true", help="a few seconds at tiny sizes, same code path (CI)")
    args = parser.parse_args()
    steps = args.steps or (20 if args.quick else 100)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=generator)
    y = (x @ torch.randn(8, 1, generator=generator)).squeeze(-1)
    pl.seed_everything(0)
    module = Regressor()
    with torch.no_grad():
        start = nn.functional.mse_loss(module.net(x).squeeze(-1), y).item()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ZODataParallelStrategy(process_group_backend="gloo"),
        callbacks=[ZerothOrder(optimizer="zo-adam", lr=0.01, eps=1e-3)], max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True))
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    with torch.no_grad():
        loss = nn.functional.mse_loss(module.net(x).squeeze(-1), y).item()
    if trainer.global_rank == 0:
        identical = all(torch.equal(gathered[0], g) for g in gathered)
        print(f"steps={trainer.global_step} start_mse={start:.4f} final_mse={loss:.4f} "
              f"ranks_bitwise_identical={identical}")  # fmt: skip


if __name__ == "__main__":
    main()
