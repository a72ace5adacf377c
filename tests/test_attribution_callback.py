"""ReAGentCallback in a real Lightning run: heatmap files, logged faithfulness, epoch schedule."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree import ReAGentCallback
from lightning_bpfree.models import tiny_causal_lm


class TinyLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_causal_lm("llama", vocab_size=48, hidden_size=16, seed=0)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(ids, labels=ids).loss

    def validation_step(self, batch, batch_idx):
        (ids,) = batch
        self.log("val_loss", self.model(ids, labels=ids).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, callback, epochs=2):
    data = DataLoader(TensorDataset(torch.randint(3, 48, (8, 10), generator=torch.Generator().manual_seed(0))), 4)
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=[callback], default_root_dir=tmp_path, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        num_sanity_val_steps=1,
    )  # fmt: skip
    trainer.fit(TinyLM(), data, data)
    return trainer


def test_writes_png_and_html_per_prompt_and_logs_faithfulness(tmp_path):
    prompts = [torch.tensor([5, 9, 12, 30, 7, 22]), torch.tensor([40, 3, 18, 11, 26, 9, 14, 8])]
    callback = ReAGentCallback(prompts, dirpath=tmp_path / "heatmaps", num_probes=4, max_probe_steps=20, keep_top_n=2)
    trainer = _fit(tmp_path, callback)
    for epoch in (0, 1):
        for index, prompt in enumerate(prompts):
            png = tmp_path / "heatmaps" / f"epoch={epoch}" / f"prompt_{index}.png"
            page = tmp_path / "heatmaps" / f"epoch={epoch}" / f"prompt_{index}.html"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert page.read_text().count("<span title=") == prompt.numel()
    assert not (tmp_path / "heatmaps" / "epoch=2").exists()  # the sanity check wrote nothing extra
    assert 0.0 <= float(trainer.callback_metrics["reagent/soft_ns"]) <= 1.0
    assert float(trainer.callback_metrics["reagent/soft_nc"]) >= 0.0
    assert float(trainer.callback_metrics["reagent/probe_steps"]) >= 1.0
    record = callback.last_results[1]
    assert len(record["importance"]) == 8 and sum(record["importance"]) == pytest.approx(1.0, abs=1e-5)


def test_every_n_epochs_skips_the_others(tmp_path):
    callback = ReAGentCallback(
        [torch.tensor([5, 9, 12, 30, 7])], every_n_epochs=2, dirpath=tmp_path / "h", num_probes=2,
        max_probe_steps=5, keep_top_n=2, faithfulness=False,
    )  # fmt: skip
    _fit(tmp_path, callback, epochs=3)
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["epoch=1"]


def test_bad_arguments_raise_clearly():
    with pytest.raises(ValueError, match="tokenizer"):
        ReAGentCallback(["a prompt"])
    with pytest.raises(ValueError, match="non-empty list"):
        ReAGentCallback("a prompt")
    with pytest.raises(ValueError, match="every_n_epochs"):
        ReAGentCallback([torch.tensor([1, 2, 3])], every_n_epochs=0)
