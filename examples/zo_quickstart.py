"""Zeroth-order fine-tuning in 30 seconds: an unmodified LightningModule, trained with forward passes only.

A tiny LLaMA built from a config learns to continue a repeating token pattern, first with the
``ZerothOrder`` callback (MeZO, full parameters), then the same optimizer in a raw PyTorch loop.

    python examples/zo_quickstart.py
"""

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
    pl.seed_everything(0)
    ids = pattern_batches()
    module = CausalLMModule(tiny_causal_lm("llama", vocab_size=32, hidden_size=32, num_layers=2, seed=0))
    with torch.no_grad():
        start = module.loss(ids).item()
    trainer = pl.Trainer(
        max_steps=300, accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[ZerothOrder("zo-sgd", lr=3e-3, eps=1e-3)],
    )  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=32, shuffle=True))
    with torch.no_grad():
        end = module.loss(ids).item()
    print(f"Lightning + ZerothOrder: loss {start:.3f} -> {end:.3f} in {trainer.global_step} steps, "
          f"no .grad allocated: {all(p.grad is None for p in module.parameters())}")  # fmt: skip

    # The same optimizer without Lightning: step(closure) runs the forwards under no_grad.
    model = tiny_causal_lm("llama", vocab_size=32, hidden_size=32, num_layers=2, seed=0)
    optimizer = ZOSGD(model.parameters(), lr=3e-3, eps=1e-3)
    for step in range(300):
        batch = ids[(step % 8) * 32 : (step % 8 + 1) * 32]
        loss = optimizer.step(lambda batch=batch: model(input_ids=batch, labels=batch).loss)
    print(f"raw PyTorch loop: last training loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
