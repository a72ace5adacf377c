"""Train a small LLaMA-style byte-level LM with ``Trainer(plugins=[NVFP4Precision()])`` and compare with fp32.

The model is built from a transformers config (nothing downloads) and trained on the docstrings of
Python's standard library.

    python examples/fp4_nvfp4_trainer.py            # 100 steps each, 256 held-out blocks: about 70 s on one CPU core
    python examples/fp4_nvfp4_trainer.py --quick    # 15 steps each, 64 held-out blocks: about 20 s
"""

import argparse

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree import NVFP4Precision
from lightning_bpfree.fp4.bench import byte_blocks, evaluate
from lightning_bpfree.models import tiny_causal_lm


class ByteLM(pl.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.model = tiny_causal_lm("llama", vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, seed=0)
        self.model.train()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


def train(steps: int, plugins: list, held_out: int) -> tuple[float, float]:
    """Held-out next-byte loss (nats) of the model before and after ``steps`` training steps."""
    train_blocks, val_blocks = byte_blocks(seq_len=64)
    val_blocks = val_blocks[:held_out]
    loader = DataLoader(TensorDataset(train_blocks), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    task = ByteLM()
    before = evaluate(task.model, val_blocks)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         plugins=plugins)  # fmt: skip
    trainer.fit(task, loader)
    with trainer.precision_plugin.forward_context():
        return before, evaluate(task.model, val_blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 100, --quick 15)")
    parser.add_argument("--quick", action="store_true", help="a few seconds at tiny sizes, same code path (CI)")
    args = parser.parse_args()
    steps = args.steps or (15 if args.quick else 100)
    held_out = 64 if args.quick else 256
    start, fp32 = train(steps, plugins=[], held_out=held_out)
    # The LM head stays high precision by default; keep the last block too (the paper keeps ~15% of linears).
    _, nvfp4 = train(steps, plugins=[NVFP4Precision(high_precision_last_n=1)], held_out=held_out)
    print(f"held-out loss {start:.4f} before training; after {steps} steps: fp32 {fp32:.4f}, NVFP4 {nvfp4:.4f} "
          f"({100 * (nvfp4 / fp32 - 1):+.2f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
