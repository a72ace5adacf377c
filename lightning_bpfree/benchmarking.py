"""Shared machinery of the ``bpfree`` benchmarks: peak memory in a fresh subprocess, tables, JSON,
plots.

Every benchmark subcommand prints a table, writes a JSON of its figures and a PNG plot into an
output folder (:func:`bench_parser` gives the shared options, :func:`finish` the shared ending,
:func:`torch_threads` and :func:`using_threads` the thread count). Peak memory is never read in the
process that runs the benchmark: each configuration runs in its own interpreter so that allocator
caches and earlier configurations cannot leak into the number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning_bpfree.validation import (
    check_float,
    check_int,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
    check_seed,
)

_CHILD = r"""
import importlib, json, sys
spec = json.loads(sys.argv[1])
module_name, function_name = spec["target"].split(":")
function = getattr(importlib.import_module(module_name), function_name)
import torch
from lightning_bpfree.benchmarking import peak_rss_bytes
torch.set_num_threads(spec["threads"])
baseline_rss = peak_rss_bytes()
result = function(**spec["kwargs"]) or {}
result["peak_rss_bytes"] = peak_rss_bytes()
result["import_rss_bytes"] = baseline_rss
if torch.cuda.is_available() and torch.cuda.is_initialized():
    result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
print("@@RESULT@@" + json.dumps(result))
"""


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes.

    On Linux this is ``VmHWM`` of ``/proc/self/status``, which starts afresh at ``exec``;
    ``getrusage``'s ``ru_maxrss`` (used elsewhere) carries over the parent's resident size from
    the ``fork``, so a child started by a large parent would report at least the parent's size.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_in_subprocess(
    target: str, *, threads: int | None = None, timeout: float | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Run ``module:function(**kwargs)`` in a fresh interpreter and return its result dict.

    The function must return a JSON-serialisable dict (or None). Added keys:
    ``peak_rss_bytes`` (peak resident set size of the child, bytes), ``import_rss_bytes`` (RSS after
    importing the target's module and torch, before the call) and, when the child used CUDA,
    ``cuda_max_allocated_bytes`` (``torch.cuda.max_memory_allocated``).

    Raises ``RuntimeError`` with the child's stderr when the child fails.
    """
    if ":" not in target:
        raise ValueError(f"target must be 'module:function', got {target!r}")
    spec = {"target": target, "kwargs": kwargs, "threads": threads or torch_threads()}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        # the child imports what the parent can (e.g. a test module's function)
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))},
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@") :])
    raise RuntimeError(f"{target} failed in its subprocess (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def torch_threads(requested: int | None = None, default: int | None = None) -> int:
    """Threads for torch in a benchmark: ``requested`` (a ``--threads`` option) when given, else the
    ``BPFREE_THREADS`` environment variable, else ``default`` (a benchmark's own choice, e.g. 1 for
    networks too small to gain from threads), else the number of CPU cores."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested
    if "BPFREE_THREADS" in os.environ:
        return int(os.environ["BPFREE_THREADS"])
    return default if default is not None else os.cpu_count() or 1


@contextmanager
def using_threads(threads: int) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)``; the previous count comes back afterwards,
    so that a benchmark called from Python (tests, notebooks) leaves the process as it found it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median_high(times)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows`` (one dict per row); floats get 4 significant digits."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def mib(num_bytes: float) -> float:
    """Bytes to MiB."""
    return num_bytes / 2**20


def _option_type(parse: Callable[[str], Any], check: Callable[[str, Any], Any], kind: str) -> Callable[[str], Any]:
    """An argparse ``type=``: ``parse`` the text, then ``check`` it with the library's own validation.

    argparse turns the ``ArgumentTypeError`` into its usage error (exit status 2) naming the option,
    e.g. ``argument --steps: must be an int >= 1, got -1``.
    """

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        try:
            return check("value", value)
        except (TypeError, ValueError) as error:  # the message starts with the name given: drop it
            raise argparse.ArgumentTypeError(str(error).removeprefix("value ")) from None

    convert.__name__ = kind  # argparse names the type in some messages
    return convert


positive_int = _option_type(int, check_positive_int, "a positive int")
"""argparse ``type=`` for counts, sizes and steps: an int >= 1 (``0`` and ``-1`` are usage errors)."""

nonnegative_int = _option_type(int, lambda name, value: check_int(name, value, low=0), "a non-negative int")
"""argparse ``type=`` for an int >= 0."""

positive_float = _option_type(float, check_positive_float, "a positive number")
"""argparse ``type=`` for learning rates, step sizes and time limits: finite and > 0 (NaN, inf refused)."""

nonnegative_float = _option_type(float, check_nonnegative_float, "a non-negative number")
"""argparse ``type=`` for weights and penalties: finite and >= 0."""

seed_int = _option_type(int, check_seed, "an int seed")
"""argparse ``type=`` for ``--seed``: an int in ``[0, 2**63)``."""


def float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """argparse ``type=`` for a finite number in ``[low, high]`` (``low_open``/``high_open`` exclude an end)."""

    def check(name: str, value: float) -> float:
        return check_float(name, value, low=low, high=high, low_open=low_open, high_open=high_open)

    return _option_type(float, check, "a number")


def torch_device(text: str) -> str:
    """argparse ``type=`` for a device option: ``text`` when torch parses it as a device and, for
    ``cuda``, CUDA is available (kept a string, as benchmarks pass it on to subprocesses as JSON)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:  # torch's error for an unknown device string
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu or cuda, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but CUDA is not available here")
    return text


def add_output_args(parser: argparse.ArgumentParser, name: str) -> None:
    """The options every benchmark shares: ``--out`` folder, ``--quick`` CI-sized run, ``--seed``."""
    parser.add_argument("--out", type=Path, default=Path("bpfree-results") / name, help="output folder")
    parser.add_argument("--quick", action="store_true", help="a small, fast configuration (for CI)")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="random seed of data order, initialisation and perturbations (default 0)")  # fmt: skip


def bench_parser(name: str, doc: str | None, *, threads_default: str = "all cores") -> argparse.ArgumentParser:
    """The parser of ``bpfree <name>`` with the options every benchmark shares.

    ``--out`` / ``--quick`` / ``--seed`` (:func:`add_output_args`) and ``--threads`` (``None`` unless
    given: resolve it with :func:`torch_threads`); the description is the first paragraph of ``doc``
    (the module docstring). ``threads_default`` describes the benchmark's own default in the help.
    """
    parser = argparse.ArgumentParser(prog=f"bpfree {name}", description=(doc or "").split("\n\n")[0])
    add_output_args(parser, name)
    parser.add_argument("--threads", type=positive_int, default=None,
                        help=f"torch threads (default: BPFREE_THREADS, else {threads_default})")  # fmt: skip
    return parser


def finish(
    out_dir: Path,
    name: str,
    figures: dict[str, Any],
    report: str,
    plot: Callable[[Path], Any] | None = None,
) -> Path:
    """The end of every benchmark: print ``report`` (the table and its verdicts), write
    ``<out_dir>/<name>.json`` (``figures``) and ``<name>.md`` (``report``), draw ``<name>.png`` with
    ``plot(path)``, and say where they are. Returns the JSON path."""
    print(report)
    path = write_results(out_dir, name, figures, report)
    written = [path, path.with_suffix(".md")]
    if plot is not None:
        png = path.with_suffix(".png")
        plot(png)
        written.append(png)
    print("wrote " + ", ".join(str(p) for p in written))
    return path


def write_results(out_dir: Path, name: str, figures: dict[str, Any], table: str | None = None) -> Path:
    """Write ``<out_dir>/<name>.json`` (and ``<name>.md`` holding the table); return the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(figures, indent=2, default=float))
    if table is not None:
        (out_dir / f"{name}.md").write_text(table + "\n")
    return path


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    """A matplotlib figure and axes on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as PNG at ``path`` and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def progress(iterable: Iterable, **kwargs: Any):
    """A tqdm progress bar (to stderr) over ``iterable``."""
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)
