"""The benchmark: one update in-process gives the naive/BGPO equivalence; the `--quick` run (slow) writes
its table, JSON and plot and shows BGPO's flat memory against the naive objective's growth."""

import json

import pytest
import torch

from lightning_bpfree.bgpo.bench import main, memory_probe


def test_memory_probe_bgpo_and_naive_take_the_same_step():
    small = {"batch_size": 2, "prompt_length": 4, "response_length": 8, "hidden_size": 32, "num_layers": 1}
    bgpo = memory_probe("bgpo", 4, **small)
    naive = memory_probe("naive", 4, **small)
    # same seed, same draws, theta = theta_old: the surrogate and the exact loss agree in value
    assert bgpo["loss"] == pytest.approx(naive["loss"], rel=1e-5, abs=1e-6)
    # ... and in gradient (Lin et al.: the bound touches the objective at theta_old), so the update is the same
    assert bgpo["grad_norm"] > 0
    assert bgpo["grad_norm"] == pytest.approx(naive["grad_norm"], rel=1e-4)
    assert bgpo["grad_projection"] == pytest.approx(naive["grad_projection"], rel=1e-4, abs=1e-6 * bgpo["grad_norm"])
    # diffu-GRPO's one-step estimate is another objective: its gradient differs, so the check can fail
    other = memory_probe("diffu-grpo", 1, **small)
    assert other["grad_projection"] != pytest.approx(naive["grad_projection"], rel=1e-2)
    assert bgpo["seconds"] > 0 and torch.isfinite(torch.tensor(bgpo["loss"]))


@pytest.mark.slow
def test_quick_benchmark_writes_results_and_memory_is_flat(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / "bgpo-bench.json").read_text())
    assert (tmp_path / "bgpo-bench.png").stat().st_size > 10_000
    rows = {(r["objective"], r["n_t"]): r for r in figures["memory"]}
    assert figures["bgpo_peak_64_over_1"] <= 1.2
    naive_growth = rows[("naive", 64)]["above_import_mib"] - rows[("naive", 1)]["above_import_mib"]
    bgpo_growth = rows[("bgpo", 64)]["above_import_mib"] - rows[("bgpo", 1)]["above_import_mib"]
    assert naive_growth > 5 * max(bgpo_growth, 1.0)
    assert len(figures["task"]["runs"]["bgpo"]["reward"]) == figures["task"]["settings"]["rl_steps"]
