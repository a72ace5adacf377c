"""The NoProp numbers of docs/noprop.md, checked at a size CI affords (docs/claims.md, section NoProp).

The benchmark behind the docs' table (``bpfree noprop-bench``) trains on 6,000 Fashion-MNIST images for
20 epochs and tests on all 10,000. Here the same code (``bench.train_config``), the same model, optimizer,
learning rate, batch and seed train for the benchmark's first EPOCHS epochs and are tested once, after
the last epoch, on the first TEST_LIMIT test images. One module-scoped fit per method serves all three
tests. Every bound below comes from runs of exactly this configuration; the comments give the numbers.
"""

import statistics

import pytest

from lightning_bpfree import benchmarking
from lightning_bpfree.noprop import bench

EPOCHS = 5
TEST_LIMIT = 1000
CI_RUN = dict(
    epochs=EPOCHS, train_limit=6000, test_limit=TEST_LIMIT, batch_size=128, num_blocks=10, hidden=128,
    channels=[16, 32], lr=3e-3, seed=0, evaluate_every_epoch=False,
)  # fmt: skip
CHAINS = 8
# DT without inference noise may trail backprop by at most this much here: measured gaps after 5 epochs
# (seeds 0, 1, 2; backprop / DT %) 84.3 / 82.7, 85.1 / 83.4, 84.3 / 85.0, so -1.6, -1.7, +0.7 points.
# The docs' 20-epoch run was 0.7 points behind at its 5th epoch and 1.15 points ahead by the 20th.
DT_BOUND = 0.03
# 8 noisy chains must gain at least this much over one: measured +5.5, +5.0, +3.5 points (seeds 0, 1, 2)
CHAIN_GAIN = 0.015
# DT / backprop CPU seconds per training epoch: measured 10.1x, 9.4x, 9.9x (seeds 0, 1, 2, on a heavily
# loaded 2-core machine, where DT's larger working set suffers more); the docs' idle wall-clock 8.4x
RATIO_BAND = (6.0, 13.0)


@pytest.fixture(scope="module")
def fits() -> dict[str, dict]:
    # one thread, as the benchmark's table was measured; the timing ratio below is of CPU seconds, which
    # the other jobs on a shared machine disturb far less than wall-clock seconds
    with benchmarking.using_threads(1):
        return {
            "backprop": bench.train_config("backprop", **CI_RUN),
            "noprop-dt": bench.train_config("noprop-dt", **CI_RUN, inference_samples=(1, CHAINS)),
        }


@pytest.mark.slow
def test_dt_without_inference_noise_is_within_bound_of_backprop(fits):
    backprop = fits["backprop"]["accuracy"][-1]
    dt = fits["noprop-dt"]["accuracy_without_inference_noise"][-1]
    # Docs (20 epochs, mean of the last 5): DT 87.90 % vs backprop 86.75 %, within 1 point.
    # Here, after 5 epochs on 1,000 test images: see DT_BOUND.
    assert dt >= backprop - DT_BOUND, (dt, backprop)


@pytest.mark.slow
def test_averaging_noisy_chains_is_not_worse_than_one_noisy_chain(fits):
    by_chains = fits["noprop-dt"]["final_accuracy_by_inference_samples"]
    one, averaged = by_chains[1], by_chains[CHAINS]
    # Docs (final weights of the 20-epoch run): 1 chain 83.78 %, 8 chains 87.44 %.
    # Here (5 epochs, 1,000 test images, seeds 0, 1, 2): 1 chain 73.5, 75.6, 76.7 %; 8 chains 79.0, 80.6, 80.2 %.
    assert averaged >= one + CHAIN_GAIN, (one, averaged)


@pytest.mark.slow
def test_dt_epoch_costs_about_eight_backprop_epochs(fits):
    ratio = statistics.median(fits["noprop-dt"]["epoch_cpu_seconds"]) / statistics.median(
        fits["backprop"]["epoch_cpu_seconds"]
    )
    # Docs: 14.64 s against 1.75 s per epoch (8.4x, wall-clock on an idle core). Here: see RATIO_BAND.
    assert RATIO_BAND[0] <= ratio <= RATIO_BAND[1], ratio
