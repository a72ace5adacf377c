"""docs/claims.md stays honest about its own bookkeeping: every test it names exists, every row has a status."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "claims.md").read_text()
STATUSES = ("checked", "weaker", "not checked yet")


def _rows() -> list[list[str]]:
    rows = []
    for line in PAGE.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # "\|" is a literal bar
        if line.startswith("| ") and len(cells) >= 4 and cells[0] not in ("claim", "---"):
            rows.append(cells)
    return rows


def test_every_named_test_exists():
    """``tests/x.py::name`` and the ``::name`` shorthand that follows it must be real test functions."""
    missing = []
    for cells in _rows():
        checked_by = cells[-2]
        current = None
        for path, name in re.findall(r"(tests/[\w/]+\.py)?::(\w+)", checked_by):
            current = path or current
            assert current is not None, f"'::{name}' without a file before it in: {checked_by}"
            source = (ROOT / current).read_text()
            if not re.search(rf"^def {name}\(", source, flags=re.MULTILINE):
                missing.append(f"{current}::{name}")
        for path in re.findall(r"`((?:tests|benchmarks)/[\w/]+\.py)`", checked_by):
            if not (ROOT / path).is_file():
                missing.append(path)
    assert missing == []


def test_every_row_has_a_status_and_checked_rows_name_a_check():
    rows = _rows()
    assert len(rows) > 80
    previous = ""
    for cells in rows:
        status, checked_by = cells[-1], cells[-2]
        if checked_by.startswith("same"):  # "same test" / "same": the row above's check
            checked_by = previous + checked_by
        previous = checked_by
        assert status.startswith(STATUSES), cells
        if status.startswith(("checked", "weaker")):
            checks = ("tests/", "::", "benchmarks/check_quick.py", "code blocks, run by `make test`")
            assert any(check in checked_by for check in checks), cells
