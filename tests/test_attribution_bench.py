"""`bpfree attribution-bench --quick` end to end, and the instruction summary by hand."""

import json

import pytest
import torch

from lightning_bpfree.attribution.bench import main, summarize_instructions


def test_quick_benchmark_writes_table_json_and_plot(tmp_path):
    before = torch.get_num_threads()
    assert main(["--quick", "--toy-prompts", "4", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == before  # the benchmark leaves the process as it found it
    figures = json.loads((tmp_path / "attribution-bench.json").read_text())
    rows = {row["method"]: row for row in figures["toy_retrieval"]}
    assert set(rows) == {"ReAGent", "gradient x input", "integrated gradients", "attention (last layer)", "random"}
    for row in rows.values():
        assert 0.0 <= row["soft_ns"] <= 1.0 and row["soft_nc"] >= 0.0 and 0.0 <= row["recall@1"] <= 1.0
    for row in rows.values():  # each ratio is the method's score over the random baseline's, recomputed here
        for key in ("soft_ns", "soft_nc"):
            assert row[f"{key}/random"] == pytest.approx(row[key] / rows["random"][key])
    assert rows["gradient x input"]["soft_nc"] != rows["random"]["soft_nc"]  # the methods are told apart
    assert len(figures["toy_reagent_runs"]) == 4
    assert (tmp_path / "attribution-bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "| ReAGent |" in (tmp_path / "attribution-bench.md").read_text()


def test_instruction_summary_by_hand():
    def record(score, followed):
        return {"followed": followed, "instruction_score": score, "instruction_density_mean": score / 2,
                "input_density_mean": 0.1}  # fmt: skip

    records = [record(s, True) for s in (1.0, 1.2, 1.1)] + [record(s, False) for s in (0.2, 0.3, 0.25)]
    followed, missed = summarize_instructions(records)
    assert followed["n"] == 3 and followed["instruction score"] == pytest.approx(1.1)
    assert missed["n"] == 3 and missed["mean density, instruction tokens"] == pytest.approx(0.125)
    assert followed["Welch p (followed > not)"] < 0.01  # clearly separated groups
    reversed_p = summarize_instructions([{**r, "followed": not r["followed"]} for r in records])[0]
    assert reversed_p["Welch p (followed > not)"] > 0.99  # one-sided: the other direction is not significant
