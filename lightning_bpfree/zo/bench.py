"""``bpfree zo-bench``: every ZO-Bench optimizer, scheme and enhancement, quality against memory.

Two parts, chosen with ``--part``. ``methods`` (the default): the task is next-token prediction on
English text (docstrings of the Python standard library), held-out loss (nats per token) and
next-token accuracy. Model: the real SmolLM2-135M-Instruct by default,
or a tiny randomly initialised LLaMA with character tokens (``--quick``, for CI). Each
configuration trains in its own subprocess, so its peak resident memory is its own; the table
also gives the memory a method adds to inference (optimizer state, gradients, kept copies,
counted from the tensors) and the forwards per step. Writes ``zo-bench.{json,md,png}``.

``memory`` (formerly ``bpfree zo-memory``): peak memory and time of a ZO step against inference and
first-order steps. An OPT-style decoder of about 100 M parameters built from a config (random
weights: memory and time do not depend on the values), batch 8 x 128 tokens. Each configuration
runs in its own process inside a Lightning Trainer; peak memory is the process's peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA. Targets (issue 2): the extra peak memory of a ZO-SGD
step over inference is at most 5 % of the parameter bytes, and a ZO-SGD step takes at most 2.4x one
no-grad forward (``Trainer.validate`` on the same batch, so that Lightning's own memory and time
cancel out). Writes ``zo-bench-memory.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_bpfree import benchmarking
from lightning_bpfree.cli import command_name

NAME = command_name(__name__)
PARTS = ("methods", "memory")

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


@dataclass(frozen=True)
class RunSettings:
    """One row of the ``methods`` part: what trains, how long, on what.

    ``lr=None`` takes the row's rate from :data:`LEARNING_RATES`; ``batch_size`` x ``seq_len`` tokens
    per step; ``eval_blocks`` held-out blocks of ``seq_len`` tokens are evaluated before and after.
    """

    model: str = "tiny"
    method: str = "zo-sgd"
    scheme: str = "full"
    enhancement: str = "none"
    steps: int = 40
    lr: float | None = None
    eps: float = 1e-3
    batch_size: int = 8
    seq_len: int = 64
    eval_blocks: int = 32
    seed: int = 0


def run_config(**settings: Any) -> dict[str, Any]:
    """Train one configuration (keyword arguments: the fields of :class:`RunSettings`) and measure it.

    Runs inside a subprocess of :func:`main`, which passes the settings as JSON.
    """
    from lightning_bpfree.zo import FirstOrderPart, GradientSparsity, apply_scheme, find_blocks, make_optimizer
    from lightning_bpfree.zo.peft_schemes import output_head

    config = RunSettings(**settings)
    # short local names: the loop below reads them many times
    model, method, scheme, enhancement = config.model, config.method, config.scheme, config.enhancement
    steps, lr, eps, batch_size, seed = config.steps, config.lr, config.eps, config.batch_size, config.seed
    torch.manual_seed(seed)
    net, train_blocks, held_out = load_task(model, config.seq_len, seed)
    held_out = held_out[: config.eval_blocks]
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
    fig, (ax_rss, ax_state) = benchmarking.new_figure(ncols=2, width=6.5, height=4.5)
    for row in rows:
        change = row["final_loss"] - row["initial_loss"]
        color = "tab:red" if row["method"] in FIRST_ORDER else "tab:gray" if row["method"] == "inference" else "tab:blue"
        ax_rss.scatter(benchmarking.mib(row["peak_rss_bytes"]), change, color=color)
        ax_rss.annotate(label(row), (benchmarking.mib(row["peak_rss_bytes"]), change), fontsize=7, xytext=(3, 2),
                        textcoords="offset points")  # fmt: skip
    ax_rss.axhline(0.0, color="black", lw=0.5)
    ax_rss.set_xlabel("peak RSS of the process (MiB)")
    ax_rss.set_ylabel("held-out loss change (nats/token, lower is better)")
    ax_rss.set_title("quality against memory")
    full = [r for r in rows if r["scheme"] == "full" and r["enhancement"] == "none"]
    ax_state.barh([label(r) for r in full], [benchmarking.mib(r["state_bytes"]) for r in full], color="tab:blue")
    ax_state.set_xlabel("memory added to inference: state + grads + copies (MiB)")
    ax_state.set_title("full fine-tuning")
    benchmarking.save_figure(fig, path)


def methods_part(args: argparse.Namespace) -> int:
    """The ``methods`` part: every row of :func:`configurations`, each trained in its own subprocess."""
    model = args.model or ("tiny" if args.quick else "smollm2")
    steps = args.steps or (20 if args.quick else 40 if model == "smollm2" else 200)
    batch_size = args.batch_size or (8 if model == "tiny" else 4)
    seq_len = args.seq_len or 64
    if steps < 1 or batch_size < 1 or seq_len < 2:
        raise ValueError("--steps and --batch-size must be >= 1 and --seq-len >= 2")
    threads = benchmarking.torch_threads(args.threads, default=1 if model == "tiny" else None)
    rows_spec = configurations()
    if args.only:  # labels checked by the parser
        rows_spec = [r for r in rows_spec if label(r) in args.only]
    rows = []
    for spec in benchmarking.progress(rows_spec, desc=NAME, unit="config"):
        settings = RunSettings(model=model, steps=steps, batch_size=batch_size, seq_len=seq_len, seed=args.seed,
                               eval_blocks=args.eval_blocks, **spec)  # fmt: skip
        rows.append(benchmarking.run_in_subprocess(f"{__name__}:run_config", threads=threads, **asdict(settings)))
    table_rows = [
        {
            "method": label(r), "trainable": r["trainable_params"], "lr": r["lr"],
            "held-out loss": r["final_loss"], "Δ loss": r["final_loss"] - r["initial_loss"],
            "accuracy": r["final_accuracy"], "peak RSS MiB": benchmarking.mib(r["peak_rss_bytes"]),
            "added MiB": benchmarking.mib(r["state_bytes"]), "s/step": r["seconds_per_step"], "forwards/step": r["forwards_per_step"],
        }
        for r in rows
    ]  # fmt: skip
    header = (f"model={model} steps={steps} batch={batch_size}x{seq_len} tokens, {threads} thread(s); held-out loss before training "
              f"{rows[0]['initial_loss']:.4f} nats/token, accuracy {rows[0]['initial_accuracy']:.4f}")  # fmt: skip
    order = sorted((r for r in rows if r["scheme"] == "full" and r["enhancement"] == "none"),
                   key=lambda r: r["state_bytes"])  # fmt: skip
    report = "\n\n".join([
        header, benchmarking.format_table(table_rows),
        "memory order (added MiB): " + " < ".join(f"{label(r)} {benchmarking.mib(r['state_bytes']):.1f}" for r in order),
    ])  # fmt: skip
    benchmarking.finish(args.out, NAME, {"model": model, "steps": steps, "rows": rows}, report, lambda path: plot(rows, path))
    nonfinite = [label(r) for r in rows if not math.isfinite(r["final_loss"])]
    if nonfinite:
        print(f"warning: non-finite final loss for {nonfinite}")
    return 0


# ----------------------------------------------------------------------------------------------
# The memory part: ZO step against inference and first-order steps, on a model built from a config.

MODEL_SIZES = {  # OPT-style configs: (hidden, layers, heads, ffn, vocab)
    "100m": (768, 12, 12, 3072, 16384),
    "quick": (256, 4, 4, 1024, 8192),
}
MEMORY_MODES = ("inference", "zo-sgd", "fo-sgd", "fo-adamw")


def opt_model(size: str) -> torch.nn.Module:
    """A randomly initialised OPT-style causal LM of ``size`` (a key of :data:`MODEL_SIZES`)."""
    from transformers import OPTConfig, OPTForCausalLM

    hidden, layers, heads, ffn, vocab = MODEL_SIZES[size]
    config = OPTConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
        word_embed_proj_dim=hidden, max_position_embeddings=512, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return OPTForCausalLM(config)


class StepRecorder(pl.Callback):
    """Records the wall-clock seconds and the loss of every training step, and the seconds of every
    validation batch (``validation_seconds``). Used by this benchmark and by ``bpfree demo``."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.validation_seconds: list[float] = []
        self._start = 0.0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start = time.perf_counter()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.validation_seconds.append(time.perf_counter() - self._start)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        loss = trainer.callback_metrics.get("zo/loss", trainer.callback_metrics.get("train_loss"))
        self.losses.append(float(loss) if loss is not None else float("nan"))


def measure_memory(
    mode: str, size: str, batch_size: int, seq_len: int, steps: int, device: str = "cpu"
) -> dict[str, Any]:
    """One row of the memory table: builds the model, runs ``steps`` timed steps of ``mode`` after one
    warm-up; returns the median ``seconds_per_step`` and the ``parameter_bytes``."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_bpfree.zo.callback import ZerothOrder
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


def plot_memory(rows: list[dict[str, Any]], title: str, path) -> None:
    fig, (ax_mem, ax_time) = benchmarking.new_figure(ncols=2, width=5)
    names = [row["mode"] for row in rows]
    colors = ["grey", "tab:green", "tab:orange", "tab:red"]
    ax_mem.bar(names, [row["peak (MiB)"] for row in rows], color=colors)
    ax_mem.set_ylabel("peak memory (MiB)")
    ax_time.bar(names, [row["x one forward (time)"] for row in rows], color=colors)
    ax_time.axhline(2.4, ls="--", color="k", lw=1)
    ax_time.set_ylabel("seconds per step / one no-grad forward")
    ax_mem.set_title(title)
    benchmarking.save_figure(fig, path)


def memory_part(args: argparse.Namespace) -> int:
    """The ``memory`` part: one subprocess per mode of :data:`MEMORY_MODES`."""
    size = "quick" if args.quick else "100m"
    batch_size, seq_len, steps = args.batch_size or 8, args.seq_len or 128, args.steps or 3
    threads = benchmarking.torch_threads(args.threads)
    memory_key = "cuda_max_allocated_bytes" if args.device == "cuda" else "peak_rss_bytes"
    rows = []
    for mode in MEMORY_MODES:
        print(f"measuring {mode} in a subprocess ...", flush=True)
        result = benchmarking.run_in_subprocess(
            f"{__name__}:measure_memory", threads=threads, mode=mode, size=size, batch_size=batch_size,
            seq_len=seq_len, steps=steps, device=args.device,
        )  # fmt: skip
        rows.append({"mode": mode, "peak (MiB)": benchmarking.mib(result[memory_key]), "s/step": result["seconds_per_step"],
                     "parameter_bytes": result["parameter_bytes"]})  # fmt: skip
    parameter_mib = benchmarking.mib(rows[0]["parameter_bytes"])
    base = rows[0]
    for row in rows:
        row["extra over inference (% of params)"] = 100 * (row["peak (MiB)"] - base["peak (MiB)"]) / parameter_mib
        row["x inference memory"] = row["peak (MiB)"] / base["peak (MiB)"]
        row["x one forward (time)"] = row["s/step"] / base["s/step"]
    columns = ["mode", "peak (MiB)", "extra over inference (% of params)", "x inference memory", "s/step",
               "x one forward (time)"]  # fmt: skip
    zo = rows[1]
    verdict = (
        f"ZO-SGD extra memory {zo['extra over inference (% of params)']:.1f}% of parameter bytes (target <= 5%): "
        f"{'met' if zo['extra over inference (% of params)'] <= 5 else 'NOT met'}; "
        f"ZO-SGD step {zo['x one forward (time)']:.2f}x one forward (target <= 2.4x): "
        f"{'met' if zo['x one forward (time)'] <= 2.4 else 'NOT met'}"
    )
    header = (f"OPT-style model, {parameter_mib:.0f} MiB of fp32 parameters ({rows[0]['parameter_bytes'] / 4e6:.0f} M), "
              f"batch {batch_size} x {seq_len}, device {args.device}, {threads} threads")  # fmt: skip
    report = f"{header}\n\n{benchmarking.format_table(rows, columns)}\n\n{verdict}"
    figures = {"header": header, "rows": rows, "verdict": verdict}
    benchmarking.finish(args.out, f"{NAME}-memory", figures, report, lambda path: plot_memory(rows, header.split(",")[0], path))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = benchmarking.bench_parser(NAME, __doc__, threads_default="1 for the tiny model, all cores otherwise")
    parser.add_argument("--part", choices=PARTS, default="methods",
                        help="methods: optimizers, schemes and enhancements (default); memory: ZO step vs inference vs FO")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default=None,
                        help="methods part: default smollm2 (tiny with --quick)")  # fmt: skip
    positive_int = benchmarking.positive_int
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="training steps per configuration (methods) / timed steps after 1 warm-up (memory, default 3)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default 8 (4 for smollm2 in the methods part)")
    parser.add_argument("--seq-len", type=positive_int, default=None, help="default 64 (methods) / 128 (memory)")
    parser.add_argument("--eval-blocks", type=positive_int, default=32, help="methods part: held-out blocks evaluated")
    parser.add_argument("--only", nargs="*", default=None, choices=[label(r) for r in configurations()], metavar="ROW",
                        help="methods part: run only these rows (labels as in the table, e.g. zo-sgd 'zo-sgd lora')")
    parser.add_argument("--device", type=benchmarking.torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="memory part: torch device (default cuda when available, else cpu)")  # fmt: skip
    args = parser.parse_args(argv)
    return memory_part(args) if args.part == "memory" else methods_part(args)


if __name__ == "__main__":
    raise SystemExit(main())
