"""Zeroth-order fine-tuning in 30 seconds: an unmodified LightningModule, trained with forward passes only.

A tiny LLaMA built from a config learns to continue a repeating token pattern, first with the
``ZerothOrder`` callback (MeZO, full parameters), then the same optimizer in a raw PyTorch loop.

    python examples/zo_quickstart.py            # 300 + 300 steps: about 20 s on one CPU core
    python examples/zo_quickstart.py --quick    # 40 + 40 steps: about 10 s
"""

import argparse

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree import ZerothOrder
from lightning_bpfree.models import tiny_causal_lm
from lightning_bpfree.zo import ZOSGD
from lightning_bpfree.zo.module import CausalLMModule


def pattern_batches(num: int = 256, length: int = 16, vocab: int = 32) -> torch.Tensor:
    """Sequences ``a, a+1, a+2, ...`` (mod ``vocab``) from random starts: easy to learn."""
    starts = torch.randint(3, vocab, (num, 1), generator=torch.Generator().manual_seed(0))
    return (starts + torch.arange(length)) % (vocab - 3) + 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="steps of each loop (default 300, --quick 40)")
    parser.add_argument("--quick", action="store_true", help="a few seconds at tiny sizes, same code path (CI)")
    args = parser.parse_args()
    steps = args.steps or (40 if args.quick else 300)

    pl.seed_everything(0)
    ids = pattern_batches()
    module = CausalLMModule(tiny_causal_lm("llama", vocab_size=32, hidden_size=32, num_layers=2, seed=0))
    with torch.no_grad():
        start = module.loss(ids).item()
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[ZerothOrder("zo-sgd", lr=3e-3, eps=1e-3)],
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=32, shuffle=True))
    with torch.no_grad():
        end = module.loss(ids).item()
    print(f"Lightning + ZerothOrder: loss {start:.3f} -> {end:.3f} in {trainer.global_step} steps, "
          f"no .grad allocated: {all(p.grad is None for p in module.parameters())}")  # fmt: skip

    # The same optimizer without Lightning: step(closure) runs the forwards under no_grad.
    model = tiny_causal_lm("llama", vocab_size=32, hidden_size=32, num_layers=2, seed=0)
    with torch.no_grad():
        start = model(input_ids=ids, labels=ids).loss.item()
    optimizer = ZOSGD(model.parameters(), lr=3e-3, eps=1e-3)
    for step in range(steps):
        batch = ids[(step % 8) * 32 : (step % 8 + 1) * 32]
        optimizer.step(lambda batch=batch: model(input_ids=batch, labels=batch).loss)
    with torch.no_grad():
        end = model(input_ids=ids, labels=ids).loss.item()
    print(f"raw PyTorch loop: loss {start:.3f} -> {end:.3f} in {steps} steps")


if __name__ == "__main__":
    main()
