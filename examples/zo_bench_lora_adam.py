"""ZO-Adam on a LoRA model, block-wise, with a sparse perturbation and a first-order head.

A tiny LLaMA on character tokens; swap ``tiny_causal_lm`` for ``lightning_bpfree.models.load_smollm2()[0]``
to train the real model.

    python examples/zo_bench_lora_adam.py            # 60 steps: about 15 s on one CPU core
    python examples/zo_bench_lora_adam.py --quick    # 12 steps: about 10 s
"""

import argparse

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_bpfree.data import split_texts, stdlib_docstrings
from lightning_bpfree.models import tiny_causal_lm
from lightning_bpfree.zo import FirstOrderPart, GradientSparsity, ZerothOrder, apply_scheme, find_blocks
from lightning_bpfree.zo.bench import char_blocks, evaluate
from lightning_bpfree.zo.peft_schemes import output_head


class CausalLM(pl.LightningModule):
    """A plain Lightning module: its training_step returns the next-token loss."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def training_step(self, input_ids, batch_idx):
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)  # replaced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 60, --quick 12)")
    parser.add_argument("--quick", action="store_true", help="a few seconds at tiny sizes, same code path (CI)")
    args = parser.parse_args()
    steps = args.steps or (12 if args.quick else 60)
    torch.set_num_threads(1)
    train_texts, held_out_texts = split_texts(stdlib_docstrings())
    train, held_out = char_blocks(train_texts, 64), char_blocks(held_out_texts, 64)[:32]
    model = apply_scheme(tiny_causal_lm("llama", hidden_size=64), "lora", r=8, lora_alpha=16)
    head = output_head(model)
    head.requires_grad_(True)  # trained by backprop next to the ZO-trained adapters
    before = evaluate(model, held_out, 8)
    zeroth_order = ZerothOrder(
        optimizer="zo-adam", lr=1e-2, eps=1e-2, seed=0,
        blocks=find_blocks(model, "layer"),                        # one estimate per transformer layer
        sparsity=GradientSparsity(0.5, resample_every=10),         # half of each tensor left alone
        first_order=FirstOrderPart(head.parameters(), lr=3e-3),    # hybrid ZO/FO
    )  # fmt: skip
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", callbacks=[zeroth_order], logger=False,
                         enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(CausalLM(model), DataLoader(train, batch_size=8, shuffle=True))
    after = evaluate(model, held_out, 8)
    print(f"held-out loss {before[0]:.4f} -> {after[0]:.4f} nats/token, accuracy {before[1]:.4f} -> {after[1]:.4f}")


if __name__ == "__main__":
    main()
