"""The headline numbers of docs/bgpo.md, checked at a size CI can run (both tests are slow).

- memory: one policy update at the benchmark's full probe size (BERT 128 x 2, 16 rollouts of 32 + 64
  tokens), n_t = 1 and 64, each in its own process: BGPO's peak stays flat, the naive ELBO ratio's grows;
- the 2-digit addition task: warm-up to 30 % sampled accuracy, then 30 BGPO steps (the benchmark runs
  150) raise the held-out accuracy above the warm-up's.

Bounds come from measurements on the 2-core CPU machine (torch 2.13, seed 0), quoted next to them.
"""

import pytest

from lightning_bpfree import benchmarking
from lightning_bpfree.bgpo.bench import MEMORY_TARGET, addition_task_run


def _peak_mib(objective: str, num_mc_samples: int) -> float:
    result = benchmarking.run_in_subprocess(
        "lightning_bpfree.bgpo.bench:memory_probe",
        threads=1,
        objective=objective,
        num_mc_samples=num_mc_samples,
        seed=0,
    )
    return benchmarking.mib(result["peak_rss_bytes"])


@pytest.mark.slow
def test_bgpo_memory_is_flat_in_monte_carlo_samples_at_the_benchmarks_size():
    peaks = {(objective, n_t): _peak_mib(objective, n_t) for objective in ("bgpo", "naive") for n_t in (1, 64)}
    # Measured peak RSS (MiB): bgpo 446.0 -> 465.6 (1.044x; docs 1.036x / 1.041x), naive 443.1 -> 2691.4 (6.07x;
    # docs 6.1x). BGPO's bound is the benchmark's target, 1.2x (about 90 MiB above 446, room for the
    # allocator's +-60 MiB); the naive objective keeps all 64 draws' graphs, about 35 MiB each.
    assert peaks[("bgpo", 64)] <= MEMORY_TARGET * peaks[("bgpo", 1)]
    assert peaks[("naive", 64)] >= 4.0 * peaks[("naive", 1)]
    assert peaks[("naive", 64)] - peaks[("naive", 1)] >= 1500
    assert peaks[("naive", 64)] - peaks[("naive", 1)] >= 10 * max(peaks[("bgpo", 64)] - peaks[("bgpo", 1)], 60.0)


@pytest.mark.slow
def test_addition_task_bgpo_raises_held_out_accuracy_above_the_warm_up():
    # The benchmark's full task (2 digits, 1000 held-out prompts, 16 prompts x 8 answers per step, n_t = 4),
    # cut from 150 RL steps to 30.
    result = addition_task_run(False, 0, objectives=("bgpo",), rl_steps=30)
    warm, run = result["after_warmup"], result["runs"]["bgpo"]
    assert result["settings"]["rl_steps"] == 30 and len(run["reward"]) == 30
    # Measured (seed 0): warm-up stopped after 725 steps at held-out greedy 0.516 / sampled 0.349; after
    # 30 BGPO steps 0.732 / 0.499. In 80-step runs, at step 30: seed 0 0.516 -> 0.685, seed 1 0.576 -> 0.888,
    # seed 2 0.486 -> 0.818. The smallest greedy gain seen at 30 steps was +0.17; the bound asks for half of it.
    assert 0.3 <= warm["greedy_accuracy"] <= 0.8  # the warm-up ends near its 30 % sampled-accuracy target
    assert run["greedy_accuracy"] >= warm["greedy_accuracy"] + 0.08
    assert run["sampled_accuracy"] >= warm["sampled_accuracy"] + 0.05
    # the rollout reward rises during RL too (measured: first 10 steps 0.418, last 10 0.484)
    assert sum(run["reward"][-10:]) > sum(run["reward"][:10])


def test_addition_task_run_refuses_unknown_settings():
    # the CI-sized run shortens the task through overrides; a misspelt one must not run the full task silently
    with pytest.raises(TypeError, match="rl_step"):
        addition_task_run(True, 0, rl_step=30)
