"""benchmarks/check_quick.py: the assertion `make bench-quick` runs on its own zo-bench results."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "check_quick.py"
_spec = importlib.util.spec_from_file_location("check_quick", SCRIPT)
check_quick = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_quick)

# The --quick run of docs/zo-bench.md: initial held-out loss 4.8628, final losses as its table prints them.
DOCUMENTED_FINAL = {"zo-sgd": 4.829, "zo-sgd-sign": 4.858, "zo-sgd-cons": 4.829, "zo-sgd-mmt": 4.799,
                    "forward-grad": 4.829, "zo-adam": 4.838, "fo-sgd": 3.422, "fo-adamw": 3.366}  # fmt: skip


def _figures(final: dict[str, float]) -> dict:
    rows = [{"method": m, "scheme": "full", "enhancement": "none", "initial_loss": 4.8628, "final_loss": loss}
            for m, loss in final.items()]  # fmt: skip
    # rows of other schemes and enhancements are not judged (prompt tuning barely moves: 1.2e-5)
    rows.append({"method": "zo-sgd", "scheme": "prompt", "enhancement": "none", "initial_loss": 4.8628,
                 "final_loss": 4.8628})  # fmt: skip
    return {"model": "tiny", "steps": 20, "rows": rows}


def test_the_documented_quick_run_passes(tmp_path):
    assert check_quick.zo_bench_failures(_figures(DOCUMENTED_FINAL)) == []
    folder = tmp_path / "zo-bench"
    folder.mkdir()
    (folder / "zo-bench.json").write_text(json.dumps(_figures(DOCUMENTED_FINAL)))
    assert check_quick.main([str(tmp_path)]) == 0


@pytest.mark.parametrize(
    ("method", "final", "expected"),
    [
        ("zo-adam", 4.8628, "zo-adam lowered the held-out loss by 0"),  # ZO stopped learning
        ("zo-sgd", 3.4, "zo-sgd lowered the held-out loss by 1.463"),  # ZO learns like backprop: a leak
        ("fo-adamw", 4.5, "fo-adamw lowered the held-out loss by 0.3628"),  # FO broke
    ],
)
def test_a_broken_claim_fails_and_is_named(tmp_path, capsys, method, final, expected):
    figures = _figures({**DOCUMENTED_FINAL, method: final})
    (failure,) = check_quick.zo_bench_failures(figures)
    assert expected in failure
    (tmp_path / "zo-bench").mkdir()
    (tmp_path / "zo-bench" / "zo-bench.json").write_text(json.dumps(figures))
    assert check_quick.main([str(tmp_path)]) == 1
    assert expected in capsys.readouterr().out


def test_a_missing_row_or_file_fails(tmp_path):
    final = dict(DOCUMENTED_FINAL)
    del final["zo-sgd-mmt"]
    assert check_quick.zo_bench_failures(_figures(final)) == ["zo-bench: no row for zo-sgd-mmt"]
    assert check_quick.main([str(tmp_path)]) == 1
