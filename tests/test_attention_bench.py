"""The ViT LightningModule and the ``bpfree attention-bench`` command."""

from __future__ import annotations

import json
import math
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree.attention import bench
from lightning_bpfree.attention.bench import _summary, fitted_exponent, main
from lightning_bpfree.attention.module import ViTClassifier
from lightning_bpfree.attention.vit import SoftmaxAttention, TinyViT


def test_fitted_exponent_recovers_power_laws():
    lengths = [1024, 2048, 4096, 8192]
    assert fitted_exponent(lengths, [3e-9 * n**2 for n in lengths]) == pytest.approx(2.0)
    assert fitted_exponent(lengths, [1e-5 * n for n in lengths]) == pytest.approx(1.0)


def test_summary_reports_targets():
    points = [
        {"method": "soft", "tokens": 4096, "seconds": 1.0, "peak_mib": 10.0},
        {"method": "soft", "tokens": 16384, "seconds": 4.5, "peak_mib": 40.0},
        {"method": "eager", "tokens": 4096, "seconds": 2.0, "peak_mib": 500.0},
        {"method": "eager", "tokens": 16384, "seconds": 32.0, "peak_mib": 8000.0},
    ]
    summary = _summary(points, [4096, 16384])
    assert summary["soft_time_16k_over_4k"] == pytest.approx(4.5)
    assert summary["target_time_ratio_met"] is True
    assert summary["soft_over_eager_memory_16k"] == pytest.approx(0.005)
    assert summary["exponent"]["eager"] == pytest.approx(2.0)
    assert summary["exponent"]["soft"] == pytest.approx(math.log(4.5) / math.log(4))


def test_softmax_baselines_agree_and_respect_padding():
    sdpa, eager = SoftmaxAttention(16, 2, "sdpa"), SoftmaxAttention(16, 2, "eager")
    eager.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 9, 16)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    torch.testing.assert_close(sdpa(x, padding), eager(x, padding), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager(x, padding)[1, :6], eager(x[1:, :6])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        SoftmaxAttention(16, 2, "flash")
    with pytest.raises(ValueError, match="attention must be one of"):
        TinyViT(attention="linear")


def test_vit_classifier_learns_digits_with_soft_attention():
    from lightning_bpfree.data import digits

    images, labels = digits()
    loader = DataLoader(TensorDataset(images[:1216], labels[:1216]), batch_size=64, shuffle=True)
    L.seed_everything(0, verbose=False)
    module = ViTClassifier("soft", lr=5e-3, image_size=8, patch_size=2, dim=32, num_landmarks=4)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=5, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, loader)
    metrics = trainer.test(module, DataLoader(TensorDataset(images[1200:], labels[1200:]), batch_size=256))[0]
    assert trainer.global_step == 95
    assert metrics["test_acc"] > 0.35  # 10 classes: chance is 0.1


def test_soft_bench_quick_writes_table_json_and_plot(tmp_path, capsys):
    code = main(
        ["--quick", "--skip-vit", "--methods", "soft", "--lengths", "128", "256", "--repeats", "1",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    figures = json.loads((tmp_path / "attention-bench.json").read_text())
    measured = {(p["method"], p["tokens"]) for p in figures["scaling"] if "seconds" in p}
    assert measured == {("soft", 128), ("soft", 256)}  # one subprocess for both lengths with --quick
    assert set(figures["summary"]["exponent"]) == {"soft"}
    assert all(p["peak_mib"] > 0 for p in figures["scaling"])
    assert (tmp_path / "attention-bench.png").stat().st_size > 10_000
    assert "| N | soft s |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--lengths", "100", "--out", str(tmp_path)])


def test_interleaved_min_seconds_alternates_lengths_and_keeps_the_fastest_round(monkeypatch):
    calls: list[int] = []
    delays = iter([0.0, 0.0, 0.15, 0.12, 0.02, 0.08, 0.10, 0.20])  # warm-ups, then rounds of (64, 128)

    def fake_step(forward, x):
        calls.append(x.shape[1])
        time.sleep(next(delays))

    monkeypatch.setattr(bench, "_attention_forward", lambda *args: None)
    monkeypatch.setattr(bench, "_forward_backward", fake_step)
    seconds = bench.interleaved_min_seconds("soft", [64, 128], repeats=3)
    assert calls == [64, 128] * 4  # one warm-up each, then every round times every length once
    # Minima 0.02 and 0.08 s; the upper ends leave 40-50 ms for sleeps overshooting on a loaded machine.
    assert 0.02 <= seconds[0] < 0.07 and 0.08 <= seconds[1] < 0.12


def test_scaling_series_without_warmup_runs_one_call(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(bench, "_forward_backward", lambda forward, x: calls.append(x.shape[1]))
    result = bench.scaling_series("soft", [128], repeats=1, warmup=0)
    assert calls == [128] and len(result["seconds"]) == len(result["extra_bytes"]) == 1
