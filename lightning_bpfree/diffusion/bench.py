"""``bpfree diffusion-bench``: memory, time and gradient agreement of adjoint vs direct backprop through sampling.

For each step count, three ways to get one gradient of a sample loss with respect to ``x_T``, the
conditioning and the UNet weights (a tiny ``UNet2DConditionModel`` built from a config, random weights):

- ``adjoint``: :class:`AdjointSampler` with ``adjoint=True`` (torchdiffeq ``odeint_adjoint``);
- ``backprop``: autograd through every Euler step (the exact gradient of the discrete sampler);
- ``checkpoint``: the same, recomputing each UNet call in backward (``torch.utils.checkpoint``).

Each (mode, steps) runs in a fresh interpreter so its peak RSS is its own. The gradients are saved to
disk and compared with ``backprop`` at the same step count, by cosine and by relative L2 error
(backprop's own rows get neither: it is the reference). Writes ``diffusion-bench.{json,md,png}``.
"""

from __future__ import annotations

import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from lightning_bpfree import benchmarking
from lightning_bpfree.cli import command_name

NAME = command_name(__name__)
# the importable name of this module: under ``python -m`` it is ``__main__`` here, which the child
# interpreter of ``run_in_subprocess`` cannot import
_MODULE = __spec__.name if __spec__ is not None else __name__

MODES = ("adjoint", "backprop", "checkpoint")
TARGETS = ("x_T", "conditioning", "weights")
UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}
QUICK_UNET_CONFIG = {**UNET_CONFIG, "sample_size": 8, "block_out_channels": (16, 32)}


def sample_loss(x_0: torch.Tensor) -> torch.Tensor:
    """A loss that depends on where samples land: a fixed linear read-out plus the mean square."""
    weights = torch.linspace(-1.0, 1.0, x_0.numel(), device=x_0.device).view_as(x_0)
    return (x_0 * weights).sum() / x_0.shape[0] + x_0.square().mean()


def gradient_run(
    mode: str, num_steps: int, grad_path: str, seed: int = 0, batch: int = 4, quick: bool = False
) -> dict[str, Any]:
    """One gradient of ``sample_loss`` in the current process; saves it to ``grad_path``.

    Returns seconds for the gradient, UNet evaluations (forward, adjoint, recomputed), and the peak RSS
    during the gradient minus the RSS just before it (``grad_rss_bytes``).
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from lightning_bpfree.diffusion.adjoint import AdjointSampler

    torch.manual_seed(seed)
    config = QUICK_UNET_CONFIG if quick else UNET_CONFIG
    unet = UNet2DConditionModel(**config).eval()
    size, channels = config["sample_size"], config["in_channels"]
    x_T = torch.randn(batch, channels, size, size, requires_grad=True)
    conditioning = torch.randn(batch, 8, config["cross_attention_dim"], requires_grad=True)
    scheduler = DDIMScheduler(clip_sample=False)

    def make_sampler(steps: int) -> AdjointSampler:
        return AdjointSampler(unet, scheduler, steps, adjoint=mode == "adjoint", checkpoint_steps=mode == "checkpoint")

    sample_loss(make_sampler(1)(x_T, conditioning)).backward()  # warm-up: allocator, kernels, lazy imports
    unet.zero_grad(set_to_none=True)
    x_T.grad = conditioning.grad = None
    rss_before = _current_rss_bytes()

    sampler = make_sampler(num_steps)
    start = time.perf_counter()
    sample_loss(sampler(x_T, conditioning)).backward()
    seconds = time.perf_counter() - start
    rss_after = benchmarking.peak_rss_bytes()
    grads = {
        "x_T": x_T.grad.flatten(),
        "conditioning": conditioning.grad.flatten(),
        "weights": torch.cat([p.grad.flatten() for p in unet.parameters()]),
    }
    torch.save(grads, grad_path)
    return {
        "seconds": seconds,
        "evaluations": sampler.counter["evaluations"],
        "grad_rss_bytes": rss_after - rss_before,
        "parameters": sum(p.numel() for p in unet.parameters()),
    }


def _current_rss_bytes() -> int:
    """Resident set size now (not the peak), from /proc; 0 where /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * resource.getpagesize()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64: the Euler adjoint's gap to backprop, O(1/N) in the steps."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def run(
    steps: list[int],
    batch: int,
    seed: int,
    quick: bool,
    threads: int = 1,
    modes: tuple[str, ...] = MODES,
    workers: int = 1,
) -> list[dict[str, Any]]:
    """All (steps, mode) configurations, each in its own subprocess; rows for the table.

    ``modes`` is a subset of :data:`MODES` that includes ``"backprop"``, the reference of the
    cosines and relative errors (``cos_<target>``, ``rel_err_<target>`` for ``TARGETS``).
    ``workers`` subprocesses run at once: each still has its own peak RSS, but their ``seconds``
    then share the cores, so the benchmark's timings use 1.
    """
    if "backprop" not in modes or not set(modes) <= set(MODES):
        raise ValueError(f"modes must be a subset of {MODES} that includes 'backprop', got {modes!r}")
    with tempfile.TemporaryDirectory() as folder:
        jobs = [(n, mode) for n in steps for mode in MODES if mode in modes]

        def measure(job: tuple[int, str]) -> dict[str, Any]:
            num_steps, mode = job
            path = str(Path(folder) / f"{mode}-{num_steps}.pt")
            result = benchmarking.run_in_subprocess(
                f"{_MODULE}:gradient_run",
                mode=mode,
                num_steps=num_steps,
                grad_path=path,
                seed=seed,
                batch=batch,
                quick=quick,
                threads=threads,
            )
            return {
                "steps": num_steps,
                "mode": mode,
                "seconds": result["seconds"],
                "peak_rss_mib": benchmarking.mib(result["peak_rss_bytes"]),
                "grad_rss_mib": benchmarking.mib(result["grad_rss_bytes"]),
                "unet_calls": result["evaluations"],
                "parameters": result["parameters"],
                "_grad_path": path,
            }

        # threads only wait on the child interpreters, which do the work
        with ThreadPoolExecutor(max_workers=workers) as pool:
            rows = list(benchmarking.progress(pool.map(measure, jobs), total=len(jobs), desc=NAME))
        for row in rows:
            path = row.pop("_grad_path")
            for target in TARGETS:  # backprop is the reference: no comparison with itself
                row[f"cos_{target}"] = row[f"rel_err_{target}"] = None
            if row["mode"] == "backprop":
                continue
            reference = torch.load(Path(folder) / f"backprop-{row['steps']}.pt")
            grads = torch.load(path)
            for target in TARGETS:
                row[f"cos_{target}"] = _cosine(grads[target], reference[target])
                row[f"rel_err_{target}"] = _relative_error(grads[target], reference[target])
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets: adjoint memory growth fewest -> most steps (and backprop's, when its rows
    have memory figures), and where the cosine reaches 0.99."""
    adjoint = sorted((r for r in rows if r["mode"] == "adjoint"), key=lambda r: r["steps"])
    first, last = adjoint[0], adjoint[-1]
    reached = {target: next((r["steps"] for r in adjoint if r[f"cos_{target}"] >= 0.99), None) for target in TARGETS}
    backprop = {r["steps"]: r for r in rows if r["mode"] == "backprop"}
    extra = {}
    if first["steps"] in backprop and last["steps"] in backprop:
        extra["backprop_peak_rss_ratio"] = (
            backprop[last["steps"]]["peak_rss_mib"] / backprop[first["steps"]]["peak_rss_mib"]
        )
    return {
        "adjoint_peak_rss_ratio": last["peak_rss_mib"] / first["peak_rss_mib"],
        **extra,
        "adjoint_grad_rss_mib": {r["steps"]: r["grad_rss_mib"] for r in adjoint},
        "ratio_steps": [first["steps"], last["steps"]],
        "first_steps_with_cosine_0_99": reached,
        "cosine_at_max_steps": {t: last[f"cos_{t}"] for t in TARGETS},
    }


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, (ax_mem, ax_time, ax_cos) = benchmarking.new_figure(ncols=3, width=4.6, height=3.6)
    for mode in (m for m in MODES if any(r["mode"] == m for r in rows)):
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["steps"])
        steps = [r["steps"] for r in mine]
        ax_mem.plot(steps, [r["grad_rss_mib"] for r in mine], marker="o", label=mode)
        ax_time.plot(steps, [r["seconds"] for r in mine], marker="o", label=mode)
    adjoint = sorted((r for r in rows if r["mode"] == "adjoint"), key=lambda r: r["steps"])
    for target in TARGETS:
        ax_cos.plot([r["steps"] for r in adjoint], [r[f"cos_{target}"] for r in adjoint], marker="o", label=target)
    ax_cos.axhline(0.99, color="grey", linestyle="--", linewidth=1)
    ax_mem.set(xlabel="sampling steps", ylabel="RSS growth of one gradient (MiB)", title="memory")
    ax_time.set(xlabel="sampling steps", ylabel="seconds per gradient", title="time")
    ax_cos.set(xlabel="sampling steps", ylabel="cosine to direct backprop", title="adjoint gradient")
    for axis in (ax_mem, ax_time, ax_cos):
        axis.legend()
        axis.grid(alpha=0.3)
    return benchmarking.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = benchmarking.bench_parser(NAME, __doc__, threads_default="1 per configuration")
    parser.add_argument(
        "--steps", type=benchmarking.positive_int, nargs="+", default=None, help="step counts (default 10 25 50 100)"
    )
    parser.add_argument(
        "--batch", type=benchmarking.positive_int, default=None, help="samples per gradient (default 4, quick 2)"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="gradient modes to run (default all; backprop, the reference, is always run)",
    )
    args = parser.parse_args(argv)
    steps = args.steps or ([4, 8] if args.quick else [10, 25, 50, 100])
    batch = args.batch or (2 if args.quick else 4)
    threads = benchmarking.torch_threads(args.threads, default=1)
    modes = tuple(m for m in MODES if m in args.modes or m == "backprop")
    rows = run(sorted(set(steps)), batch, args.seed, args.quick, threads, modes)
    columns = ["steps", "mode", "seconds", "grad_rss_mib", "peak_rss_mib", "unet_calls"]
    columns += [f"cos_{t}" for t in TARGETS] + [f"rel_err_{t}" for t in TARGETS]
    summary = summarize(rows)
    config = QUICK_UNET_CONFIG if args.quick else UNET_CONFIG
    figures = {"rows": rows, "summary": summary, "batch": batch, "threads": threads, "unet_config": config}
    benchmarking.finish(
        args.out,
        NAME,
        figures,
        f"{benchmarking.format_table(rows, columns)}\n\n{summary}",
        lambda path: plot(rows, path),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
