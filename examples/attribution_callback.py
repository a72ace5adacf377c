"""Watch what a small LM attends to while it learns key-value retrieval: ReAGentCallback in a Lightning run.

Run: ``python examples/attribution_callback.py``. Heatmaps (PNG + HTML) of two fixed prompts are written
after every validation epoch under ``attribution-callback/reagent/epoch=<e>/``; the callback also logs
``reagent/soft_ns``, ``reagent/soft_nc`` and ``reagent/probe_steps``.
"""

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
    train_ids, train_answers, _ = retrieval_batch(6400, torch.Generator().manual_seed(0))
    val_ids, val_answers, asked = retrieval_batch(512, torch.Generator().manual_seed(1))
    prompts = [val_ids[0], val_ids[1]]
    print("answer-bearing positions of the two prompts:", asked[:2].tolist())
    callback = ReAGentCallback(prompts, every_n_epochs=1, keep_top_n=2, stopping_top_k=1, num_probes=16)
    trainer = L.Trainer(max_epochs=5, callbacks=[callback], default_root_dir="attribution-callback",
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
