"""Assert the claims the docs make about ``make bench-quick``'s own results (run by that target, so by CI).

    python benchmarks/check_quick.py [bpfree-results/quick]

Reads the JSON the quick benchmarks wrote and exits 1, naming each claim that failed, when a documented
quick-run figure no longer holds. Today it checks docs/zo-bench.md's ``--quick`` section: after 20 steps
every zeroth-order optimizer on full fine-tuning lowers the held-out loss a little (0.005 to 0.07
nats/token measured) while FO-SGD and FO-AdamW lower it by 1.4-1.5. The bounds leave room around those
measurements (any fall up to 0.2 for ZO, at least 1.0 for FO) but fail if ZO stops learning, if it learns
like backprop (a gradient leak), or if FO breaks. Listed on docs/claims.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ZO_FULL_METHODS = ("zo-sgd", "zo-sgd-sign", "zo-sgd-cons", "zo-sgd-mmt", "forward-grad", "zo-adam")
FO_METHODS = ("fo-sgd", "fo-adamw")
ZO_MAX_FALL = 0.2  # nats/token; measured 0.005-0.07 after 20 steps
FO_MIN_FALL = 1.0  # measured 1.44 (FO-SGD) and 1.50 (FO-AdamW)


def zo_bench_failures(figures: dict[str, Any]) -> list[str]:
    """The failed claims of a ``zo-bench --quick`` JSON (its ``rows``); empty when all hold."""
    rows = {r["method"]: r for r in figures["rows"] if r["scheme"] == "full" and r["enhancement"] == "none"}
    failures = []
    for method in ZO_FULL_METHODS + FO_METHODS:
        if method not in rows:
            failures.append(f"zo-bench: no row for {method}")
            continue
        fall = rows[method]["initial_loss"] - rows[method]["final_loss"]
        if method in FO_METHODS and not fall >= FO_MIN_FALL:
            failures.append(f"zo-bench: {method} lowered the held-out loss by {fall:.4g}, expected >= {FO_MIN_FALL}")
        if method in ZO_FULL_METHODS and not 0.0 < fall <= ZO_MAX_FALL:
            failures.append(f"zo-bench: {method} lowered the held-out loss by {fall:.4g}, expected in (0, {ZO_MAX_FALL}]")
    return failures


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "bpfree-results/quick")
    path = root / "zo-bench" / "zo-bench.json"
    if not path.is_file():
        print(f"check_quick: {path} is missing; run `make bench-quick` first")
        return 1
    failures = zo_bench_failures(json.loads(path.read_text()))
    for failure in failures:
        print("check_quick: FAILED", failure)
    if not failures:
        print(f"check_quick: the documented quick-run claims hold ({path})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
