"""The NVFP4 / FP4 rows of docs/claims.md, checked at sizes CI can afford.

- Same bits on CPU and CUDA: tests marked ``gpu`` run ``lightning_bpfree.fp4.bench``'s comparison (the code
  ``benchmarks/gpu_check.py`` runs) wherever a CUDA device exists; tests/conftest.py skips them, saying so,
  where ``torch.cuda.is_available()`` is False. They are fast and not ``slow``, so ``make test`` runs them.
- Held-out gaps to fp32, the cost of the Hadamard transform, and the UE5M3 tensor scale: the ``fp4-bench``
  sweep at its ``--quick`` model size with 40 steps (docs/fp4.md gives these figures next to the 150-step
  full-size ones), and the gradient underflow behind the +20.6 % on real backward gradients.
- ``FP4Linear`` speed against fp32 and the quantizer's throughput, timed in turns in this process.

Every bound below says what was measured when it was set (2-core CPU machine, one torch thread).
"""

from __future__ import annotations

import pytest
import torch

from lightning_bpfree import benchmarking
from lightning_bpfree.fp4 import bench as fp4_bench
from lightning_bpfree.fp4 import fake_quantize
from lightning_bpfree.fp4.bench import (
    CROSS_DEVICE_CASES,
    UE5M3_NO_TENSOR_SCALE,
    bitwise_equal,
    compare_fp4_linear,
    compare_quantization,
    stochastic_rounding_bias,
)

# -- the same bits on CPU and CUDA ----------------------------------------------------------------------


def _case_id(case: tuple[str, bool, torch.dtype]) -> str:
    fmt, block_2d, dtype = case
    return f"{fmt}-{'2d' if block_2d else '1d'}-{str(dtype).removeprefix('torch.')}"


@pytest.mark.gpu
@pytest.mark.parametrize("case", CROSS_DEVICE_CASES, ids=[_case_id(case) for case in CROSS_DEVICE_CASES])
def test_quantization_is_bit_identical_on_cpu_and_cuda(case):
    # the index as seed, as cross_device_check (gpu_check.py) does: each case sees other data
    row = compare_quantization("cuda", *case, seed=CROSS_DEVICE_CASES.index(case))
    assert row["bitwise_equal"], row


@pytest.mark.gpu
def test_fp4_linear_forward_and_backward_agree_on_cpu_and_cuda():
    row = compare_fp4_linear("cuda")
    # H200: forward 1.3e-6 apart at outputs up to 2.3; the tolerance is 1.3e-6 per unit of magnitude
    assert row["within_tolerance"], row
    assert row["output_max_abs"] > 1 and row["grad_weight_max_abs"] > 1  # the data is not degenerate


@pytest.mark.gpu
def test_stochastic_rounding_on_cuda_has_the_exact_mean_of_the_8_bit_rule():
    row = stochastic_rounding_bias("cuda")
    # 3.9 M samples, standard error 1.1e-4: a mean 5 standard errors off happens by chance once in 1.7 M
    assert abs(row["z"]) < 5, row


def test_bitwise_equal_sees_signed_zeros_single_ulps_and_dtypes():
    x = torch.tensor([0.0, 1.0, -2.5])
    assert bitwise_equal(x, x.clone())
    assert not bitwise_equal(x, torch.tensor([-0.0, 1.0, -2.5]))  # torch.equal calls these equal
    assert not bitwise_equal(x, torch.tensor([0.0, torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)), -2.5]))
    assert not bitwise_equal(x, x.bfloat16()) and not bitwise_equal(x, x[:2])
    assert bitwise_equal(x.bfloat16(), x.bfloat16()) and bitwise_equal(torch.arange(3, dtype=torch.uint8),
                                                                       torch.arange(3, dtype=torch.uint8))  # fmt: skip


def test_stochastic_rounding_on_cpu_has_the_exact_mean_of_the_8_bit_rule():
    # the CPU half of the CUDA check above; the expectation is counted over all 256 draws, not taken from
    # the quantizer: r >= 67 rounds 0.37 up to 0.5, so the mean is 0.5 * 189 / 256 = 0.369140625
    row = stochastic_rounding_bias("cpu")
    assert row["expected"] == pytest.approx(0.5 * 189 / 256, abs=1e-9)
    assert abs(row["expected"] - 0.37) < 0.5 / 256  # unbiased up to 1/256 of the grid step
    assert abs(row["z"]) < 5, row  # measured z = -0.11


# -- held-out gaps to fp32 at CI size --------------------------------------------------------------------

# fp4-bench --quick's model (d=32, 2 blocks, all 14 block linears in FP4, LM head kept), 40 steps of 8x32
# bytes; 150-step full-size figures in docs/fp4.md. The second seed only for the Hadamard comparison.
CI_SWEEP = dict(steps=40, hidden_size=32, num_layers=2, seq_len=32, batch_size=8, lr=3e-3, keep_last_n=0, val_blocks=64)
SWEEP_RUNS = (
    [("fp32", 0), ("nvfp4", 0), ("nvfp4_no_rht", 0), ("mxfp4", 0), ("ue5m3", 0), ("nvfp4", 1), ("nvfp4_no_rht", 1)]
)
FP4_CONFIGS = ("nvfp4", "nvfp4_no_rht", "mxfp4", "ue5m3")


@pytest.fixture(scope="module")
def ci_sweep() -> dict[tuple[str, int], dict]:
    # one thread, as the numbers below were measured (the autouse fixture has not run yet at module scope)
    with benchmarking.using_threads(1):
        return {(config, seed): fp4_bench.train_config(config, seed=seed, **CI_SWEEP) for config, seed in SWEEP_RUNS}


@pytest.mark.slow
def test_every_fp4_format_trains_within_2_percent_of_fp32_held_out(ci_sweep):
    reference = ci_sweep[("fp32", 0)]
    for config in FP4_CONFIGS:
        result = ci_sweep[(config, 0)]
        assert result["fp4_linear_fraction"] > 0.9, config  # 14 of 15 linears run in FP4
        # measured: every run falls from ~5.49 to 3.61-3.64 nats (fp32 5.50 -> 3.61)
        assert result["losses"][0] - result["final_train_loss"] > 1.2, config
        gap = 100 * (result["val_loss"] / reference["val_loss"] - 1)
        # measured held-out gaps: nvfp4 +0.33 %, nvfp4_no_rht +0.18 %, mxfp4 +0.82 %, ue5m3 +0.18 %
        # (seed 1: +0.16, +0.10, +0.01, +0.10); full size, 150 steps: +3.11, -0.81, +0.83, +0.18
        assert -2.0 < gap < 2.0, (config, gap)


@pytest.mark.slow
def test_the_hadamard_transform_costs_held_out_loss_on_both_seeds(ci_sweep):
    # full size: RHT costs 1.3 (seed 1) to 3.9 (seed 0) points; here the same direction, far smaller:
    # measured val loss 3.5807 vs 3.5755 (seed 0, 0.15 points of fp32) and 3.5386 vs 3.5362 (seed 1)
    for seed in (0, 1):
        with_rht, without = ci_sweep[("nvfp4", seed)]["val_loss"], ci_sweep[("nvfp4_no_rht", seed)]["val_loss"]
        assert with_rht > without, (seed, with_rht, without)
        assert with_rht / without - 1 < 0.02  # and a small cost, not a failure


# -- the UE5M3 tensor scale ---------------------------------------------------------------------------------


def test_ue5m3_without_tensor_scale_loses_whole_layers_of_gradient():
    """The mechanism behind the +20.6 %: real backward gradients of the --quick model have block amaxes
    down to ~1e-5, below 6x the smallest UE5M3 scale (7.6e-6), so without the FP32 tensor scale their block
    scales underflow to 0. Measured on the output gradients of all 14 block linears after one fp32 backward."""
    task = fp4_bench.make_task(hidden_size=32, num_layers=2, lr=3e-3, max_steps=40, seed=0)
    train, _ = fp4_bench.byte_blocks(32)
    gradients = []
    for name, module in task.model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            module.register_full_backward_hook(lambda m, grad_in, grad_out: gradients.append(grad_out[0].flatten(0, -2)))
    batch = train[:8]
    task.model(input_ids=batch, labels=batch).loss.backward()
    assert len(gradients) == 14

    def relative_errors(fmt):
        return torch.tensor([((fake_quantize(g, fmt) - g).norm() / g.norm()).item() for g in gradients])

    with_scale, without_scale = relative_errors("ue5m3"), relative_errors(UE5M3_NO_TENSOR_SCALE)
    # measured: with the tensor scale 0.089-0.097 in every layer (E2M1's own rounding error); without it
    # mean 0.37 and 1.000 in the worst layer (its whole gradient rounds to 0)
    assert with_scale.max() < 0.15
    assert without_scale.max() > 0.9
    assert without_scale.mean() > 2.5 * with_scale.mean()


# -- speed -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fp4_linear_costs_at_most_4x_fp32_and_the_quantizer_keeps_its_throughput():
    # 2048x2048 on 1024 tokens: the docs' 4096x4096 on 2048 takes minutes; at 1024x1024 on 512 tokens the
    # quantizers outweigh the GEMMs (ratio 4.2-5.3, see docs/fp4.md), so that size cannot test the target
    speed = fp4_bench.interleaved_speed(tokens=1024, features=2048, repeats=3)
    print({key: value for key, value in speed.items() if key != "rounds"})
    # measured ratio 2.94 (fastest of 3 rounds in turns; rounds 2.69-3.10 s against 0.91-0.96 s) on a
    # machine loaded by other jobs; the target is 4
    assert speed["ratio"] <= 4.0, speed
    # measured 14.9 M elements/s (loaded); docs/fp4.md says 4.2 M/s, and an earlier run on a heavily loaded
    # machine gave 2.7 M/s, so the floor is half of that, against a regression to per-block Python loops
    # (~100x slower)
    assert speed["elements_per_second"] > 1.35e6, speed
