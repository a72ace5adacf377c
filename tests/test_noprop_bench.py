"""``bpfree noprop-bench``: argument checks, the memory probe, and (slow) the quick run end to end."""

import json

import pytest
import torch

from lightning_bpfree.noprop import bench


def test_bench_rejects_unknown_method():
    with pytest.raises(ValueError, match="methods must be among"):
        bench.main(["--methods", "backprop", "sgd"])


@pytest.mark.parametrize("method", bench.METHODS)
def test_step_memory_probe_trains_each_method(method):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench.step_memory(method, batch_size=4, num_blocks=2, hidden=16, channels=[4, 8], steps=1) is None
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_quick_benchmark_writes_table_json_and_plot(tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / "noprop-bench.json").read_text())
    assert set(figures["results"]) == set(bench.METHODS)
    for result in figures["results"].values():
        assert len(result["accuracy"]) == figures["config"]["epochs"]
        assert result["step_memory_mib"] > 0
    # backprop learns something in two short epochs (chance is 10%)
    assert figures["results"]["backprop"]["accuracy"][-1] > 0.3
    assert (tmp_path / "noprop-bench.png").stat().st_size > 10_000
