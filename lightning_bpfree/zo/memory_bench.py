"""``bpfree zo-memory``: peak memory and time of a ZO step against inference and first-order steps.

An OPT-style decoder of about 100 M parameters built from a config (random weights: memory and
time do not depend on the values), batch 8 x 128 tokens. Each configuration runs in its own
process; peak memory is the process's peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.

Targets (issue 2): the extra peak memory of a ZO-SGD step over inference is at most 5 % of the
parameter bytes, and a ZO-SGD step takes at most 2.4x one no-grad forward (``Trainer.validate``
on the same batch, so that Lightning's own memory and time cancel out).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from lightning_bpfree.benchmarking import (
    add_output_args,
    format_table,
    mib,
    new_figure,
    run_in_subprocess,
    save_figure,
    write_results,
)

MODEL_SIZES = {  # OPT-style configs: (hidden, layers, heads, ffn, vocab)
    "100m": (768, 12, 12, 3072, 16384),
    "quick": (256, 4, 4, 1024, 8192),
}
MODES = ("inference", "zo-sgd", "fo-sgd", "fo-adamw")


def opt_model(size: str) -> torch.nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    hidden, layers, heads, ffn, vocab = MODEL_SIZES[size]
    config = OPTConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
        word_embed_proj_dim=hidden, max_position_embeddings=512, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return OPTForCausalLM(config)


def measure(mode: str, size: str, batch_size: int, seq_len: int, steps: int, device: str = "cpu") -> dict[str, Any]:
    """One row of the table: builds the model, runs ``steps`` timed steps of ``mode`` after one warm-up."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_bpfree.zo.callback import ZerothOrder
    from lightning_bpfree.zo.demo import StepRecorder
    from lightning_bpfree.zo.module import CausalLMModule

    torch.manual_seed(0)
    model = opt_model(size).to(device)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batch = torch.randint(4, model.config.vocab_size, (batch_size, seq_len), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Every mode runs inside a Lightning Trainer, so that the harness's own memory cancels out.
    module = CausalLMModule(model, lr=1e-5)
    if mode == "fo-sgd":
        module.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=1e-3)
    recorder = StepRecorder()
    callbacks: list = [recorder]
    if mode == "zo-sgd":
        callbacks.append(ZerothOrder("zo-sgd", lr=1e-6, eps=1e-3, exact_restore=False))
    trainer = pl.Trainer(
        max_steps=steps + 1, accelerator=device, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
    )  # fmt: skip
    loader = DataLoader(TensorDataset(batch.cpu().repeat(steps + 1, 1)), batch_size=batch_size)
    if mode == "inference":  # no-grad forwards with the loss, through Trainer.validate
        trainer.validate(module, loader, verbose=False)
        times = sorted(recorder.validation_seconds[1:])
    else:
        trainer.fit(module, loader)
        times = sorted(recorder.seconds[1:])
    seconds = times[len(times) // 2]
    return {"seconds_per_step": seconds, "parameter_bytes": parameter_bytes, "time": time.time()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bpfree zo-memory", description=__doc__.split("\n\n")[0])
    add_output_args(parser, "zo-memory")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    size = "quick" if args.quick else "100m"
    memory_key = "cuda_max_allocated_bytes" if args.device == "cuda" else "peak_rss_bytes"

    rows = []
    for mode in MODES:
        print(f"measuring {mode} in a subprocess ...", flush=True)
        result = run_in_subprocess(
            "lightning_bpfree.zo.memory_bench:measure", mode=mode, size=size, batch_size=args.batch_size,
            seq_len=args.seq_len, steps=args.steps, device=args.device,
        )  # fmt: skip
        rows.append({"mode": mode, "peak (MiB)": mib(result[memory_key]), "s/step": result["seconds_per_step"],
                     "parameter_bytes": result["parameter_bytes"]})  # fmt: skip
    parameter_mib = mib(rows[0]["parameter_bytes"])
    base = rows[0]
    for row in rows:
        row["extra over inference (% of params)"] = 100 * (row["peak (MiB)"] - base["peak (MiB)"]) / parameter_mib
        row["x inference memory"] = row["peak (MiB)"] / base["peak (MiB)"]
        row["x one forward (time)"] = row["s/step"] / base["s/step"]
    columns = ["mode", "peak (MiB)", "extra over inference (% of params)", "x inference memory", "s/step",
               "x one forward (time)"]  # fmt: skip
    table = format_table(rows, columns)
    zo = rows[1]
    verdict = (
        f"ZO-SGD extra memory {zo['extra over inference (% of params)']:.1f}% of parameter bytes (target <= 5%): "
        f"{'met' if zo['extra over inference (% of params)'] <= 5 else 'NOT met'}; "
        f"ZO-SGD step {zo['x one forward (time)']:.2f}x one forward (target <= 2.4x): "
        f"{'met' if zo['x one forward (time)'] <= 2.4 else 'NOT met'}"
    )
    header = (f"OPT-style model, {parameter_mib:.0f} MiB of fp32 parameters ({rows[0]['parameter_bytes'] / 4e6:.0f} M), "
              f"batch {args.batch_size} x {args.seq_len}, device {args.device}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"\n{header}\n\n{table}\n\n{verdict}")

    fig, (ax_mem, ax_time) = new_figure(ncols=2, width=5)
    names = [row["mode"] for row in rows]
    ax_mem.bar(names, [row["peak (MiB)"] for row in rows], color=["grey", "tab:green", "tab:orange", "tab:red"])
    ax_mem.set_ylabel("peak memory (MiB)")
    ax_time.bar(names, [row["x one forward (time)"] for row in rows], color=["grey", "tab:green", "tab:orange", "tab:red"])
    ax_time.axhline(2.4, ls="--", color="k", lw=1)
    ax_time.set_ylabel("seconds per step / one no-grad forward")
    ax_mem.set_title(header.split(",")[0])
    save_figure(fig, args.out / "zo-memory.png")
    write_results(args.out, "zo-memory", {"header": header, "rows": rows, "verdict": verdict}, f"{header}\n\n{table}\n\n{verdict}")
    print(f"wrote {args.out}/zo-memory.png and zo-memory.json")
    return 0
