"""``bpfree diffusion-bench --quick`` end to end (subprocesses: slow)."""

import json

import pytest

from lightning_bpfree.diffusion import bench


@pytest.mark.slow
def test_quick_benchmark_writes_table_json_and_plot(tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / "diffusion-bench.json").read_text())
    rows = figures["rows"]
    assert {(r["mode"], r["steps"]) for r in rows} == {(m, n) for m in bench.MODES for n in (4, 8)}
    for row in rows:
        if row["mode"] == "checkpoint":  # checkpointing recomputes, it does not change the gradient
            assert all(row[f"cos_{t}"] > 0.9999 for t in bench.TARGETS)
        elif row["mode"] == "backprop":  # the reference itself: no comparison with itself is reported
            assert all(row[f"cos_{t}"] is None and row[f"rel_err_{t}"] is None for t in bench.TARGETS)
        else:
            assert row["unet_calls"] == 2 * row["steps"]  # forward solve + adjoint solve
            assert all(0.0 < row[f"cos_{t}"] < 1.0 for t in bench.TARGETS)  # a real comparison
            # the relative error is at least the sine of the angle whose cosine is reported: ||a - b||
            # is never shorter than the distance from b to the line through a, ||b|| sin(angle)
            assert all(
                row[f"rel_err_{t}"] >= (1.0 - row[f"cos_{t}"] ** 2) ** 0.5 * (1 - 1e-6) for t in bench.TARGETS
            ), row
    assert (tmp_path / "diffusion-bench.png").stat().st_size > 10_000


def test_summary_reports_memory_ratio_and_first_step_count_reaching_cosine_0_99():
    rows = [
        {"mode": "adjoint", "steps": 10, "peak_rss_mib": 400.0, "grad_rss_mib": 30.0}
        | {"cos_x_T": 0.995, "cos_conditioning": 0.9, "cos_weights": 0.98},
        {"mode": "adjoint", "steps": 50, "peak_rss_mib": 420.0, "grad_rss_mib": 31.0}
        | {"cos_x_T": 0.999, "cos_conditioning": 0.95, "cos_weights": 0.992},
        {"mode": "backprop", "steps": 50, "peak_rss_mib": 2000.0, "grad_rss_mib": 1500.0}
        | {"cos_x_T": 1.0, "cos_conditioning": 1.0, "cos_weights": 1.0},
    ]
    summary = bench.summarize(rows)
    assert summary["adjoint_peak_rss_ratio"] == pytest.approx(420.0 / 400.0)
    assert summary["first_steps_with_cosine_0_99"] == {"x_T": 10, "conditioning": None, "weights": 50}
    assert summary["cosine_at_max_steps"]["weights"] == 0.992


def test_run_needs_backprop_the_reference_of_every_comparison():
    with pytest.raises(ValueError, match="backprop"):
        bench.run([4], batch=1, seed=0, quick=True, modes=("adjoint",))
    with pytest.raises(ValueError, match="backprop"):
        bench.run([4], batch=1, seed=0, quick=True, modes=("backprop", "exact"))
