"""``bpfree zo-bench``: every ZO-Bench optimizer, scheme and enhancement, quality against memory.

Task: next-token prediction on English text (docstrings of the Python standard library), held-out
loss (nats per token) and next-token accuracy. Model: the real SmolLM2-135M-Instruct by default,
or a tiny randomly initialised LLaMA with character tokens (``--quick``, for CI). Each
configuration trains in its own subprocess, so its peak resident memory is its own; the table
also gives the memory a method adds to inference (optimizer state, gradients, kept copies,
counted from the tensors) and the forwards per step.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import torch

from lightning_bpfree.benchmarking import (
    add_output_args,
    format_table,
    mib,
    new_figure,
    progress,
    run_in_subprocess,
    save_figure,
    torch_threads,
    write_results,
)

FIRST_ORDER = ("fo-sgd", "fo-adamw")
# (method, scheme, enhancement): the rows of the benchmark
OPTIMIZER_ROWS = ["inference", "zo-sgd", "zo-sgd-sign", "zo-sgd-cons", "zo-sgd-mmt", "forward-grad", "zo-adam",
                  "fo-sgd", "fo-adamw"]  # fmt: skip
SCHEME_ROWS = ["lora", "prefix", "prompt", "head"]
ENHANCEMENT_ROWS = ["blocks", "sparsity", "hybrid"]

# Learning rates (picked by short sweeps on each model; ZO needs far smaller steps than FO on full FT).
LEARNING_RATES = {
    "tiny": {"zo-sgd": 2e-3, "zo-sgd-sign": 2e-4, "zo-sgd-cons": 2e-3, "zo-sgd-mmt": 5e-4, "forward-grad": 2e-3,
             "zo-adam": 1e-3, "fo-sgd": 0.5, "fo-adamw": 3e-3, "peft": 1e-2},
    "smollm2": {"zo-sgd": 1e-5, "zo-sgd-sign": 1e-6, "zo-sgd-cons": 1e-5, "zo-sgd-mmt": 2e-6, "forward-grad": 1e-5,
                "zo-adam": 1e-5, "fo-sgd": 1e-3, "fo-adamw": 2e-5, "peft": 1e-3},
}  # fmt: skip


def char_blocks(texts: list[str], seq_len: int) -> torch.Tensor:
    """Character tokens (ASCII codes, vocabulary 128; ``\x01`` between texts) cut into ``[N, seq_len]`` blocks."""
    ids = [min(ord(c), 127) for c in "\x01".join(texts)]
    usable = len(ids) // seq_len * seq_len
    return torch.tensor(ids[:usable], dtype=torch.int64).view(-1, seq_len)


def load_task(model_name: str, seq_len: int, seed: int):
    """``(model, train_blocks [N, T], held_out_blocks [M, T])`` for ``"tiny"`` or ``"smollm2"``."""
    from lightning_bpfree.data import split_texts, stdlib_docstrings, token_blocks

    train_texts, held_out_texts = split_texts(stdlib_docstrings(), held_out_fraction=0.1, seed=seed)
    if model_name == "tiny":
        from lightning_bpfree.models import tiny_causal_lm

        model = tiny_causal_lm("llama", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, seed=seed)
        return model, char_blocks(train_texts, seq_len), char_blocks(held_out_texts, seq_len)
    if model_name == "smollm2":
        from lightning_bpfree.models import load_smollm2

        model, tokenizer = load_smollm2()
        return model, token_blocks(tokenizer, train_texts, seq_len), token_blocks(tokenizer, held_out_texts, seq_len)
    raise ValueError(f"model must be 'tiny' or 'smollm2', got {model_name!r}")


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Held-out ``(mean next-token cross-entropy in nats, next-token accuracy)`` over ``blocks``."""
    total_loss, total_correct, total_tokens = 0.0, 0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        # prompt tuning prepends its virtual tokens to the outputs: keep the last T positions
        logits = model(input_ids=ids).logits[:, -ids.shape[1] : -1].float()
        targets = ids[:, 1:]
        total_loss += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                        reduction="sum").item()  # fmt: skip
        total_correct += int((logits.argmax(-1) == targets).sum())
        total_tokens += targets.numel()
    return total_loss / total_tokens, total_correct / total_tokens


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def run_config(
    model: str = "tiny",
    method: str = "zo-sgd",
    scheme: str = "full",
    enhancement: str = "none",
    steps: int = 40,
    lr: float | None = None,
    eps: float = 1e-3,
    batch_size: int = 8,
    seq_len: int = 64,
    eval_blocks: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Train one configuration and measure it (runs inside a subprocess of :func:`main`)."""
    from lightning_bpfree.zo import FirstOrderPart, GradientSparsity, apply_scheme, find_blocks, make_optimizer
    from lightning_bpfree.zo.peft_schemes import output_head

    torch.manual_seed(seed)
    net, train_blocks, held_out = load_task(model, seq_len, seed)
    held_out = held_out[:eval_blocks]
    net = apply_scheme(net, scheme)
    net.eval()  # dropout off for every method, so that only the optimizer differs
    rates = LEARNING_RATES[model]
    lr = lr if lr is not None else rates["peft"] if scheme != "full" and method.startswith("zo") else rates.get(method, 0.0)
    initial_loss, initial_accuracy = evaluate(net, held_out, batch_size)
    forwards = 0
    order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed))

    def batch(step: int) -> torch.Tensor:
        index = order[(torch.arange(batch_size) + step * batch_size) % len(order)]
        return train_blocks[index]

    options: dict[str, Any] = {}
    if enhancement == "blocks":
        options["blocks"] = find_blocks(net, "layer")
    elif enhancement == "sparsity":
        options["sparsity"] = GradientSparsity(0.75, method="random", resample_every=10)
    elif enhancement == "hybrid":
        options["first_order"] = FirstOrderPart(output_head(net).parameters(), lr=rates["fo-adamw"])
    elif enhancement != "none":
        raise ValueError(f"enhancement must be one of {('none',) + tuple(ENHANCEMENT_ROWS)}, got {enhancement!r}")

    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = None
    if method in FIRST_ORDER:
        optimizer = (torch.optim.SGD(trainable, lr=lr) if method == "fo-sgd" else
                     torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0))  # fmt: skip
    elif method != "inference":
        optimizer = make_optimizer(method, net.parameters(), lr=lr, eps=eps, seed=seed, **options)

    times = []
    for step in range(steps):
        ids = batch(step)
        start = time.perf_counter()
        if method == "inference":
            with torch.no_grad():
                net(input_ids=ids, labels=ids)
            forwards += 1
        elif method in FIRST_ORDER:
            loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as in a training loop
            forwards += 1
        else:

            def closure(ids: torch.Tensor = ids) -> torch.Tensor:
                nonlocal forwards
                forwards += 1
                return net(input_ids=ids, labels=ids).loss

            optimizer.step(closure)
        times.append(time.perf_counter() - start)

    final_loss, final_accuracy = evaluate(net, held_out, batch_size)
    state_bytes = 0
    if optimizer is not None:
        state_bytes += _tensor_bytes(t for s in optimizer.state.values() for t in s.values())
        state_bytes += _tensor_bytes(getattr(optimizer, "_backup", {}).values())
        first_order = getattr(optimizer, "first_order", None)
        if first_order is not None:
            state_bytes += _tensor_bytes(t for s in first_order.optimizer.state.values() for t in s.values())
    state_bytes += _tensor_bytes(p.grad for p in net.parameters())
    if "sparsity" in options:
        state_bytes += _tensor_bytes(options["sparsity"].masks.values())
    steady = times[1:] or times
    return {
        "model": model, "method": method, "scheme": scheme, "enhancement": enhancement, "lr": lr, "steps": steps,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in net.parameters()),
        "initial_loss": initial_loss, "final_loss": final_loss,
        "initial_accuracy": initial_accuracy, "final_accuracy": final_accuracy,
        "seconds_per_step": statistics.median_high(steady),
        "forwards_per_step": forwards / max(steps, 1),
        "state_bytes": state_bytes,
        "skipped_steps": getattr(optimizer, "zo_state", {}).get("skipped_steps", 0),
    }  # fmt: skip


def configurations() -> list[dict[str, str]]:
    """The rows: every optimizer on full fine-tuning, ZO-SGD on each peft scheme, ZO-SGD with each enhancement."""
    rows = [{"method": m, "scheme": "full", "enhancement": "none"} for m in OPTIMIZER_ROWS]
    rows += [{"method": "zo-sgd", "scheme": s, "enhancement": "none"} for s in SCHEME_ROWS]
    rows += [{"method": "zo-sgd", "scheme": "full", "enhancement": e} for e in ENHANCEMENT_ROWS]
    return rows


def label(row: dict[str, Any]) -> str:
    name = row["method"]
    if row["scheme"] != "full":
        name += f" {row['scheme']}"
    if row["enhancement"] != "none":
        name += f" +{row['enhancement']}"
    return name


def plot(rows: list[dict[str, Any]], path) -> None:
    fig, (ax_rss, ax_state) = new_figure(ncols=2, width=6.5, height=4.5)
    for row in rows:
        change = row["final_loss"] - row["initial_loss"]
        color = "tab:red" if row["method"] in FIRST_ORDER else "tab:gray" if row["method"] == "inference" else "tab:blue"
        ax_rss.scatter(mib(row["peak_rss_bytes"]), change, color=color)
        ax_rss.annotate(label(row), (mib(row["peak_rss_bytes"]), change), fontsize=7, xytext=(3, 2),
                        textcoords="offset points")  # fmt: skip
    ax_rss.axhline(0.0, color="black", lw=0.5)
    ax_rss.set_xlabel("peak RSS of the process (MiB)")
    ax_rss.set_ylabel("held-out loss change (nats/token, lower is better)")
    ax_rss.set_title("quality against memory")
    full = [r for r in rows if r["scheme"] == "full" and r["enhancement"] == "none"]
    ax_state.barh([label(r) for r in full], [mib(r["state_bytes"]) for r in full], color="tab:blue")
    ax_state.set_xlabel("memory added to inference: state + grads + copies (MiB)")
    ax_state.set_title("full fine-tuning")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bpfree zo-bench", description=__doc__.splitlines()[0])
    add_output_args(parser, "zo-bench")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default=None,
                        help="default smollm2 (tiny with --quick)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="training steps per configuration")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks evaluated")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per configuration (default 1 for tiny, else BPFREE_THREADS or all cores)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these rows (labels as in the table, e.g. zo-sgd 'zo-sgd lora')")
    args = parser.parse_args(argv)
    model = args.model or ("tiny" if args.quick else "smollm2")
    steps = args.steps or (20 if args.quick else 40 if model == "smollm2" else 200)
    batch_size = args.batch_size or (8 if model == "tiny" else 4)
    seq_len = args.seq_len or 64
    if steps < 1 or batch_size < 1 or seq_len < 2:
        raise ValueError("--steps and --batch-size must be >= 1 and --seq-len >= 2")
    threads = args.threads or (1 if model == "tiny" else torch_threads())
    rows_spec = configurations()
    if args.only:
        unknown = sorted(set(args.only) - {label(r) for r in rows_spec})
        if unknown:
            raise ValueError(f"--only takes row labels among {[label(r) for r in rows_spec]}, got {unknown}")
        rows_spec = [r for r in rows_spec if label(r) in args.only]
    rows = []
    for spec in progress(rows_spec, desc="zo-bench", unit="config"):
        result = run_in_subprocess("lightning_bpfree.zo.bench:run_config", threads=threads, model=model, steps=steps,
                                   batch_size=batch_size, seq_len=seq_len, seed=args.seed,
                                   eval_blocks=args.eval_blocks, **spec)  # fmt: skip
        rows.append(result)
    table_rows = [
        {
            "method": label(r), "trainable": r["trainable_params"], "lr": r["lr"],
            "held-out loss": r["final_loss"], "Δ loss": r["final_loss"] - r["initial_loss"],
            "accuracy": r["final_accuracy"], "peak RSS MiB": mib(r["peak_rss_bytes"]),
            "added MiB": mib(r["state_bytes"]), "s/step": r["seconds_per_step"], "forwards/step": r["forwards_per_step"],
        }
        for r in rows
    ]  # fmt: skip
    header = (f"model={model} steps={steps} batch={batch_size}x{seq_len} tokens, {threads} thread(s); held-out loss before training "
              f"{rows[0]['initial_loss']:.4f} nats/token, accuracy {rows[0]['initial_accuracy']:.4f}")  # fmt: skip
    table = header + "\n\n" + format_table(table_rows)
    print(table)
    order = sorted((r for r in rows if r["scheme"] == "full" and r["enhancement"] == "none"),
                   key=lambda r: r["state_bytes"])  # fmt: skip
    print("\nmemory order (added MiB): " + " < ".join(f"{label(r)} {mib(r['state_bytes']):.1f}" for r in order))
    write_results(args.out, "zo-bench", {"model": model, "steps": steps, "rows": rows}, table)
    plot(rows, args.out / "zo-bench.png")
    nonfinite = [label(r) for r in rows if not math.isfinite(r["final_loss"])]
    if nonfinite:
        print(f"warning: non-finite final loss for {nonfinite}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
