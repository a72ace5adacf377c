"""``bpfree attention-bench``: SOFT against softmax attention, time and memory against sequence length.

Part 1 (scaling): forward + backward of one attention layer (``dim`` 64, 2 heads) on ``[1, N, 64]``
for SOFT, PyTorch SDPA, eager softmax and transformers' Nystromformer self-attention; each
configuration runs in a fresh interpreter so its peak RSS is its own. Reports the fitted exponent of
time ~ N^k, SOFT's time(16k) / time(4k) (target <= 5) and SOFT's memory at 16k against eager softmax
(target <= 1/10).

Part 2 (accuracy): a small ViT trained with Lightning on real Fashion-MNIST, SOFT against softmax
(SDPA) attention, same data, steps and seed; test accuracy, time and memory side by side.

Writes ``attention-bench.json``, ``attention-bench.md`` and ``attention-bench.png`` (+ ``attention-bench-vit.png``)
to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from typing import Any

from lightning_bpfree import benchmarking
from lightning_bpfree.cli import command_name
from lightning_bpfree.validation import check_choice

NAME = command_name(__name__)

METHODS = ("soft", "sdpa", "eager", "nystromformer")
FULL_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK_LENGTHS = (512, 1024, 2048)
VIT_PATCHES = (1, 2, 4, 7, 14, 28)  # the divisors of Fashion-MNIST's 28-pixel side


def _attention_forward(method: str, tokens: int, dim: int, num_heads: int, num_landmarks: int):
    """A callable ``[1, N, dim] -> [1, N, dim]`` for ``method``."""
    from lightning_bpfree.attention.vit import make_attention

    if method == "nystromformer":
        from transformers import NystromformerConfig
        from transformers.models.nystromformer.modeling_nystromformer import NystromformerSelfAttention

        config = NystromformerConfig(
            hidden_size=dim, num_attention_heads=num_heads, num_landmarks=64, segment_means_seq_len=tokens,
            attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        layer = NystromformerSelfAttention(config)
        return lambda x: layer(x)[0]
    if method == "soft":
        return make_attention("soft", dim, num_heads, num_landmarks=num_landmarks)
    return make_attention(method, dim, num_heads)


def _forward_backward(forward, x) -> None:
    forward(x).square().mean().backward()


def scaling_series(
    method: str,
    lengths: list[int],
    dim: int = 64,
    num_heads: int = 2,
    num_landmarks: int = 49,
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, Any]:
    """Forward + backward of ``method`` on ``[1, N, dim]`` for each ``N`` in ``lengths`` (run in a subprocess).

    Returns ``seconds`` (median per length of ``repeats`` calls after ``warmup`` untimed ones) and
    ``extra_bytes``: the process's peak RSS after the timed runs minus its RSS once the layer and input
    exist (imports, weights and input excluded). Lengths run in increasing order; with ``--quick`` several
    share a process, and memory the allocator kept from a shorter length can hide part of a longer one's;
    the full benchmark gives every length its own process. ``repeats=1, warmup=0`` runs one call: enough
    for the peak memory, which does not change from call to call.
    """
    import psutil
    import torch

    seconds, extra = [], []
    for tokens in sorted(lengths):
        torch.manual_seed(0)
        forward = _attention_forward(method, tokens, dim, num_heads, num_landmarks)
        x = torch.randn(1, tokens, dim, requires_grad=True)
        step = functools.partial(_forward_backward, forward, x)
        rss_before = psutil.Process().memory_info().rss
        seconds.append(benchmarking.median_seconds(step, repeats=repeats, warmup=warmup))
        extra.append(benchmarking.peak_rss_bytes() - rss_before)
        del forward, x, step
    return {"seconds": seconds, "extra_bytes": extra}


def interleaved_min_seconds(
    method: str,
    lengths: list[int],
    dim: int = 64,
    num_heads: int = 2,
    num_landmarks: int = 49,
    repeats: int = 5,
    clock: str = "wall",
) -> list[float]:
    """Fastest forward + backward of ``method`` on ``[1, N, dim]`` for each ``N`` in ``lengths`` (seconds).

    For ratios of times on a machine that other jobs load: every length gets its layer, input and one
    untimed call first, then ``repeats`` rounds each time every length once, so a burst of load hits
    all lengths alike rather than one; the minimum over rounds is the closest to the unloaded cost
    (load only ever adds time). Runs in the calling process, with its torch thread count.

    ``clock="wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``: CPU seconds of this
    process). On a crowded machine use ``"cpu"`` with 1 torch thread: wall time then counts the time
    other jobs hold the cores, which a long call meets more often than a short one, so the minimum of
    wall times biases ratios upwards; CPU time leaves that out (cache contention remains).
    """
    timer = {"wall": time.perf_counter, "cpu": time.process_time}[check_choice("clock", clock, ("wall", "cpu"))]
    import torch

    steps = []
    for tokens in lengths:
        torch.manual_seed(0)
        forward = _attention_forward(method, tokens, dim, num_heads, num_landmarks)
        steps.append(functools.partial(_forward_backward, forward, torch.randn(1, tokens, dim, requires_grad=True)))
        steps[-1]()  # warm-up: first-call allocations and dispatch caches
    best = [math.inf] * len(lengths)
    for _ in range(repeats):
        for index, step in enumerate(steps):
            start = timer()
            step()
            best[index] = min(best[index], timer() - start)
    return best


VIT_LANDMARKS = 16  # SOFT landmarks in the ViT part: 49 (the layer's default) exceeds most token grids here


def train_vit(attention: str, train_limit: int, test_limit: int, epochs: int, batch_size: int = 128, seed: int = 0,
              **vit_options: Any) -> dict[str, Any]:  # fmt: skip
    """Train :class:`ViTClassifier` with ``attention`` on Fashion-MNIST and test it (run in a subprocess).

    ``vit_options`` go to :class:`~lightning_bpfree.attention.vit.TinyViT` (``patch_size``, ``dim``,
    ``depth``, ``num_heads``: its defaults where not given); ``num_landmarks`` (default
    :data:`VIT_LANDMARKS`) is used by SOFT only.
    """
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_bpfree.attention.module import ViTClassifier
    from lightning_bpfree.data import fashion_mnist

    L.seed_everything(seed, verbose=False)
    train = TensorDataset(*fashion_mnist("train", limit=train_limit))
    test = TensorDataset(*fashion_mnist("test", limit=test_limit))
    landmarks = vit_options.pop("num_landmarks", VIT_LANDMARKS)
    if attention == "soft":
        vit_options["num_landmarks"] = landmarks
    module = ViTClassifier(attention=attention, **vit_options)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, DataLoader(train, batch_size=batch_size, shuffle=True))
    train_seconds = time.perf_counter() - start
    final_train_loss = float(trainer.callback_metrics["train_loss"])
    metrics = trainer.test(module, DataLoader(test, batch_size=512), verbose=False)[0]
    return {
        "attention": attention,
        "test_acc": float(metrics["test_acc"]),
        "test_loss": float(metrics["test_loss"]),
        "final_train_loss": final_train_loss,
        "train_seconds": train_seconds,
        "steps": int(trainer.global_step),
        "tokens": module.model.grid[0] * module.model.grid[1],
        "parameters": sum(p.numel() for p in module.parameters()),
    }


def fitted_exponent(lengths: list[int], seconds: list[float]) -> float:
    """Least-squares slope ``k`` of ``log(seconds) = k log(N) + c``."""
    xs, ys = [math.log(n) for n in lengths], [math.log(s) for s in seconds]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def _run_scaling(args: argparse.Namespace, threads: int) -> list[dict[str, Any]]:
    """Every (method, length) point; one process per point, or one per method with ``--quick``."""
    points = []
    groups = []
    for method in args.methods:
        lengths = [n for n in args.lengths if method != "eager" or n <= args.max_eager_tokens]
        groups += [(method, lengths)] if args.quick else [(method, [n]) for n in lengths]
    for method, lengths in benchmarking.progress(groups, desc=f"{NAME} scaling"):
        try:
            result = benchmarking.run_in_subprocess(
                f"{__name__}:scaling_series", threads=threads, timeout=args.timeout,
                method=method, lengths=lengths, num_landmarks=args.num_landmarks, repeats=args.repeats,
            )  # fmt: skip
        except Exception as error:  # out of memory or past the timeout: recorded, not fatal
            points += [{"method": method, "tokens": n, "error": str(error).splitlines()[0][:200]} for n in lengths]
            continue
        for tokens, seconds, extra in zip(lengths, result["seconds"], result["extra_bytes"]):
            points.append({"method": method, "tokens": tokens, "seconds": seconds, "peak_mib": benchmarking.mib(extra)})
    return points


def _lookup(points: list[dict[str, Any]], method: str, tokens: int, key: str) -> float | None:
    for point in points:
        if point["method"] == method and point["tokens"] == tokens:
            return point.get(key)
    return None


def _summary(points: list[dict[str, Any]], lengths: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {"exponent": {}}
    for method in METHODS:
        measured = [(n, _lookup(points, method, n, "seconds")) for n in lengths]
        measured = [(n, s) for n, s in measured if s is not None]
        # Below 2k tokens fixed per-call overheads dominate; fit the long end when it has 2 points or more.
        if len([n for n, _ in measured if n >= 2048]) >= 2:
            measured = [(n, s) for n, s in measured if n >= 2048]
        if len(measured) >= 2:
            summary["exponent"][method] = fitted_exponent([n for n, _ in measured], [s for _, s in measured])
    t4k, t16k = _lookup(points, "soft", 4096, "seconds"), _lookup(points, "soft", 16384, "seconds")
    if t4k and t16k:
        summary["soft_time_16k_over_4k"] = t16k / t4k
        summary["target_time_ratio_met"] = t16k / t4k <= 5.0
    soft_mem, eager_mem = _lookup(points, "soft", 16384, "peak_mib"), _lookup(points, "eager", 16384, "peak_mib")
    if soft_mem and eager_mem:
        summary["soft_over_eager_memory_16k"] = soft_mem / eager_mem
        summary["target_memory_ratio_met"] = soft_mem / eager_mem <= 0.1
    return summary


def _scaling_table(points: list[dict[str, Any]], lengths: list[int], methods: list[str]) -> str:
    rows = []
    for n in lengths:
        row: dict[str, Any] = {"N": n}
        for method in methods:
            seconds, memory = _lookup(points, method, n, "seconds"), _lookup(points, method, n, "peak_mib")
            row[f"{method} s"] = seconds if seconds is not None else "-"
            row[f"{method} MiB"] = memory if memory is not None else "-"
        rows.append(row)
    return benchmarking.format_table(rows)


def _plot_scaling(points: list[dict[str, Any]], methods: list[str], path) -> None:
    fig, (ax_time, ax_mem) = benchmarking.new_figure(ncols=2, width=5.5, height=4.0)
    for method in methods:
        measured = [p for p in points if p["method"] == method and "seconds" in p]
        if not measured:
            continue
        tokens = [p["tokens"] for p in measured]
        ax_time.plot(tokens, [p["seconds"] for p in measured], marker="o", label=method)
        ax_mem.plot(tokens, [p["peak_mib"] for p in measured], marker="o", label=method)
    for ax, label in ((ax_time, "forward + backward (s)"), (ax_mem, "peak RSS growth in forward+backward (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax_time.set_title("one attention layer, dim 64, 2 heads")
    benchmarking.save_figure(fig, path)


def _plot_vit(results: list[dict[str, Any]], path) -> None:
    fig, (ax_acc, ax_time) = benchmarking.new_figure(ncols=2, width=4.0, height=3.5)
    names = [r["attention"] for r in results]
    ax_acc.bar(names, [r["test_acc"] for r in results], color=["tab:blue", "tab:orange"][: len(names)])
    ax_acc.set_ylabel("Fashion-MNIST test accuracy")
    ax_acc.set_ylim(0.0, 1.0)
    ax_time.bar(names, [r["train_seconds"] for r in results], color=["tab:blue", "tab:orange"][: len(names)])
    ax_time.set_ylabel("training time (s)")
    benchmarking.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = benchmarking.bench_parser(NAME, __doc__, threads_default="1 per configuration")
    parser.add_argument("--lengths", type=benchmarking.positive_int, nargs="+", help="sequence lengths (default 1k..32k; quick 512..2k)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="default: all")
    parser.add_argument("--max-eager-tokens", type=benchmarking.positive_int, default=16384, help="longest N for eager softmax")
    parser.add_argument("--num-landmarks", type=benchmarking.positive_int, default=49, help="SOFT landmarks")
    parser.add_argument("--repeats", type=benchmarking.positive_int, default=None, help="timed repeats per point (median)")
    parser.add_argument("--timeout", type=benchmarking.positive_float, default=600.0, help="seconds per configuration")
    parser.add_argument("--skip-vit", action="store_true", help="only the scaling part")
    parser.add_argument("--vit-train", type=benchmarking.positive_int, default=None, help="Fashion-MNIST training images")
    parser.add_argument("--vit-epochs", type=benchmarking.positive_int, default=None, help="ViT epochs (default 2, quick 1)")
    parser.add_argument("--vit-patch", type=int, default=None, choices=VIT_PATCHES,
                        help="patch size, a divisor of 28: (28 / patch)^2 tokens (default 2, quick 4)")  # fmt: skip
    args = parser.parse_args(argv)
    args.lengths = sorted(args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS))
    args.repeats = args.repeats or (2 if args.quick else 3)
    threads = benchmarking.torch_threads(args.threads, default=1)
    if any(n < 64 or n % 64 for n in args.lengths):
        parser.error("--lengths must be multiples of 64 (Nystromformer's 64 segment means)")

    points = _run_scaling(args, threads)
    summary = _summary(points, args.lengths)
    table = _scaling_table(points, args.lengths, args.methods)
    lines = [table, "", "fitted exponent k (time ~ N^k): " + ", ".join(
        f"{m} {k:.2f}" for m, k in summary["exponent"].items())]  # fmt: skip
    if "soft_time_16k_over_4k" in summary:
        lines.append(f"SOFT time(16k)/time(4k) = {summary['soft_time_16k_over_4k']:.2f} (target <= 5)")
    if "soft_over_eager_memory_16k" in summary:
        lines.append(f"SOFT / eager memory at 16k = {summary['soft_over_eager_memory_16k']:.3f} (target <= 0.1)")
    failures = [p for p in points if "error" in p]
    lines += [f"{p['method']} at N={p['tokens']} failed: {p['error']}" for p in failures]

    vit_results: list[dict[str, Any]] = []
    if not args.skip_vit:
        train_limit = args.vit_train or (1000 if args.quick else 12000)
        epochs = args.vit_epochs or (1 if args.quick else 2)
        patch = args.vit_patch or (4 if args.quick else 2)
        for attention in benchmarking.progress(["soft", "sdpa"], desc=f"{NAME} ViT"):
            result = benchmarking.run_in_subprocess(
                f"{__name__}:train_vit", threads=threads, attention=attention, train_limit=train_limit,
                test_limit=1000 if args.quick else 10000, epochs=epochs, patch_size=patch, seed=args.seed,
            )  # fmt: skip
            result["peak_mib"] = benchmarking.mib(result["peak_rss_bytes"] - result["import_rss_bytes"])
            vit_results.append(result)
        vit_columns = ["attention", "tokens", "steps", "test_acc", "final_train_loss", "train_seconds", "peak_mib"]
        lines += ["", f"ViT on Fashion-MNIST ({train_limit} training images, {epochs} epoch(s)):", ""]
        lines.append(benchmarking.format_table(vit_results, vit_columns))
        _plot_vit(vit_results, args.out / f"{NAME}-vit.png")

    figures = {
        "config": {"dim": 64, "num_heads": 2, "num_landmarks": args.num_landmarks, "threads": threads,
                   "repeats": args.repeats, "lengths": args.lengths},
        "scaling": points, "summary": summary, "vit": vit_results,
    }  # fmt: skip
    benchmarking.finish(args.out, NAME, figures, "\n".join(lines), lambda path: _plot_scaling(points, args.methods, path))
    return 0
