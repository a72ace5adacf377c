"""``bpfree zo-bench``: the table, JSON and plot, with its memory accounting checked on a tiny model."""

import json

import pytest
import torch

from lightning_bpfree.zo import bench


def test_command_writes_table_json_and_plot_with_exact_memory_accounting(tmp_path, monkeypatch, capsys):
    def in_process(target, threads=None, **kwargs):  # the subprocess is the shared helper's job
        return {**bench.run_config(**kwargs), "peak_rss_bytes": 1 << 30}

    monkeypatch.setattr(bench.benchmarking, "run_in_subprocess", in_process)
    only = ["zo-sgd", "zo-adam", "fo-adamw", "zo-sgd lora"]
    assert bench.main(["--quick", "--steps", "2", "--seq-len", "16", "--out", str(tmp_path), "--only", *only]) == 0
    rows = {bench.label(r): r for r in json.loads((tmp_path / "zo-bench.json").read_text())["rows"]}
    assert set(rows) == set(only)
    assert (tmp_path / "zo-bench.png").stat().st_size > 10_000 and "| method |" in (tmp_path / "zo-bench.md").read_text()
    params = rows["zo-sgd"]["trainable_params"]
    assert rows["zo-sgd"]["forwards_per_step"] == 2
    assert rows["fo-adamw"]["forwards_per_step"] == 1
    # tiny model: ZO keeps a copy of the weights for exact restores (1x); Adam adds two moments
    assert rows["zo-sgd"]["state_bytes"] == 4 * params
    assert rows["zo-adam"]["state_bytes"] == 3 * 4 * params
    step_counters = rows["fo-adamw"]["state_bytes"] - 3 * 4 * params  # grads + moments, + one float per tensor
    assert 0 < step_counters <= 4 * 32
    assert rows["zo-sgd lora"]["trainable_params"] < params / 10
    assert "memory order" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error, no traceback
        bench.main(["--quick", "--out", str(tmp_path), "--only", "sgd"])
    assert exit_info.value.code == 2 and "argument --only: invalid choice: 'sgd'" in capsys.readouterr().err


def test_memory_part_repeats_each_configuration_and_reports_the_spread(tmp_path, monkeypatch):
    """The table plumbing only (fast): peak memory is replaced by made-up numbers whose min / median /
    max are known; the real peak memory is checked by tests/test_claims_zo.py (slow)."""
    made_up_mib = {"inference": [1000, 1012], "zo-sgd": [1006, 1004], "zo-adam": [1100, 1100],
                   "fo-sgd": [1200, 1210], "fo-adamw": [1300, 1290]}  # fmt: skip
    calls: list[tuple[str, str]] = []

    def in_process(target, threads=None, **kwargs):
        assert threads >= 1
        if target.endswith(":measure_time_ratio"):
            return bench.measure_time_ratio(**kwargs)
        assert target.endswith(":measure_memory") and kwargs["size"] == "quick" and kwargs["loop"] == "trainer"
        repeat = sum(mode == kwargs["mode"] for mode, _ in calls)
        calls.append((kwargs["mode"], kwargs["loop"]))
        return {**bench.measure_memory(**kwargs), "peak_rss_bytes": made_up_mib[kwargs["mode"]][repeat] * 2**20}

    monkeypatch.setattr(bench.benchmarking, "run_in_subprocess", in_process)
    monkeypatch.setitem(bench.TIME_PLANS, "quick", ("quick", ((1, 8), (2, 8))))
    argv = ["--part", "memory", "--quick", "--steps", "1", "--batch-size", "2", "--seq-len", "8", "--threads", "1"]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    # --quick repeats twice, interleaved: every mode once, then every mode again
    assert [mode for mode, _ in calls] == list(bench.MEMORY_MODES) * 2
    figures = json.loads((tmp_path / f"{bench.NAME}-memory.json").read_text())
    rows = {row["mode"]: row for row in figures["rows"]}
    assert list(rows) == list(bench.MEMORY_MODES) and figures["repeats"] == 2
    zo, params = rows["zo-sgd"], rows["zo-sgd"]["parameter_bytes"]
    assert params == 5_388_288 * 4  # the quick OPT config, fp32
    assert [zo["peak_min"], zo["peak_median"], zo["peak_max"]] == [1004 * 2**20, 1005 * 2**20, 1006 * 2**20]
    assert zo["extra_pct"] == pytest.approx(100 * (1005 - 1006) * 2**20 / params)  # medians: 1005 - 1006
    assert zo["extra_pct_range"] == pytest.approx([100 * (1004 - 1012) * 2**20 / params,  # its min - inference's max
                                                   100 * (1006 - 1000) * 2**20 / params])  # fmt: skip
    assert rows["fo-adamw"]["x_memory"] == pytest.approx(1295 / 1006)
    assert all(row["seconds_per_step"] > 0 for row in rows.values())
    assert [row["tokens"] for row in figures["time_ratio"]["rows"]] == [8, 16]
    assert all(row["x one forward"] > 1 for row in figures["time_ratio"]["rows"])  # a step does more than a forward
    report = (tmp_path / f"{bench.NAME}-memory.md").read_text()
    assert "| 1004 / 1005 / 1006 |" in report and "ZO-SGD extra memory on quick" in figures["verdict"]
    # 5 % of 20.6 MiB of parameters is far below the 12 MiB spread of the inference runs: no verdict on the target
    assert "not judged at this size" in figures["verdict"]
    assert (tmp_path / f"{bench.NAME}-memory.png").stat().st_size > 10_000
    from PIL import Image  # matplotlib's own dependency

    # three panels of 5 inches at 120 dpi: memory, time per configuration, and the ratio against tokens per step
    assert Image.open(tmp_path / f"{bench.NAME}-memory.png").size[0] == 3 * 5 * 120
    assert not (tmp_path / f"{bench.NAME}.json").exists()  # the methods part's files are not touched


def test_demo_trainer_runs_its_steps_and_the_progress_bar_counts_real_epochs(tmp_path):
    """``bpfree demo`` sets the epochs its steps take: the bar read ``Epoch 1/-2`` with ``max_epochs=-1``."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import RichProgressBar
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_bpfree import ZerothOrder
    from lightning_bpfree.zo import demo

    class Regressor(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters())  # replaced by ZerothOrder

    data = TensorDataset(torch.randn(12, 4), torch.randn(12))
    train_loader = DataLoader(data, batch_size=4)  # 3 batches per epoch
    bar = RichProgressBar()
    shown: list[str] = []

    class Reader(pl.Callback):  # the bar's text at each step
        def on_train_batch_end(self, trainer, *args):
            shown.append(bar._get_train_description(trainer.current_epoch).strip())

    callbacks = [ZerothOrder("zo-sgd", lr=1e-3), bar, Reader()]
    trainer = demo._trainer(7, callbacks, len(train_loader), default_root_dir=tmp_path)
    trainer.fit(Regressor(), train_loader)
    assert trainer.global_step == 7 and trainer.max_epochs == 3
    assert shown == ["Epoch 0/2"] * 3 + ["Epoch 1/2"] * 3 + ["Epoch 2/2"]

