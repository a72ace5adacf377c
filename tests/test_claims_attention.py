"""The numbers docs/attention.md states for SOFT, checked at a size CI can afford (docs/claims.md).

The documented full-size figures (16k tokens, a 12,000-image ViT run) take minutes to half an hour;
each test here measures the same quantity at a smaller size with a bound taken from a measurement
on this 2-core machine, and docs/attention.md gives the CI-size numbers next to the full-size ones.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_attention_soft import released_soft_forward, spd_matrix

from lightning_bpfree import benchmarking
from lightning_bpfree.attention import SOFTAttention, newton_pinv
from lightning_bpfree.attention.bench import interleaved_min_seconds, train_vit

HEADS = 2  # the benchmark's layer: dim 64, 2 heads of 32


def test_ridge_moves_the_inverse_by_6_8_percent_and_the_output_by_0_6_percent():
    # Claim 1/2 of the ridge paragraph: a 32 x 32 SPD matrix, eigenvalues log-spaced 1 ... 0.1.
    eigenvalues = torch.logspace(0, -1, 32, dtype=torch.float64)
    A = spd_matrix(32, 10.0)
    moved = (newton_pinv(A, 40, ridge=0.01) - torch.linalg.pinv(A)).norm() / torch.linalg.pinv(A).norm()
    # Independent reference: along eigenvector i the inverse goes from 1/l_i to 1/(l_i + r).
    expected = (1 / eigenvalues - 1 / (eigenvalues + 0.01)).norm() / (1 / eigenvalues).norm()
    assert moved.item() == pytest.approx(expected.item(), rel=1e-8)
    assert 0.0675 <= moved.item() < 0.0685  # "6.8 %" (measured 0.06799)

    # Claim 2/2: the layer of test_attention_soft's released-layer test (seed 0, conv landmarks with
    # stride 2 on an 8 x 8 grid, no landmark bias, 20 Newton iterations), float64 input [2, 64, 16].
    # The released forward is written out from the authors' formulas (ridge 0.01); the default is the
    # same weights with ridge 0, the Moore-Penrose pseudo-inverse. Relative Frobenius norm of the gap.
    torch.manual_seed(0)
    layer = SOFTAttention(
        16, 2, landmarks="conv", conv_stride=2, qkv_bias=True, ridge=0.0, landmark_bias=False, newton_iters=20
    ).double()
    x = torch.randn(2, 64, 16, dtype=torch.float64)
    released = released_soft_forward(layer, x, 8, 8, 20)
    gap = ((layer(x, hw=(8, 8)) - released).norm() / released.norm()).item()
    assert 0.0055 <= gap < 0.0065  # "0.6 %" (measured 0.00609)
    layer.core.ridge = 0.01  # the released options reproduce it, so the gap is the ridge's alone
    assert (layer(x, hw=(8, 8)) - released).abs().max() < 1e-12


@pytest.mark.slow
def test_soft_time_grows_linearly_while_eager_softmax_grows_quadratically():
    # One layer, forward + backward of [1, N, 64] on 1 thread, in this process. Other jobs load the
    # machine, so lengths are interleaved, the clock is this process's CPU time (wall time also counts
    # the time other jobs hold the cores, and a long call meets more of that than a short one: the
    # fastest wall-clock round gave SOFT 16k/4k 3.8-6.9 at load average 17) and the fastest of 5
    # rounds (3 for eager) is kept.
    soft = interleaved_min_seconds("soft", [1024, 4096, 16384], repeats=5, clock="cpu")
    eager = interleaved_min_seconds("eager", [1024, 4096], repeats=3, clock="cpu")
    soft_4x, soft_16k_over_4k, eager_4x = soft[1] / soft[0], soft[2] / soft[1], eager[1] / eager[0]
    print(f"CPU s: SOFT {soft}, eager {eager}; ratios SOFT 4k/1k {soft_4x:.2f}, 16k/4k {soft_16k_over_4k:.2f}, "
          f"eager 4k/1k {eager_4x:.1f}")  # fmt: skip
    # Target time(4N) / time(N) <= 5: linear gives 4, quadratic 16. Measured 2.4-2.9 (below 4: the
    # 49-landmark Newton iterations are a fixed cost per call, large at 1k).
    assert soft_4x <= 5.0
    # The documented ratio at its full size: 3.4 on an idle machine, 3.8-4.6 here under load average 16
    # (16k's working set suffers more from other jobs' cache traffic), so the bound is 6; quadratic is 16.
    assert soft_16k_over_4k <= 6.0
    # Direction: at the same sizes eager softmax (the explicit N x N matrix) grows far faster.
    # Measured 33-36 (quadratic plus cache misses); 10 is the bound, and it must be 3x SOFT's ratio.
    assert eager_4x > 10.0
    assert eager_4x > 3 * soft_4x


MEMORY_TOKENS = 8192


def _peak_mib(method: str) -> float:
    """Peak RSS growth of one forward + backward at MEMORY_TOKENS tokens, in its own interpreter."""
    result = benchmarking.run_in_subprocess(
        "lightning_bpfree.attention.bench:scaling_series", threads=1, timeout=300,
        method=method, lengths=[MEMORY_TOKENS], repeats=1, warmup=0,
    )  # fmt: skip
    return benchmarking.mib(result["extra_bytes"][0])


@pytest.mark.slow
def test_soft_peak_memory_is_under_a_tenth_of_eager_softmax():
    # Why 8k and not 16k: eager needs 6 GiB and a minute at 16k. The bound at N: eager's softmax
    # backward holds the probabilities, their gradient and the scores' gradient, 3 x [1, 2, N, N]
    # float32 = 24 N^2 bytes (1,536 MiB at 8k); SOFT grows about 17 MiB + 7 KiB * N (measured 24 to
    # 248 MiB from 1k to 32k), 73 MiB at 8k, so SOFT / eager ~ 0.05 here (0.117 at 4k, where the
    # 1/10 target cannot hold; it holds from about 5k tokens on). Memory does not depend on load, so
    # the three processes run side by side; SOFT runs twice and keeps the smaller (allocator noise).
    with ThreadPoolExecutor(max_workers=3) as pool:
        eager_mib, *soft_mib = pool.map(_peak_mib, ["eager", "soft", "soft"])
    soft_mib = min(soft_mib)
    print(f"peak MiB at {MEMORY_TOKENS}: SOFT {soft_mib:.1f}, eager {eager_mib:.1f}, ratio {soft_mib / eager_mib:.3f}")
    floor_mib = benchmarking.mib(3 * HEADS * MEMORY_TOKENS**2 * 4)
    assert eager_mib >= 0.95 * floor_mib  # the measurement sees the N^2 tensors (measured 1,563-1,565 vs 1,536)
    # Measured SOFT 53-74 MiB, ratio 0.034-0.047: the 1/10 target leaves room for +80 MiB of allocator noise.
    assert soft_mib / eager_mib <= 0.1


@pytest.mark.slow
def test_vit_with_soft_attention_matches_softmax_on_fashion_mnist():
    # The benchmark's --quick ViT (patch 4: 49 tokens, SOFT with 16 landmarks; dim 64, 2 post-norm
    # blocks, AdamW 2e-3 one-cycle, batch 128) on the first 8,000 real Fashion-MNIST training images
    # for 2 epochs (126 steps), same seed and data order, tested on the first 2,000 test images (one
    # standard error of an accuracy there is about 1.1 points). Full size: 0.632 both (12,000 images,
    # patch 2). Runs in this process on 1 thread: deterministic here, seed 0 gives 0.663 / 0.599.
    soft = train_vit("soft", train_limit=8000, test_limit=2000, epochs=2, patch_size=4, seed=0)
    sdpa = train_vit("sdpa", train_limit=8000, test_limit=2000, epochs=2, patch_size=4, seed=0)
    print(f"test accuracy: SOFT {soft['test_acc']:.4f}, SDPA {sdpa['test_acc']:.4f}; "
          f"train s {soft['train_seconds']:.1f} / {sdpa['train_seconds']:.1f}")  # fmt: skip
    assert soft["steps"] == sdpa["steps"] == 126
    # Chance is 0.1; seeds 0, 1, 2 gave SOFT 0.663 / 0.614 / 0.652 and SDPA 0.599 / 0.658 / 0.626.
    assert min(soft["test_acc"], sdpa["test_acc"]) > 0.5
    # Same accuracy for the same budget: the SOFT - SDPA gap over those seeds was +0.064, -0.045,
    # +0.026 (64 steps: +0.10, +0.004, +0.115), so 0.1 bounds it with the seed spread as margin.
    assert abs(soft["test_acc"] - sdpa["test_acc"]) <= 0.1
