"""The zeroth-order memory and time claims of docs/zo.md and docs/zo-bench.md, measured for real.

Peak memory is the peak RSS (``VmHWM``) of a fresh process per configuration, as ``bpfree zo-bench
--part memory`` measures it (these tests call the same functions). The models are OPT-style
decoders built from a config with cheap deterministic weights (``bench.opt_model``), fp32.
Bounds come from measurements on the project's 2-core CPU machine; each comment says which.
"""

from __future__ import annotations

import pytest

from lightning_bpfree import benchmarking
from lightning_bpfree.zo import bench

MIB = 2**20


def _configs(size: str, modes: tuple[str, ...]) -> list[dict]:
    # one warm-up step and no timed ones: only the peak memory is read; 1 x 64 tokens keeps the
    # activations small, so that the parameters and the optimizer's state dominate the peak
    return [{"mode": m, "size": size, "loop": "trainer", "batch_size": 1, "seq_len": 64, "steps": 0} for m in modes]


@pytest.mark.slow
def test_zo_sgd_step_peak_memory_is_within_5_percent_of_the_parameter_bytes_over_inference():
    """docs/zo.md: a ZO-SGD step (Trainer.fit + ZerothOrder) needs at most 5 % of the parameter bytes
    more peak memory than inference (Trainer.validate), at 309 M parameters (1180 MiB; 5 % = 59 MiB).

    Measured here (2 runs each, 1 x 64 tokens, two sessions): inference 1684-1686 MiB, ZO-SGD
    1692-1694 MiB: +7 to +9 MiB, 0.6-0.8 % (the full ``bpfree zo-bench --part memory`` run at 639 M:
    +12 MiB, 0.5 %). At this
    batch one configuration's runs differ by under 10 MiB, so the 5 % bound is checked on the worst
    pairing (ZO's highest run against inference's lowest). A ZO step that kept a copy of the weights
    (+100 %), a float32 noise tensor the size of the largest parameter (the 16384 x 1536 embedding:
    96 MiB, 8 %) or gradients would fail it.
    """
    rows = bench.compare_with_inference(
        bench.measure_configurations(_configs("300m", ("inference", "zo-sgd")), repeats=2, threads=2)
    )
    inference, zo = rows
    assert inference["parameter_bytes"] == zo["parameter_bytes"] == 309_273_600 * 4
    assert inference["peak_min"] > inference["parameter_bytes"]  # the weights were resident in the measured process
    assert zo["extra_pct_range"][1] <= 5.0, zo


@pytest.mark.slow
def test_peak_memory_order_fo_adamw_over_zo_adam_over_zo_sgd():
    """docs/zo-bench.md and the README: peak memory FO-AdamW > ZO-Adam > ZO-SGD, in the sizes of their state.

    At 98 M parameters (P = 374 MiB), 1 x 64 tokens, one run each. Measured here (two sessions):
    ZO-SGD 871-873 MiB, ZO-Adam 1620-1627 MiB (+2.00-2.02 P: its two moments), FO-AdamW 2094-2107 MiB
    (+1.25-1.30 P over ZO-Adam: the gradients and AdamW's temporaries). Bounds with margin: ZO-Adam
    adds 1.8-2.3 P over ZO-SGD (one buffer more or fewer leaves that band); FO-AdamW adds at least
    0.9 P over ZO-Adam (its gradients alone are 1 P). The runs of one configuration differ by about
    10 MiB (0.03 P) at this batch.
    """
    rows = {r["mode"]: r for r in bench.measure_configurations(_configs("100m", ("zo-sgd", "zo-adam", "fo-adamw")),
                                                                repeats=1, threads=2)}  # fmt: skip
    params = rows["zo-sgd"]["parameter_bytes"]
    zo_sgd, zo_adam, fo_adamw = (rows[m]["peak_median"] for m in ("zo-sgd", "zo-adam", "fo-adamw"))
    assert fo_adamw > zo_adam > zo_sgd
    assert 1.8 <= (zo_adam - zo_sgd) / params <= 2.3, rows
    assert (fo_adamw - zo_adam) / params >= 0.9, rows


@pytest.mark.slow
def test_zo_sgd_step_time_is_two_forwards_plus_the_noise_passes():
    """docs/zo.md: a ZO-SGD step costs two forwards plus three passes of regenerated noise, so its time
    ratio to one no-grad forward falls towards 2 as the tokens per step grow, and the noise sets the
    floor of the ratio at small batches (the 2.4x target is not met on CPU at 98 M and 8 x 128).

    Here on the 5.4 M-parameter ``quick`` model, raw loop, one process, 3 interleaved rounds, 2
    threads; the ratio is the median over rounds of the round's step time over its forward time.
    Measured on the shared machine (four runs): 5.65-6.1x at 1 x 64 tokens (the noise passes
    dominate: 0.025 s each against a 0.018 s forward), 2.06-2.23x at 8 x 512 (2 + 3 x 0.026 / 0.68 =
    2.11 predicted). Asserted: the ratio falls with the tokens, and at 8 x 512 it lies in 1.6-2.8: a
    third forward per step would put it at 3 or more, a step with one forward near 1.1. Only times
    measured in the same process and round are compared, so load on the machine moves both sides.
    """
    with benchmarking.using_threads(2):  # the conftest's single thread would slow the noise pool's two workers
        figures = bench.measure_time_ratio("quick", [[1, 64], [8, 512]], repeats=3)
    small, large = figures["rows"]
    assert small["x one forward"] > large["x one forward"], figures
    assert 1.6 <= large["x one forward"] <= 2.8, figures


@pytest.mark.slow  # SmolLM2-135M with LoRA, 50 ZO steps and 2 evaluations: about 3 minutes on 2 idle cores
def test_demo_lowers_the_held_out_loss_of_smollm2(tmp_path):
    """docs/zo.md's demo (3.600 -> 3.569 in 150 steps, 3.592 at step 50), its first 50 steps through the command."""
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "lightning_bpfree.cli", "demo", "--steps", "50", "--eval-every", "50",
               "--no-memory", "--out", str(tmp_path)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads((tmp_path / "demo.json").read_text())
    assert figures["scheme"] == "lora" and figures["steps"] == 50
    assert abs(figures["held_out_loss_before"] - 3.600) < 0.0005  # the documented starting point (3.59999)
    # measured 3.59999 -> 3.59190 (-0.0081) at step 50; a broken or frozen update leaves it at 3.600
    assert figures["held_out_loss_after"] < figures["held_out_loss_before"] - 0.004
