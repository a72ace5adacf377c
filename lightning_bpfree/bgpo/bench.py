"""``bpfree bgpo-bench``: BGPO's memory against the number of Monte Carlo samples, and reward curves.

Two parts:

1. **Memory.** One policy update (Monte Carlo draws, old ELBOs, gradient, AdamW step) of a small
   BERT masked-diffusion LM for ``n_t`` in {1, 4, 16, 64}, with BGPO (one forward + backward per
   draw) and the naive ELBO-ratio objective (all draws' graphs kept until one backward), plus one
   diffu-GRPO update (one-step estimate, no ``n_t``). Each configuration runs in its own
   interpreter and reports its peak RSS. Target: BGPO's peak at ``n_t = 64`` within 1.2x of ``n_t = 1``.
2. **Task.** 2-digit addition (``37+05=`` -> ``042``, reward 1 for the exact sum): supervised
   warm-up of a small diffusion LM, then RL from the same warm-up weights with BGPO and with
   diffu-GRPO. Reports rollout-reward curves and held-out accuracy before and after.

Prints a Markdown table and writes ``bgpo-bench.json``, ``bgpo-bench.md`` and ``bgpo-bench.png``.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from lightning_bpfree import benchmarking
from lightning_bpfree.cli import command_name

NAME = command_name(__name__)
MC_SAMPLES = (1, 4, 16, 64)
MEMORY_TARGET = 1.2


@dataclass(frozen=True)
class ProbeSize:
    """The rollouts and the policy of one memory probe: ``batch_size`` sequences of ``prompt_length``
    + ``response_length`` tokens; a BERT masked-diffusion LM with ``num_layers`` layers of width
    ``hidden_size`` (heads of 32) over ``vocab_size`` tokens."""

    batch_size: int = 16
    prompt_length: int = 32
    response_length: int = 64
    hidden_size: int = 128
    num_layers: int = 2
    vocab_size: int = 512


def memory_probe(objective: str, num_mc_samples: int, seed: int = 0, **size: int) -> dict[str, Any]:
    """One policy update on random rollouts; run it through ``run_in_subprocess`` to read its peak RSS.

    ``size``: fields of :class:`ProbeSize` that differ from its defaults.
    """
    from lightning_bpfree.bgpo.losses import accumulate_policy_gradient, prepare_policy_batch
    from lightning_bpfree.bgpo.masked_lm import tiny_diffusion_lm

    shape = ProbeSize(**size)
    torch.manual_seed(seed)
    length = shape.prompt_length + shape.response_length
    vocab_size = shape.vocab_size
    policy = tiny_diffusion_lm(
        vocab_size,
        mask_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 2,
        max_length=length,
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        num_heads=max(1, shape.hidden_size // 32),
    )
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    input_ids = torch.randint(0, vocab_size - 2, (shape.batch_size, length))
    response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    response_mask[:, shape.prompt_length :] = True
    advantages = torch.randn(shape.batch_size)
    start = time.perf_counter()
    batch = prepare_policy_batch(policy, input_ids, response_mask, advantages, objective, num_mc_samples)
    optimizer.zero_grad()
    stats = accumulate_policy_gradient(policy, batch)
    optimizer.step()
    seconds = time.perf_counter() - start
    # the gradient, summarised by its norm and its projection on a fixed random direction, so that two
    # objectives can be compared at theta = theta_old, where BGPO's bound has the exact gradient
    gradient = torch.cat([p.grad.reshape(-1) for p in policy.parameters() if p.grad is not None])
    direction = torch.randn(gradient.numel(), generator=torch.Generator().manual_seed(12345))
    return {
        "seconds": seconds,
        "loss": stats["loss"],
        "grad_norm": float(gradient.norm()),
        "grad_projection": float(gradient @ direction),
    }


def memory_sweep(quick: bool, seed: int, threads: int | None = None) -> list[dict[str, Any]]:
    """Peak RSS of one update per (objective, n_t), each in a fresh subprocess."""
    sizes = {"batch_size": 4, "prompt_length": 16, "response_length": 48} if quick else {}
    configs = [(objective, n_t) for objective in ("bgpo", "naive") for n_t in MC_SAMPLES]
    configs.append(("diffu-grpo", 1))
    rows = []
    for objective, n_t in benchmarking.progress(configs, desc="memory (subprocess per config)"):
        result = benchmarking.run_in_subprocess(
            f"{__name__}:memory_probe", threads=threads, objective=objective, num_mc_samples=n_t, seed=seed, **sizes
        )
        rows.append(
            {
                "objective": objective,
                "n_t": n_t if objective != "diffu-grpo" else "- (one step)",
                "peak_rss_mib": benchmarking.mib(result["peak_rss_bytes"]),
                "above_import_mib": benchmarking.mib(result["peak_rss_bytes"] - result["import_rss_bytes"]),
                "update_s": result["seconds"],
            }
        )
    for objective in ("bgpo", "naive"):
        ours = [row for row in rows if row["objective"] == objective]
        for row in ours:
            row["peak_vs_n_t_1"] = row["peak_rss_mib"] / ours[0]["peak_rss_mib"]
    return rows


def _trainer(max_steps: int, show_progress: bool, callbacks: list | None = None):
    import lightning as L

    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=show_progress,
        callbacks=callbacks,
    )


def _stop_at_accuracy(task, prompts: torch.Tensor, target: float, every: int):
    """A callback that stops the warm-up once the sampled accuracy on ``prompts`` reaches ``target``.

    The warm-up's accuracy jumps from a few percent to most answers within ~100 steps, so a fixed
    step count lands either side of it depending on the machine; stopping at a target accuracy
    (on training prompts, not the held-out ones) gives RL the same starting point everywhere.
    """
    import lightning as L

    class StopAtAccuracy(L.Callback):
        def __init__(self) -> None:
            self.checks: list[tuple[int, float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step % every:
                return
            accuracy = task.accuracy(pl_module.policy, prompts, temperature=1.0)
            self.checks.append((trainer.global_step, accuracy))
            trainer.should_stop = accuracy >= target

    return StopAtAccuracy()


def addition_task_run(
    quick: bool, seed: int, objectives: tuple[str, ...] | None = None, **overrides: int | float
) -> dict[str, Any]:
    """Warm-up then RL on 2-digit addition; rollout rewards per step and held-out accuracies.

    ``overrides`` replace entries of the run's settings (for example ``rl_steps=30`` for a CI-sized
    run of the full task); the settings actually used come back under ``"settings"``.
    """
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_bpfree.bgpo.module import BGPO, MaskedDiffusionSFT
    from lightning_bpfree.bgpo.tasks import AdditionTask
    from lightning_bpfree.validation import check_options

    settings = {
        "num_digits": 1 if quick else 2,
        "hidden_size": 64,
        "num_layers": 2,
        "warmup_max_steps": 80 if quick else 1500,
        "warmup_target_accuracy": 0.3,
        "warmup_batch": 64,
        "warmup_lr": 2e-3,
        "rl_steps": 15 if quick else 150,
        "prompts_per_step": 16,
        "group_size": 8,
        "num_mc_samples": 4,
        "updates_per_batch": 2,
        "rl_lr": 3e-4,
        "held_out_prompts": 200 if quick else 1000,
    }
    check_options("addition_task_run", overrides, settings)
    settings.update(overrides)
    objectives = objectives or (("bgpo",) if quick else ("bgpo", "diffu-grpo"))
    show_progress = not quick
    L.seed_everything(seed, verbose=False)
    task = AdditionTask(settings["num_digits"], seed=seed)
    policy = task.make_policy(settings["hidden_size"], settings["num_layers"])
    held_out = task.prompt_dataset(settings["held_out_prompts"], "held_out", torch.Generator().manual_seed(seed + 1))
    held_out_prompts = held_out.tensors[0]

    start = time.perf_counter()
    warmup_data = task.supervised_dataset(
        settings["warmup_max_steps"] * settings["warmup_batch"], torch.Generator().manual_seed(seed + 2)
    )
    check_prompts = task.prompt_dataset(256, generator=torch.Generator().manual_seed(seed + 5)).tensors[0]
    stopper = _stop_at_accuracy(task, check_prompts, settings["warmup_target_accuracy"], every=25)
    warmup_trainer = _trainer(settings["warmup_max_steps"], show_progress, [stopper])
    warmup_trainer.fit(
        MaskedDiffusionSFT(policy, lr=settings["warmup_lr"]),
        DataLoader(warmup_data, batch_size=settings["warmup_batch"], shuffle=True),
    )
    result: dict[str, Any] = {
        "settings": settings,
        "warmup_steps": warmup_trainer.global_step,
        "warmup_checks": stopper.checks,
        "warmup_seconds": time.perf_counter() - start,
        "after_warmup": {
            "greedy_accuracy": task.accuracy(policy, held_out_prompts),
            "sampled_accuracy": task.accuracy(policy, held_out_prompts, temperature=1.0),
        },
        "runs": {},
    }
    warm_state = copy.deepcopy(policy.state_dict())
    prompts = task.prompt_dataset(
        settings["rl_steps"] * settings["prompts_per_step"], generator=torch.Generator().manual_seed(seed + 3)
    )
    for objective in objectives:
        policy.load_state_dict(warm_state)
        L.seed_everything(seed + 4, verbose=False)
        module = BGPO(
            policy,
            task.reward,
            task.response_length,
            group_size=settings["group_size"],
            num_mc_samples=settings["num_mc_samples"],
            objective=objective,
            lr=settings["rl_lr"],
            updates_per_batch=settings["updates_per_batch"],
            suppress_token_ids=task.special_tokens,
        )
        start = time.perf_counter()
        # Lightning's max_steps counts optimizer steps: updates_per_batch of them per rollout batch
        _trainer(settings["rl_steps"] * settings["updates_per_batch"], show_progress).fit(
            module, DataLoader(prompts, batch_size=settings["prompts_per_step"], shuffle=True)
        )
        result["runs"][objective] = {
            "seconds": time.perf_counter() - start,
            "reward": [h["reward"] for h in module.history],
            "clip_fraction": [h["clip_fraction"] for h in module.history],
            "greedy_accuracy": task.accuracy(policy, held_out_prompts),
            "sampled_accuracy": task.accuracy(policy, held_out_prompts, temperature=1.0),
        }
    return result


def _window_mean(values: list[float], first: bool, width: int = 10) -> float:
    chunk = values[:width] if first else values[-width:]
    return sum(chunk) / len(chunk)


def _task_rows(task: dict[str, Any]) -> list[dict[str, Any]]:
    warm = task["after_warmup"]
    rows = [
        {
            "run": f"after warm-up ({task['warmup_steps']} steps)",
            "reward_first10": None,
            "reward_last10": None,
            "held_out_greedy": warm["greedy_accuracy"],
            "held_out_sampled": warm["sampled_accuracy"],
            "seconds": task["warmup_seconds"],
        }
    ]
    for objective, run in task["runs"].items():
        rows.append(
            {
                "run": f"+ {objective}",
                "reward_first10": _window_mean(run["reward"], True),
                "reward_last10": _window_mean(run["reward"], False),
                "held_out_greedy": run["greedy_accuracy"],
                "held_out_sampled": run["sampled_accuracy"],
                "seconds": run["seconds"],
            }
        )
    return rows


def _plot(memory_rows: list[dict[str, Any]], task: dict[str, Any] | None, path) -> None:
    fig, (ax_memory, ax_reward) = benchmarking.new_figure(ncols=2, width=5.5, height=4.0)
    task = task or {"runs": {}, "after_warmup": {"sampled_accuracy": float("nan")}}
    for objective, marker in (("bgpo", "o"), ("naive", "s")):
        rows = [row for row in memory_rows if row["objective"] == objective]
        ax_memory.plot([r["n_t"] for r in rows], [r["peak_rss_mib"] for r in rows], marker=marker, label=objective)
    for row in memory_rows:
        if row["objective"] == "diffu-grpo":
            ax_memory.axhline(row["peak_rss_mib"], color="grey", linestyle=":", label="diffu-grpo (one step)")
    ax_memory.set_xscale("log", base=2)
    ax_memory.set_xlabel("Monte Carlo samples n_t")
    ax_memory.set_ylabel("peak RSS of one update (MiB)")
    ax_memory.set_title("memory vs n_t")
    ax_memory.legend()
    width = 10
    for objective, run in task["runs"].items():
        rewards = run["reward"]
        smooth = [
            sum(rewards[max(0, i - width + 1) : i + 1]) / len(rewards[max(0, i - width + 1) : i + 1])
            for i in range(len(rewards))
        ]
        ax_reward.plot(range(1, len(rewards) + 1), smooth, label=f"{objective} (rollout reward, {width}-step mean)")
    ax_reward.axhline(
        task["after_warmup"]["sampled_accuracy"], color="grey", linestyle=":", label="after warm-up (held-out, sampled)"
    )
    ax_reward.set_xlabel("RL step")
    ax_reward.set_ylabel("exact-answer reward")
    ax_reward.set_title(f"{task.get('settings', {}).get('num_digits', 2)}-digit addition")
    ax_reward.legend(fontsize=8)
    benchmarking.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; ``--quick`` is the CI-sized form (under two minutes on two cores)."""
    parser = benchmarking.bench_parser(NAME, __doc__)
    parser.add_argument("--skip-memory", action="store_true", help="only run the addition task")
    parser.add_argument("--skip-task", action="store_true", help="only run the memory sweep")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with benchmarking.using_threads(benchmarking.torch_threads(args.threads)) as threads:  # the same count in the memory subprocesses
        return _run(args, threads)


def _run(args: argparse.Namespace, threads: int) -> int:
    torch.manual_seed(args.seed)
    figures: dict[str, Any] = {"quick": args.quick, "seed": args.seed, "threads": threads}
    tables = []
    memory_rows: list[dict[str, Any]] = []
    if not args.skip_memory:
        memory_rows = memory_sweep(args.quick, args.seed, threads)
        bgpo_rows = [row for row in memory_rows if row["objective"] == "bgpo"]
        ratio = bgpo_rows[-1]["peak_rss_mib"] / bgpo_rows[0]["peak_rss_mib"]
        figures["memory"] = memory_rows
        figures["bgpo_peak_64_over_1"] = ratio
        figures["memory_target_met"] = ratio <= MEMORY_TARGET
        tables.append(
            "Peak RSS of one policy update (each configuration in its own process):\n\n" + benchmarking.format_table(memory_rows)
        )
        tables.append(
            f"BGPO peak at n_t=64 / at n_t=1: {ratio:.3f} (target <= {MEMORY_TARGET}: "
            f"{'met' if ratio <= MEMORY_TARGET else 'missed'})"
        )
    task: dict[str, Any] | None = None
    if not args.skip_task:
        task = addition_task_run(args.quick, args.seed)
        figures["task"] = task
        tables.append(
            f"{task['settings']['num_digits']}-digit addition, reward = exact answer:\n\n"
            + benchmarking.format_table(_task_rows(task))
        )
    plot = (lambda path: _plot(memory_rows, task, path)) if memory_rows or task is not None else None
    benchmarking.finish(args.out, NAME, figures, "\n\n".join(tables), plot)
    return 0
