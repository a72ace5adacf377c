"""``bpfree odice-bench``: orthogonal vs semi vs true gradient ODICE on the same offline datasets.

For every dataset kind (collected once from gymnasium and cached as ``.npz``), every gradient rule and
every seed, an :class:`~lightning_bpfree.odice.module.ODICE` module is trained in a Lightning Trainer with
the :class:`~lightning_bpfree.odice.module.OfflineEvaluation` callback. Reported: the final normalized
return (mean of the last two evaluations; 0 = random policy, 100 = expert), its mean and standard
deviation over seeds, and the mean cos(g_forward, g_backward) over training. Writes
``odice-bench.json``, ``odice-bench.md`` (the table) and ``odice-bench.png`` (curves) to ``--out``.

The defaults (10,000 steps, batch 128, 64x64 MLPs, Adam 1e-3, lam 0.5, eta 1) are one setting for
all rules and datasets, picked on a separate tuning seed; ``docs/odice.md`` says how.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_bpfree import benchmarking
from lightning_bpfree.cli import command_name

NAME = command_name(__name__)
GRADIENT_RULES = ("orthogonal", "semi", "true")
BENCH_SETTINGS = dict(batch_size=128, hidden=64, lr=1e-3, lam=0.5, eta=1.0)
"""The one setting ``odice-bench`` uses for every rule and dataset (its option defaults); ``docs/odice.md``
says how it was picked. ``TrainSettings(steps=..., eval_every=..., **BENCH_SETTINGS)`` is a benchmark run."""


@dataclass(frozen=True)
class TrainSettings:
    """One ODICE run: ``steps`` batches of ``batch_size`` transitions, ``episodes`` evaluation episodes
    every ``eval_every`` steps; two ``hidden``-wide layers in the value and policy MLPs, Adam at ``lr``
    for both; ODICE's ``lam`` and ``eta`` (weight of the projected backward gradient)."""

    steps: int
    eval_every: int
    batch_size: int = 256
    hidden: int = 256
    lr: float = 2e-4
    lam: float = 0.6
    eta: float = 1.0
    episodes: int = 10


def train_one(dataset_path: str, gradient: str, seed: int, settings: TrainSettings) -> dict[str, Any]:
    """Train one ODICE configuration; return its evaluation history and wall-clock seconds."""
    import lightning as L
    import torch

    from lightning_bpfree.odice.callback import OfflineEvaluation
    from lightning_bpfree.odice.datasets import OfflineDataset, offline_dataloader
    from lightning_bpfree.odice.module import ODICE

    data = OfflineDataset.load(dataset_path)
    L.seed_everything(seed, verbose=False)
    hidden, lr = (settings.hidden, settings.hidden), settings.lr
    model = ODICE.for_dataset(
        data,
        gradient=gradient,
        value_hidden=hidden,
        policy_hidden=hidden,
        value_lr=lr,
        policy_lr=lr,
        lam=settings.lam,
        eta=settings.eta,
        log_every_n_steps=100,  # nothing is logged (logger=False); the diagnostics come via the callback
    )
    evaluation = OfflineEvaluation(
        data.env_id, every_n_steps=settings.eval_every, episodes=settings.episodes, seed=10_000 + seed
    )
    trainer = L.Trainer(
        max_steps=settings.steps,
        accelerator="cpu",
        callbacks=[evaluation],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    with torch.random.fork_rng():
        loader = offline_dataloader(data, batch_size=settings.batch_size, num_batches=settings.steps, seed=seed)
        trainer.fit(model, loader)
    history = evaluation.history
    final = float(np.mean([row["normalized_return"] for row in history[-2:]]))
    cosines = [row["cos_forward_backward"] for row in history if "cos_forward_backward" in row]
    return {
        "history": history,
        "final_normalized_return": final,
        "mean_cos_forward_backward": float(np.mean(cosines)) if cosines else float("nan"),
        "seconds": time.perf_counter() - start,
    }


def _summarise(runs: list[dict[str, Any]], kinds: list[str]) -> list[dict[str, Any]]:
    rows = []
    for kind in [*kinds, "average"]:
        for gradient in GRADIENT_RULES:
            chosen = [r for r in runs if r["gradient"] == gradient and (kind == "average" or r["dataset"] == kind)]
            if not chosen:
                continue
            if kind == "average":  # average over datasets per seed, then spread over seeds
                seeds = sorted({r["seed"] for r in chosen})
                finals = [np.mean([r["final_normalized_return"] for r in chosen if r["seed"] == s]) for s in seeds]
            else:
                finals = [r["final_normalized_return"] for r in chosen]
            rows.append(
                {
                    "dataset": kind,
                    "gradient": gradient,
                    "normalized return (mean)": float(np.mean(finals)),
                    "std over seeds": float(np.std(finals)),
                    "cos(g_f, g_b)": float(np.mean([r["mean_cos_forward_backward"] for r in chosen])),
                    "seconds / run": float(np.mean([r["seconds"] for r in chosen])),
                }
            )
    return rows


def _plot(runs: list[dict[str, Any]], kinds: list[str], path: Path) -> Path:
    fig, axes = benchmarking.new_figure(ncols=len(kinds) + 1, width=4.0, height=3.4)
    colours = {"orthogonal": "tab:blue", "semi": "tab:orange", "true": "tab:red"}
    for ax, kind in zip(axes, kinds):
        for gradient in GRADIENT_RULES:
            chosen = [r for r in runs if r["dataset"] == kind and r["gradient"] == gradient]
            if not chosen:
                continue
            steps = [row["step"] for row in chosen[0]["history"]]
            curves = np.array([[row["normalized_return"] for row in r["history"]] for r in chosen])
            mean, std = curves.mean(0), curves.std(0)
            ax.plot(steps, mean, label=gradient, color=colours[gradient])
            ax.fill_between(steps, mean - std, mean + std, color=colours[gradient], alpha=0.15)
        ax.set_title(kind)
        ax.set_xlabel("training step")
        ax.set_ylabel("normalized return")
        ax.grid(alpha=0.3)
    axes[0].legend()
    ax = axes[-1]
    for gradient in GRADIENT_RULES:
        chosen = [r for r in runs if r["gradient"] == gradient]
        rows = [row for r in chosen for row in r["history"] if "cos_forward_backward" in row]
        if not rows:
            continue
        steps = sorted({row["step"] for row in rows})
        mean = [np.mean([row["cos_forward_backward"] for row in rows if row["step"] == s]) for s in steps]
        ax.plot(steps, mean, marker="o", label=gradient, color=colours[gradient])
    ax.set_title("cos(g_forward, g_backward)")
    ax.set_xlabel("training step")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.grid(alpha=0.3)
    return benchmarking.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from lightning_bpfree.odice.datasets import DATASET_KINDS, REFERENCE_RETURNS

    positive_int = benchmarking.positive_int
    parser = benchmarking.bench_parser(NAME, __doc__, threads_default="1: small networks, threads only add contention")
    parser.add_argument("--env", default="Pendulum-v1", choices=tuple(REFERENCE_RETURNS), help="gymnasium environment id")
    parser.add_argument("--datasets", nargs="+", default=["medium", "medium-replay", "medium-expert"],
                        choices=DATASET_KINDS, help="dataset kinds (quick: random expert)")  # fmt: skip
    parser.add_argument("--seeds", type=positive_int, default=3, help="training seeds per configuration")
    parser.add_argument("--steps", type=positive_int, default=None, help="training steps per run (default 10000, quick 200)")
    parser.add_argument("--eval-every", type=positive_int, default=None, help="evaluate every N steps (default steps / 10)")
    parser.add_argument("--transitions", type=positive_int, default=None,
                        help="transitions per collected dataset (default 20000, quick 2000)")  # fmt: skip
    parser.add_argument("--hidden", type=positive_int, default=BENCH_SETTINGS["hidden"], help="width of the value and policy MLPs")
    parser.add_argument("--batch-size", type=positive_int, default=BENCH_SETTINGS["batch_size"], help="transitions per training batch")
    parser.add_argument("--lr", type=benchmarking.positive_float, default=BENCH_SETTINGS["lr"], help="Adam learning rate (value and policy)")
    parser.add_argument("--lam", type=benchmarking.float_in(0.0, 1.0, low_open=True), default=BENCH_SETTINGS["lam"],
                        help="ODICE lambda in (0, 1] (paper default 0.6; tuned per task)")  # fmt: skip
    parser.add_argument("--eta", type=benchmarking.nonnegative_float, default=BENCH_SETTINGS["eta"],
                        help="ODICE eta >= 0 (weight of the projected g_b)")  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=None, help="dataset cache (default: <out>/datasets)")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets = args.datasets if argv and "--datasets" in argv else ["random", "expert"]
        args.seeds = 1
    steps = args.steps or (200 if args.quick else 10_000)
    eval_every = args.eval_every or max(steps // 10, 1)
    transitions = args.transitions or (2_000 if args.quick else 20_000)
    settings = TrainSettings(steps=steps, eval_every=eval_every, batch_size=args.batch_size, hidden=args.hidden,
                             lr=args.lr, lam=args.lam, eta=args.eta)  # fmt: skip
    with benchmarking.using_threads(benchmarking.torch_threads(args.threads, default=1)) as threads:
        return _run(args, settings, transitions, threads)


def _run(args: argparse.Namespace, settings: TrainSettings, transitions: int, threads: int) -> int:
    from lightning_bpfree.odice.behaviour import load_or_make_datasets
    from lightning_bpfree.odice.datasets import normalized_return

    warnings.filterwarnings("ignore", module="lightning")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    cache_dir = args.cache_dir or args.out / "datasets"
    print(f"collecting / loading {args.env} datasets {args.datasets} in {cache_dir} ...")
    datasets = load_or_make_datasets(
        args.env, args.datasets, cache_dir=cache_dir, num_steps=transitions, seed=args.seed, progress=True
    )
    dataset_rows = [
        {
            "dataset": kind,
            "transitions": len(data),
            "episodes": len(data.episode_returns()),
            "behaviour normalized return": normalized_return(args.env, float(data.episode_returns().mean())),
        }
        for kind, data in datasets.items()
    ]
    configs = [
        (kind, gradient, args.seed + s)
        for kind in args.datasets
        for gradient in GRADIENT_RULES
        for s in range(args.seeds)
    ]
    runs = []
    for kind, gradient, seed in benchmarking.progress(configs, desc=NAME):
        path = cache_dir / f"{args.env}-{kind}-{transitions}-s{args.seed}.npz"
        result = train_one(str(path), gradient, seed, settings)
        runs.append({"dataset": kind, "gradient": gradient, "seed": seed, **result})
    rows = _summarise(runs, args.datasets)
    table = benchmarking.format_table(dataset_rows) + "\n\n" + benchmarking.format_table(rows)
    average = {r["gradient"]: r["normalized return (mean)"] for r in rows if r["dataset"] == "average"}
    verdict = (
        "orthogonal >= both baselines on average: "
        f"{'yes' if average['orthogonal'] >= max(average['semi'], average['true']) else 'no'} "
        f"(orthogonal {average['orthogonal']:.1f}, semi {average['semi']:.1f}, true {average['true']:.1f})"
    )
    figures = {
        "env": args.env,
        "settings": {
            **asdict(settings),
            "transitions": transitions,
            "seeds": args.seeds,
            "quick": args.quick,
            "threads": threads,
        },
        "datasets": dataset_rows,
        "summary": rows,
        "verdict": verdict,
        "runs": runs,
    }
    benchmarking.finish(args.out, NAME, figures, table + "\n\n" + verdict, lambda path: _plot(runs, args.datasets, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
