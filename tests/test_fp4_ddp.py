"""NVFP4Precision under DDP on CPU (two spawned processes, gloo): layers converted in place, training runs."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree import NVFP4Precision
from lightning_bpfree.fp4 import FP4Linear
from lightning_bpfree.models import tiny_causal_lm


class _TinyLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_causal_lm("llama", vocab_size=128, hidden_size=32, num_layers=1, num_heads=2)
        self.model.train()

    def training_step(self, batch, batch_idx):
        # DDP ignores convert_module's return value: the layers must have been swapped in place.
        fp4 = [m for m in self.model.modules() if isinstance(m, FP4Linear)]
        assert len(fp4) == 7, len(fp4)
        (input_ids,) = batch
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


@pytest.mark.slow
def test_ddp_spawn_trains_with_in_place_fp4_layers():
    task = _TinyLM()
    before = task.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    data = TensorDataset(torch.randint(3, 128, (32, 32), generator=torch.Generator().manual_seed(0)))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, plugins=[NVFP4Precision()],
    )  # fmt: skip
    trainer.fit(task, DataLoader(data, batch_size=4))
    after = task.model.model.layers[0].mlp.up_proj.weight.detach()
    assert torch.isfinite(after).all() and not torch.equal(before, after)
