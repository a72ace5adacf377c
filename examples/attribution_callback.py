"""Watch what a small LM attends to while it learns key-value retrieval: ReAGentCallback in a Lightning run.

Heatmaps (PNG + HTML) of two fixed prompts are written after every validation epoch under
``<out>/reagent/epoch=<e>/``; the callback also logs ``reagent/soft_ns``, ``reagent/soft_nc`` and
``reagent/probe_steps``.

    python examples/attribution_callback.py [--out attribution-callback]   # 5 epochs of 6,400 prompts: about 14 s
    python examples/attribution_callback.py --quick    # 2 epochs of 640 prompts, 4 probes: about 8 s

Soft-NS / Soft-NC are left out of the logged metrics while the model predicts the target no better from the
prompt than from an empty one (they have no scale then); after one quick epoch that is often the case.

(Times on one CPU core.)
"""

import argparse
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree import ReAGentCallback
from lightning_bpfree.attribution.retrieval_task import VOCAB_SIZE, retrieval_batch
from lightning_bpfree.models import tiny_causal_lm


class RetrievalLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_causal_lm("gpt2", vocab_size=VOCAB_SIZE, hidden_size=64, num_layers=1, num_heads=4)

    def training_step(self, batch, batch_idx):
        ids, answers = batch
        loss = torch.nn.functional.cross_entropy(self.model(ids).logits[:, -1], answers)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        ids, answers = batch
        accuracy = (self.model(ids).logits[:, -1].argmax(-1) == answers).float().mean()
        self.log("val_accuracy", accuracy, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("attribution-callback"), help="heatmaps: <out>/reagent")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 5, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="fewer prompts, epochs and probes, same code path (CI)")
    args = parser.parse_args()
    epochs = args.epochs or (2 if args.quick else 5)
    L.seed_everything(0, verbose=False)
    num_train, num_val, num_probes = (640, 128, 4) if args.quick else (6400, 512, 16)

    train_ids, train_answers, _ = retrieval_batch(num_train, torch.Generator().manual_seed(0))
    val_ids, val_answers, asked = retrieval_batch(num_val, torch.Generator().manual_seed(1))
    prompts = [val_ids[0], val_ids[1]]
    print("answer-bearing positions of the two prompts:", asked[:2].tolist())
    callback = ReAGentCallback(prompts, every_n_epochs=1, keep_top_n=2, stopping_top_k=1, num_probes=num_probes)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[callback], default_root_dir=args.out,
                        accelerator="cpu", logger=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(
        RetrievalLM(),
        DataLoader(TensorDataset(train_ids, train_answers), batch_size=64, shuffle=True),
        DataLoader(TensorDataset(val_ids, val_answers), batch_size=512),
    )
    for record in callback.last_results:
        ranked = sorted(range(len(record["importance"])), key=lambda i: -record["importance"][i])
        print(f"prompt {record['prompt']}: positions by importance {ranked}, heatmap {record['png']}")
    print({k: round(float(v), 3) for k, v in trainer.callback_metrics.items()})


if __name__ == "__main__":
    main()
