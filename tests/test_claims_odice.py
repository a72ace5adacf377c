"""The ODICE numbers of docs/odice.md, checked at a size CI affords (docs/claims.md, section ODICE).

``bpfree odice-bench`` trains every gradient rule for 10,000 steps on three Pendulum datasets with three
seeds (27 runs, 27 minutes on one core). Its headline ranking (orthogonal 55.7 > true 45.9 > semi 31.3
on average) is decided by medium-expert, where the semi-gradient collapses only after 5,000 steps; at
the horizons CI affords, the semi-gradient leads on every dataset measured (docs/odice.md, "At CI size").
So this file checks, with the benchmark's own code (``bench.train_one``) and setting (``BENCH_SETTINGS``),
on the benchmark's medium-replay dataset (seed 0), three seeds, STEPS steps per run:

- the claim that holds at this size: the semi-gradient wins medium-replay;
- the weaker parts of the ranking claim that hold robustly: the orthogonal rule learns (it ends above the
  behaviour data's return), and the true gradient's forward and backward parts nearly cancel.

Every bound comes from runs of exactly this configuration; the comments give the numbers.
"""

import numpy as np
import pytest

from lightning_bpfree.odice import bench
from lightning_bpfree.odice.behaviour import load_or_make_datasets
from lightning_bpfree.odice.datasets import normalized_return, single_thread

pytest.importorskip("gymnasium")

STEPS = 2500
SEEDS = (0, 1, 2)
KIND = "medium-replay"
# Measured with this configuration (normalized return, mean of the evaluations at steps 2,000 and 2,500,
# seeds 0, 1, 2): semi 31.5, 27.1, 29.2 (mean 29.2); orthogonal 18.4, 8.9, 15.9 (14.4); true 15.9, 3.9, 8.2 (9.3).
SEMI_MARGIN = 7.0  # semi's lead, measured 14.9 over orthogonal and 19.9 over true: about half of it
ORTHOGONAL_GAIN = 7.0  # orthogonal above the behaviour data (-0.31), measured +14.7: about half of it


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("odice-data")
    with single_thread():
        # the benchmark's dataset: the replay buffer of the seed-0 TD3 run (4,000 transitions)
        data = load_or_make_datasets("Pendulum-v1", [KIND], cache_dir=cache, num_steps=20_000, seed=0)[KIND]
        settings = bench.TrainSettings(steps=STEPS, eval_every=500, **bench.BENCH_SETTINGS)
        path = str(cache / f"Pendulum-v1-{KIND}-20000-s0.npz")
        results = {
            rule: [bench.train_one(path, rule, seed, settings) for seed in SEEDS] for rule in bench.GRADIENT_RULES
        }
    behaviour = normalized_return("Pendulum-v1", float(data.episode_returns().mean()))
    return {"behaviour": behaviour, "results": results}


def _mean_final(runs: dict, rule: str) -> float:
    return float(np.mean([r["final_normalized_return"] for r in runs["results"][rule]]))


@pytest.mark.slow
def test_semi_gradient_wins_medium_replay(runs):
    semi, orthogonal, true = (_mean_final(runs, rule) for rule in ("semi", "orthogonal", "true"))
    # Docs (10,000 steps): semi 54.6 against orthogonal 24.5 and true 10.5; here see SEMI_MARGIN.
    assert semi >= orthogonal + SEMI_MARGIN and semi >= true + SEMI_MARGIN, (semi, orthogonal, true)


@pytest.mark.slow
def test_orthogonal_rule_ends_above_the_behaviour_data(runs):
    finals = [r["final_normalized_return"] for r in runs["results"]["orthogonal"]]
    # behaviour data -0.31; docs (10,000 steps) orthogonal 24.5 +- 2.0; here see ORTHOGONAL_GAIN.
    assert runs["behaviour"] < 0 and np.mean(finals) >= runs["behaviour"] + ORTHOGONAL_GAIN, finals


@pytest.mark.slow
def test_true_gradient_parts_nearly_cancel(runs):
    cosines = {rule: np.mean([r["mean_cos_forward_backward"] for r in rs]) for rule, rs in runs["results"].items()}
    # Docs: cos(g_f, g_b) -0.9999 to -1 under the true gradient, -0.94 to -0.996 under the orthogonal rule.
    # Here (mean over training): true -1.0000 on every seed, orthogonal about -0.88.
    assert cosines["true"] <= -0.999 and cosines["true"] < cosines["orthogonal"] < 0, cosines
