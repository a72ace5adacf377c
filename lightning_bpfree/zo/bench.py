"""``bpfree zo-bench``: every ZO-Bench optimizer, scheme and enhancement, quality against memory.

Two parts, chosen with ``--part``. ``methods`` (the default): the task is next-token prediction on
English text (docstrings of the Python standard library), held-out loss (nats per token) and
next-token accuracy. Model: the real SmolLM2-135M-Instruct by default,
or a tiny randomly initialised LLaMA with character tokens (``--quick``, for CI). Each
configuration trains in its own subprocess, so its peak resident memory is its own; the table
also gives the memory a method adds to inference (optimizer state, gradients, kept copies,
counted from the tensors) and the forwards per step. Writes ``zo-bench.{json,md,png}``.

``memory`` (formerly ``bpfree zo-memory``): peak memory and time of a ZO step against inference and
first-order steps, on OPT-style decoders built from a config (cheap deterministic weights: memory and
time do not depend on the values). Every configuration runs ``--repeats`` times (default 3, 2 with
``--quick``), each run in its own process; the table gives the peak's min / median / max. The full
run: inference, ZO-SGD, ZO-Adam, FO-SGD and FO-AdamW at 98 M parameters, batch 8 x 128, inside a
Lightning Trainer (``Trainer.validate`` for inference, so that Lightning's own memory and time cancel
out); and inference and ZO-SGD at 639 M parameters, batch 1 x 64, in the Trainer and in a plain
PyTorch loop, where 5 % of the parameter bytes (122 MiB) is far above the spread of the peak. Peak
memory is the process's peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Then the time
of a ZO-SGD step against one no-grad forward at several tokens per step, in one process. Targets
(issue 2): the extra peak memory of a ZO-SGD step over inference is at most 5 % of the parameter
bytes, and a ZO-SGD step takes at most 2.4x one no-grad forward. Writes ``zo-bench-memory.{json,md,png}``.
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
    "640m": (2048, 12, 16, 8192, 16384),  # 639 M parameters, 2437 MiB in fp32
    "300m": (1536, 10, 12, 6144, 16384),  # 309 M, 1180 MiB: the size the memory claim's slow test affords
    "100m": (768, 12, 12, 3072, 16384),  # 98 M, 374 MiB
    "quick": (256, 4, 4, 1024, 8192),
}
MEMORY_MODES = ("inference", "zo-sgd", "zo-adam", "fo-sgd", "fo-adamw")
LOOPS = ("trainer", "raw")


@dataclass(frozen=True)
class MemoryBlock:
    """Configurations of the memory part that share a model: every ``mode`` x ``loop`` on ``size``,
    batch ``batch_size`` x ``seq_len`` tokens, ``steps`` timed steps after one warm-up (``--steps``
    overrides it). ``loop="trainer"``: inside a Lightning ``Trainer`` (``validate`` for inference,
    ``fit`` for the steps); ``"raw"``: the same steps in a plain PyTorch loop."""

    size: str
    modes: tuple[str, ...]
    loops: tuple[str, ...]
    batch_size: int
    seq_len: int
    steps: int = 3


# The full run: every mode at 100 M parameters and 8 x 128 tokens (activations matter, the time
# ratio is measured there), and the memory target at 640 M parameters and 1 x 64 tokens, where 5 % of
# the parameter bytes (122 MiB) is well above the run-to-run spread of the peak RSS.
MEMORY_PLANS = {
    "full": (
        MemoryBlock("100m", MEMORY_MODES, ("trainer",), 8, 128),
        MemoryBlock("640m", ("inference", "zo-sgd"), LOOPS, 1, 64, steps=1),
    ),
    "quick": (MemoryBlock("quick", MEMORY_MODES, ("trainer",), 8, 128),),
}
# Time ratio of a ZO-SGD step to one no-grad forward, against the tokens per step: (size, [(batch, seq_len)]).
TIME_PLANS = {"full": ("100m", ((1, 64), (8, 128), (8, 512))), "quick": ("quick", ((1, 64), (8, 256)))}


def opt_model(size: str, seed: int = 0) -> torch.nn.Module:
    """An OPT-style causal LM of ``size`` (a key of :data:`MODEL_SIZES`), fp32, with cheap deterministic weights.

    Built on the meta device and then filled, because the default random init of a 640 M-parameter
    model takes minutes on a CPU: every matrix is a tiling of one seeded block of 2^20 gaussians
    (std 0.02, rolled by the parameter's position), LayerNorm weights are 1 and biases 0. Memory
    and time do not depend on the values (there are no NaNs or denormals).
    """
    from transformers import OPTConfig, OPTForCausalLM

    hidden, layers, heads, ffn, vocab = MODEL_SIZES[size]
    config = OPTConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
        word_embed_proj_dim=hidden, max_position_embeddings=512, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    with torch.device("meta"):
        model = OPTForCausalLM(config)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives the tied head a tensor of its own
    block = torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed)) * 0.02
    with torch.no_grad():
        for position, (name, parameter) in enumerate(model.named_parameters()):
            if parameter.dim() < 2:
                parameter.fill_(1.0 if name.endswith("layer_norm.weight") else 0.0)
                continue
            flat, tile = parameter.view(-1), block.roll(position * 7919)
            for start in range(0, flat.numel(), tile.numel()):
                piece = flat[start : start + tile.numel()]
                piece.copy_(tile[: piece.numel()])
    return model


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


def _trainer_steps(model: torch.nn.Module, mode: str, batch: torch.Tensor, steps: int, device: str) -> list[float]:
    """Seconds of each of ``steps + 1`` steps of ``mode`` inside a Lightning Trainer (the first is the warm-up)."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_bpfree.zo.callback import ZerothOrder
    from lightning_bpfree.zo.module import CausalLMModule

    module = CausalLMModule(model, lr=1e-5)  # configure_optimizers: AdamW (the fo-adamw mode)
    if mode == "fo-sgd":
        module.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=1e-3)
    recorder = StepRecorder()
    callbacks: list = [recorder]
    if mode.startswith("zo-"):  # no copy of the weights for exact restores: MeZO's arithmetic restore
        callbacks.append(ZerothOrder(mode, lr=1e-6, eps=1e-3, exact_restore=False))
    trainer = pl.Trainer(
        max_steps=steps + 1, accelerator=device, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
    )  # fmt: skip
    loader = DataLoader(TensorDataset(batch.cpu().repeat(steps + 1, 1)), batch_size=batch.shape[0])
    if mode == "inference":  # no-grad forwards with the loss, through Trainer.validate
        trainer.validate(module, loader, verbose=False)
        return recorder.validation_seconds
    trainer.fit(module, loader)
    return recorder.seconds


def _raw_steps(model: torch.nn.Module, mode: str, batch: torch.Tensor, steps: int) -> list[float]:
    """Seconds of each of ``steps + 1`` steps of ``mode`` in a plain PyTorch loop (the first is the warm-up)."""
    from lightning_bpfree.zo import make_optimizer

    model.eval()  # as the callback's forwards (dropout off)
    optimizer: torch.optim.Optimizer | None = None
    if mode == "fo-sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    elif mode == "fo-adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    elif mode != "inference":
        optimizer = make_optimizer(mode, model.parameters(), lr=1e-6, eps=1e-3, exact_restore=False)

    def loss() -> torch.Tensor:
        return model(input_ids=batch, labels=batch).loss

    seconds = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        if optimizer is None:
            with torch.no_grad():
                loss()
        elif mode.startswith("fo-"):
            loss().backward()
            optimizer.step()
            optimizer.zero_grad()
        else:
            optimizer.step(loss)
        if batch.is_cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def measure_memory(
    mode: str, size: str, batch_size: int, seq_len: int, steps: int, device: str = "cpu", loop: str = "trainer"
) -> dict[str, Any]:
    """One configuration of the memory table; run it in its own process (its peak memory is the row's).

    Builds the model of ``size``, runs one warm-up step and ``steps`` timed steps of ``mode`` (a
    key of :data:`MEMORY_MODES`) on a batch ``[batch_size, seq_len]``, in a ``loop`` of
    :data:`LOOPS`. Returns ``seconds_per_step`` (median of the timed steps; the warm-up step's
    time when ``steps`` is 0) and ``parameter_bytes``.
    """
    if mode not in MEMORY_MODES or loop not in LOOPS or size not in MODEL_SIZES:
        raise ValueError(f"mode, loop and size must be in {MEMORY_MODES}, {LOOPS}, {tuple(MODEL_SIZES)}")
    torch.manual_seed(0)
    model = opt_model(size).to(device)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(4, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if loop == "raw":
        seconds = _raw_steps(model, mode, batch, steps)
    else:  # inside a Lightning Trainer, so that the harness's own memory cancels out between modes
        seconds = _trainer_steps(model, mode, batch, steps, device)
    return {"seconds_per_step": statistics.median(seconds[1:] or seconds), "parameter_bytes": parameter_bytes}


def measure_time_ratio(size: str, shapes: list[list[int]], repeats: int = 3, device: str = "cpu") -> dict[str, Any]:
    """Seconds of a ZO-SGD step against one no-grad forward for each batch shape ``(batch, seq_len)``.

    A plain loop in one process: for each shape, one warm-up of each, then ``repeats`` rounds of
    (forward, ZO-SGD step, one pass of the noise over the parameters), interleaved so that other
    load on the machine hits all three alike. Each row: the median seconds of each, ``x one forward``
    (the median over rounds of the round's step time over its forward time) and ``ratio spread``
    (the lowest and highest of those per-round ratios). A ZO-SGD step is two forwards and three passes
    of regenerated noise, so the ratio is about ``2 + 3 noise / forward``.
    """
    from lightning_bpfree.zo import ZOSGD

    model = opt_model(size).to(device).eval()
    optimizer = ZOSGD(model.parameters(), lr=1e-9, eps=1e-3, exact_restore=False)  # lr: the weights barely move
    generator = torch.Generator().manual_seed(0)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def noise_pass() -> None:  # +z then -z: two passes, timed together and halved below
        optimizer.perturb_(12345, +1.0)
        optimizer.perturb_(12345, -1.0)

    rows = []
    for batch_size, seq_len in shapes:
        batch = torch.randint(4, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(device)

        def forward(batch: torch.Tensor = batch) -> None:
            with torch.no_grad():
                model(input_ids=batch, labels=batch)

        def step(batch: torch.Tensor = batch) -> None:
            optimizer.step(lambda: model(input_ids=batch, labels=batch).loss)

        figures: dict[str, list[float]] = {"forward": [], "step": [], "noise": []}
        for round_number in range(repeats + 1):  # round 0 warms up
            times = {"forward": timed(forward), "step": timed(step), "noise": timed(noise_pass) / 2}
            if round_number:
                for name, value in times.items():
                    figures[name].append(value)
        forward_s, step_s, noise_s = (statistics.median(figures[name]) for name in ("forward", "step", "noise"))
        # each round's step over the forward just before it: the pairs closest in time, so the least moved
        # by load that comes and goes on the machine
        ratios = [s / f for s, f in zip(figures["step"], figures["forward"])]
        rows.append({"batch": f"{batch_size} x {seq_len}", "tokens": batch_size * seq_len, "forward s": forward_s,
                     "zo-sgd step s": step_s, "noise pass s": noise_s, "x one forward": statistics.median(ratios),
                     "ratio spread": [min(ratios), max(ratios)]})  # fmt: skip
    parameters = sum(p.numel() for p in model.parameters())
    return {"size": size, "parameters": parameters, "repeats": repeats, "rows": rows}


def measure_configurations(
    configurations: list[dict[str, Any]], repeats: int, threads: int, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Run every configuration (keyword arguments of :func:`measure_memory`) ``repeats`` times, each in
    its own process, and summarise each: peak memory min / median / max (bytes), the median seconds
    per step, the parameter bytes. The repeats are interleaved (all configurations once, then again),
    so that a slow drift of the machine touches every configuration alike."""
    memory_key = "cuda_max_allocated_bytes" if device == "cuda" else "peak_rss_bytes"
    runs: list[list[dict[str, Any]]] = [[] for _ in configurations]
    for repeat in range(repeats):
        for runs_of, config in zip(runs, configurations):
            print(f"measuring {config} (run {repeat + 1} of {repeats}) in a subprocess ...", flush=True)
            runs_of.append(benchmarking.run_in_subprocess(f"{__name__}:measure_memory", threads=threads,
                                                          device=device, **config))  # fmt: skip
    rows = []
    for config, runs_of in zip(configurations, runs):
        peaks = [run[memory_key] for run in runs_of]
        seconds = statistics.median(r["seconds_per_step"] for r in runs_of)
        rows.append({**config, "peaks": peaks, "peak_min": min(peaks), "peak_median": statistics.median(peaks),
                     "peak_max": max(peaks), "seconds_per_step": seconds,
                     "parameter_bytes": runs_of[0]["parameter_bytes"]})  # fmt: skip
    return rows


def compare_with_inference(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add to each row of :func:`measure_configurations` its extra peak memory over the inference row of
    the same size and loop, in % of the parameter bytes: ``extra_pct`` from the medians and
    ``extra_pct_range`` (lowest: its min minus inference's max; highest: its max minus inference's min),
    and ``x_memory`` / ``x_time`` against that row (medians)."""
    base = {(r["size"], r["loop"]): r for r in rows if r["mode"] == "inference"}
    for row in rows:
        ref = base[(row["size"], row["loop"])]
        scale = 100 / row["parameter_bytes"]
        row["extra_pct"] = (row["peak_median"] - ref["peak_median"]) * scale
        row["extra_pct_range"] = [(row["peak_min"] - ref["peak_max"]) * scale,
                                  (row["peak_max"] - ref["peak_min"]) * scale]  # fmt: skip
        row["x_memory"] = row["peak_median"] / ref["peak_median"]
        row["x_time"] = row["seconds_per_step"] / ref["seconds_per_step"]
    return rows


def plot_memory(rows: list[dict[str, Any]], title: str, path, timing: dict[str, Any] | None = None) -> None:
    """Peak memory and time per configuration; with ``timing`` (:func:`measure_time_ratio`'s result) a
    third panel: the ZO-SGD step over one forward against the tokens per step, with the 2.4x goal."""
    fig, axes = benchmarking.new_figure(ncols=2 if timing is None else 3, width=5)
    ax_mem, ax_time = axes[:2]
    colors = {"inference": "grey", "zo-sgd": "tab:green", "zo-adam": "tab:olive", "fo-sgd": "tab:orange",
              "fo-adamw": "tab:red"}  # fmt: skip
    names = [f"{r['mode']}\n{r['size']} {r['loop']}" for r in rows]
    medians = [benchmarking.mib(r["peak_median"]) for r in rows]
    spread = [[m - benchmarking.mib(r["peak_min"]) for m, r in zip(medians, rows)],
              [benchmarking.mib(r["peak_max"]) - m for m, r in zip(medians, rows)]]  # fmt: skip
    ax_mem.bar(names, medians, yerr=spread, color=[colors[r["mode"]] for r in rows])
    ax_mem.set_ylabel("peak memory (MiB; bar: median, whisker: min-max)")
    ax_time.bar(names, [r["x_time"] for r in rows], color=[colors[r["mode"]] for r in rows])
    ax_time.axhline(2.4, ls="--", color="k", lw=1)
    ax_time.set_ylabel("seconds per step / one no-grad forward")
    for axis in (ax_mem, ax_time):
        axis.tick_params(axis="x", labelsize=6, rotation=90)
    ax_mem.set_title(title)
    if timing is not None:
        ax_ratio = axes[2]
        tokens = [r["tokens"] for r in timing["rows"]]
        ratios = [r["x one forward"] for r in timing["rows"]]
        whiskers = [[m - r["ratio spread"][0] for m, r in zip(ratios, timing["rows"])],
                    [r["ratio spread"][1] - m for m, r in zip(ratios, timing["rows"])]]  # fmt: skip
        ax_ratio.errorbar(tokens, ratios, yerr=whiskers, marker="o", color="tab:green", capsize=3)
        ax_ratio.axhline(2.4, ls="--", color="k", lw=1, label="goal 2.4x")
        ax_ratio.axhline(2.0, ls=":", color="grey", lw=1, label="two forwards")
        ax_ratio.set_xscale("log")
        ax_ratio.set_xlabel("tokens per step (batch x sequence)")
        ax_ratio.set_ylabel("ZO-SGD step / forward (median, min-max)")
        ax_ratio.set_title(f"time ratio, {timing['parameters'] / 1e6:.0f} M parameters")
        ax_ratio.legend(fontsize=7)
    benchmarking.save_figure(fig, path)


def memory_part(args: argparse.Namespace) -> int:
    """The ``memory`` part: each configuration of :data:`MEMORY_PLANS` in its own subprocess,
    ``--repeats`` times, then the time ratio against the tokens per step (:data:`TIME_PLANS`)."""
    plan = "quick" if args.quick else "full"
    repeats = args.repeats or (2 if args.quick else 3)
    threads = benchmarking.torch_threads(args.threads)
    configurations = [
        {"mode": mode, "size": block.size, "loop": loop, "batch_size": args.batch_size or block.batch_size,
         "seq_len": args.seq_len or block.seq_len, "steps": args.steps or block.steps}
        for block in MEMORY_PLANS[plan] for loop in block.loops for mode in block.modes
    ]  # fmt: skip
    rows = compare_with_inference(measure_configurations(configurations, repeats, threads, args.device))
    time_size, shapes = TIME_PLANS[plan]
    print(f"measuring the time ratio on {time_size} in a subprocess ...", flush=True)
    timing = benchmarking.run_in_subprocess(f"{__name__}:measure_time_ratio", threads=threads, size=time_size,
                                            shapes=[list(s) for s in shapes], repeats=repeats,
                                            device=args.device)  # fmt: skip
    mib = benchmarking.mib
    table = [
        {"size": f"{r['size']} ({r['parameter_bytes'] / 4e6:.0f} M)", "batch": f"{r['batch_size']} x {r['seq_len']}",
         "loop": r["loop"], "mode": r["mode"],
         "peak MiB min / median / max": " / ".join(f"{mib(r[k]):.0f}" for k in ("peak_min", "peak_median", "peak_max")),
         "extra over inference (% of params)": r["extra_pct"],
         "extra range (%)": f"{r['extra_pct_range'][0]:.1f} .. {r['extra_pct_range'][1]:.1f}",
         "x inference memory": r["x_memory"], "s/step": r["seconds_per_step"], "x one forward (time)": r["x_time"]}
        for r in rows
    ]  # fmt: skip
    time_table = [{k: v for k, v in row.items() if k != "ratio spread"} |
                  {"ratio min .. max": f"{row['ratio spread'][0]:.2f} .. {row['ratio spread'][1]:.2f}"}
                  for row in timing["rows"]]  # fmt: skip
    # the verdicts read the largest model's ZO-SGD step in the Trainer and the time at the bench's batch
    zo = max((r for r in rows if r["mode"] == "zo-sgd" and r["loop"] == "trainer"), key=lambda r: r["parameter_bytes"])
    zo_time = next(r for r in rows if r["mode"] == "zo-sgd" and r["loop"] == "trainer")
    # The target is judged only where 5 % of the parameters is well above the spread of the runs (at
    # least 3x the larger spread of the two rows, and 3x 10 MiB, the least spread seen on CPU)
    inference = next(r for r in rows if r["mode"] == "inference" and (r["size"], r["loop"]) == (zo["size"], zo["loop"]))
    spread = max(r["peak_max"] - r["peak_min"] for r in (zo, inference))
    five_percent = 0.05 * zo["parameter_bytes"]
    if args.device == "cpu" and five_percent < 3 * max(spread, 10 * 2**20):
        memory_verdict = (f"not judged at this size (5% of the parameters is {benchmarking.mib(five_percent):.1f} "
                          f"MiB, the runs spread by {benchmarking.mib(spread):.1f} MiB; the full run measures it "
                          "at 639 M)")  # fmt: skip
    else:
        memory_verdict = ("met" if zo["extra_pct_range"][1] <= 5 else
                          "met by the median" if zo["extra_pct"] <= 5 else "NOT met")  # fmt: skip
    verdict = (
        f"ZO-SGD extra memory on {zo['size']}: {zo['extra_pct']:.1f}% of parameter bytes (median; range "
        f"{zo['extra_pct_range'][0]:.1f} .. {zo['extra_pct_range'][1]:.1f}%; target <= 5%): {memory_verdict}; "
        f"ZO-SGD step on {zo_time['size']}: {zo_time['x_time']:.2f}x one forward (target <= 2.4x): "
        f"{'met' if zo_time['x_time'] <= 2.4 else 'NOT met'}"
    )
    header = (f"OPT-style models (fp32, cheap deterministic weights), {repeats} runs of each configuration, each in "
              f"its own process; device {args.device}, {threads} threads; timed steps after 1 warm-up: "
              f"{', '.join(f'{b.size} {args.steps or b.steps}' for b in MEMORY_PLANS[plan])}")  # fmt: skip
    time_header = (f"ZO-SGD step against one no-grad forward on {time_size} ({timing['parameters'] / 1e6:.0f} M), "
                   f"raw loop, one process, medians of {repeats} interleaved rounds")  # fmt: skip
    report = "\n\n".join([header, benchmarking.format_table(table), verdict, time_header,
                          benchmarking.format_table(time_table)])  # fmt: skip
    figures = {"header": header, "repeats": repeats, "rows": rows, "verdict": verdict, "time_ratio": timing}
    benchmarking.finish(args.out, f"{NAME}-memory", figures, report, lambda path: plot_memory(rows, "OPT-style", path, timing))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = benchmarking.bench_parser(NAME, __doc__, threads_default="1 for the tiny model, all cores otherwise")
    parser.add_argument("--part", choices=PARTS, default="methods",
                        help="methods: optimizers, schemes and enhancements (default); memory: ZO step vs inference vs FO")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default=None,
                        help="methods part: default smollm2 (tiny with --quick)")  # fmt: skip
    positive_int = benchmarking.positive_int
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="training steps per configuration (methods) / "
                             "timed steps after 1 warm-up (memory: 3, 1 at 639 M)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="memory part: runs of each configuration, each in its own process "
                             "(default 3, 2 with --quick)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="default 8 (methods: 4 for smollm2; memory: 8, 1 at 639 M)")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="default 64 (methods) / 128, 64 at 639 M (memory)")
    parser.add_argument("--eval-blocks", type=positive_int, default=32, help="methods part: held-out blocks evaluated")
    parser.add_argument("--only", nargs="*", default=None, choices=[label(r) for r in configurations()], metavar="ROW",
                        help="methods part: run only these rows (labels as in the table, e.g. zo-sgd 'zo-sgd lora')")
    parser.add_argument("--device", type=benchmarking.torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="memory part: torch device (default cuda when available, else cpu)")  # fmt: skip
    args = parser.parse_args(argv)
    return memory_part(args) if args.part == "memory" else methods_part(args)


if __name__ == "__main__":
    raise SystemExit(main())
