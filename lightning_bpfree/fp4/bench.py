"""``bpfree fp4-bench``: FP4 formats and NVFP4 recipe ablations on a small LLaMA-style LM, plus FP4 linear speed.

Part 1 trains the same randomly initialised LLaMA-style model (a transformers config, bytes as tokens)
on English text that ships with Python (standard-library docstrings) for a fixed number of steps under
fp32, bf16-mixed, the full NVFP4 recipe, each ablation (no RHT, no stochastic rounding, no 2D weights,
no high-precision layers), the late switch to high precision, MXFP4 and UE5M3, and reports each final
loss's gap to fp32 (the paper's ablation figure). Part 2 times forward+backward of an NVFP4 linear
against a plain fp32 linear and the quantizer's throughput. Every configuration runs in its own
subprocess, so peak memory is per configuration. Writes ``fp4-bench.{json,md,png}``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from lightning_bpfree import benchmarking
from lightning_bpfree.cli import command_name

NAME = command_name(__name__)

CONFIGS = (
    "fp32",
    "bf16",
    "nvfp4",
    "nvfp4_no_rht",
    "nvfp4_no_sr",
    "nvfp4_no_2d",
    "nvfp4_no_hp_layers",
    "nvfp4_switch",
    "mxfp4",
    "ue5m3",
)


def byte_blocks(seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard-library docstrings as UTF-8 bytes cut into ``[N, seq_len]`` int64 blocks: (train, held out)."""
    from lightning_bpfree.data import split_texts, stdlib_docstrings

    train_texts, val_texts = split_texts(stdlib_docstrings(), held_out_fraction=0.1, seed=seed)

    def blocks(texts: list[str]) -> torch.Tensor:
        data = torch.frombuffer(bytearray("\n\n".join(texts).encode("utf-8")), dtype=torch.uint8).long()
        usable = data.numel() // seq_len * seq_len
        return data[:usable].view(-1, seq_len)

    return blocks(train_texts), blocks(val_texts)


def make_task(hidden_size: int, num_layers: int, lr: float, max_steps: int, seed: int):
    """A LightningModule training a byte-level LLaMA-style LM (vocab 256) with AdamW and cosine decay."""
    import lightning.pytorch as pl

    from lightning_bpfree.models import tiny_causal_lm

    class ByteLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            heads = max(1, hidden_size // 16)
            self.model = tiny_causal_lm("llama", vocab_size=256, hidden_size=hidden_size, num_layers=num_layers,
                                        num_heads=heads, seed=seed)  # fmt: skip
            self.model.train()
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            (input_ids,) = batch
            loss = self.model(input_ids=input_ids, labels=input_ids).loss
            self.losses.append(loss.item())
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
            warmup = max(1, max_steps // 20)

            def schedule(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                progress_fraction = min(1.0, (step - warmup) / max(1, max_steps - warmup))
                return 0.1 + 0.45 * (1 + math.cos(math.pi * progress_fraction))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return ByteLM()


def plugin_for(config: str, max_steps: int, keep_last_n: int):
    """The Trainer arguments (``precision`` or ``plugins``) of one sweep configuration."""
    from lightning_bpfree.fp4.precision import FP4Precision, NVFP4Precision
    from lightning_bpfree.fp4.recipe import FP4Recipe

    keep = dict(high_precision_last_n=keep_last_n)
    plugins = {
        "nvfp4": lambda: NVFP4Precision(**keep),
        "nvfp4_no_rht": lambda: NVFP4Precision(FP4Recipe(rht=False), **keep),
        "nvfp4_no_sr": lambda: NVFP4Precision(FP4Recipe(stochastic_rounding=False), **keep),
        "nvfp4_no_2d": lambda: NVFP4Precision(FP4Recipe(two_d_weights=False), **keep),
        "nvfp4_no_hp_layers": lambda: NVFP4Precision(keep_high_precision=()),
        "nvfp4_switch": lambda: NVFP4Precision(switch_to_high_precision_at_step=int(0.8 * max_steps), **keep),
        "mxfp4": lambda: FP4Precision(FP4Recipe.mxfp4(), **keep),
        "ue5m3": lambda: FP4Precision(FP4Recipe.ue5m3(), **keep),
    }
    if config == "fp32":
        return {"precision": "32-true"}
    if config == "bf16":
        return {"precision": "bf16-mixed"}
    if config not in plugins:
        raise ValueError(f"config must be one of {CONFIGS}, got {config!r}")
    return {"plugins": [plugins[config]()]}


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-byte cross-entropy (nats) of ``model`` over ``blocks``."""
    model.eval()
    losses = [model(input_ids=chunk, labels=chunk).loss.item() * len(chunk) for chunk in blocks.split(batch_size)]
    model.train()
    return sum(losses) / len(blocks)


def train_config(
    config: str,
    steps: int,
    hidden_size: int,
    num_layers: int,
    seq_len: int,
    batch_size: int,
    lr: float,
    seed: int,
    keep_last_n: int,
    val_blocks: int,
) -> dict[str, Any]:
    """Train one configuration; returns its loss curve, final train loss, held-out loss and time."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    train, val = byte_blocks(seq_len, seed=0)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(train), batch_size=batch_size, shuffle=True, generator=generator, drop_last=True)
    task = make_task(hidden_size, num_layers, lr, steps, seed)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **plugin_for(config, steps, keep_last_n),
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(task, loader)
    seconds = time.perf_counter() - start
    plugin = trainer.precision_plugin
    report = getattr(plugin, "report", None)
    tail = max(1, steps // 10)
    with trainer.precision_plugin.forward_context():
        val_loss = evaluate(task.model, val[:val_blocks])
    return {
        "config": config,
        "losses": task.losses,
        "final_train_loss": sum(task.losses[-tail:]) / tail,
        "val_loss": val_loss,
        "seconds": seconds,
        "fp4_linear_fraction": report.fraction_converted() if report is not None else 0.0,
    }


def speed_config(kind: str, tokens: int, features: int, repeats: int) -> dict[str, Any]:
    """Median forward+backward seconds of a ``features x features`` linear on ``tokens`` rows.

    ``kind``: ``"fp32"`` (nn.Linear), ``"nvfp4"`` (FP4Linear, full recipe) or ``"quantize"`` (NVFP4
    fake-quantization throughput of the activation, elements per second).
    """
    from lightning_bpfree.fp4.linear import FP4Linear
    from lightning_bpfree.fp4.quantize import fake_quantize, quantize

    torch.manual_seed(0)
    x = torch.randn(tokens, features, requires_grad=True)
    if kind == "quantize":
        seconds = benchmarking.median_seconds(lambda: fake_quantize(x.detach()), repeats=repeats)
        packed = benchmarking.median_seconds(lambda: quantize(x.detach()), repeats=repeats)
        return {"kind": kind, "seconds": seconds, "elements_per_second": x.numel() / seconds,
                "packed_elements_per_second": x.numel() / packed}  # fmt: skip
    layer = torch.nn.Linear(features, features) if kind == "fp32" else FP4Linear(features, features)
    grad = torch.randn(tokens, features)

    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    return {"kind": kind, "seconds": benchmarking.median_seconds(step, repeats=repeats)}


def _plot(results: list[dict[str, Any]], path) -> None:
    fig, (curves, gaps) = benchmarking.new_figure(ncols=2, width=6.5)
    for result in results:
        losses = torch.tensor(result["losses"])
        window = max(1, len(losses) // 20)
        smooth = losses.unfold(0, window, 1).mean(1) if len(losses) >= window else losses
        style = "-" if result["config"] in ("fp32", "bf16", "nvfp4") else "--"
        curves.plot(range(window - 1, window - 1 + len(smooth)), smooth, style, label=result["config"], lw=1.2)
    curves.set(xlabel="optimizer step", ylabel="train loss (nats/byte)", title="Training loss (smoothed)")
    curves.legend(fontsize=7)
    names = [r["config"] for r in results]
    values = [r["val_gap_percent"] for r in results]
    colors = ["tab:gray" if n in ("fp32", "bf16") else "tab:green" if n == "nvfp4" else "tab:orange" for n in names]
    gaps.barh(names, values, color=colors)
    gaps.axvline(0, color="black", lw=0.8)
    gaps.invert_yaxis()
    gaps.set(xlabel="held-out loss gap to fp32 (%)", title="FP4 recipe ablations")
    benchmarking.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = benchmarking.bench_parser(NAME, __doc__)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=None,
        choices=CONFIGS,
        help="configurations to train (default: all; --quick: fp32, nvfp4, mxfp4)",
    )
    parser.add_argument("--steps", type=benchmarking.positive_int, default=None, help="optimizer steps per configuration")
    parser.add_argument("--skip-speed", action="store_true", help="only the training sweep")
    args = parser.parse_args(argv)
    threads = benchmarking.torch_threads(args.threads)

    if args.quick:
        model = dict(steps=20, hidden_size=32, num_layers=2, seq_len=32, batch_size=8, lr=3e-3, keep_last_n=0)
        speed = dict(tokens=512, features=1024, repeats=3)
        val_blocks, configs = 64, ["fp32", "nvfp4", "mxfp4"]
    else:
        model = dict(steps=150, hidden_size=64, num_layers=4, seq_len=64, batch_size=16, lr=3e-3, keep_last_n=1)
        speed = dict(tokens=2048, features=4096, repeats=3)
        val_blocks, configs = 512, list(CONFIGS)
    configs = args.configs or configs
    if args.steps is not None:
        model["steps"] = args.steps

    results = []
    for config in benchmarking.progress(configs, desc=NAME):
        results.append(benchmarking.run_in_subprocess(f"{__name__}:train_config", threads=threads, config=config, seed=args.seed,
                                         val_blocks=val_blocks, **model))  # fmt: skip
    reference = next((r for r in results if r["config"] == "fp32"), results[0])
    for result in results:
        result["val_gap_percent"] = 100 * (result["val_loss"] / reference["val_loss"] - 1)
        result["train_gap_percent"] = 100 * (result["final_train_loss"] / reference["final_train_loss"] - 1)
        result["peak_rss_mib"] = benchmarking.mib(result["peak_rss_bytes"])
    columns = ["config", "final_train_loss", "val_loss", "val_gap_percent", "train_gap_percent",
               "fp4_linear_fraction", "seconds", "peak_rss_mib"]  # fmt: skip
    report = f"Training sweep ({model['steps']} steps, reference {reference['config']}):\n{benchmarking.format_table(results, columns)}"

    speed_rows = []
    if not args.skip_speed:
        for kind in benchmarking.progress(("fp32", "nvfp4", "quantize"), desc="fp4 speed"):
            speed_rows.append(benchmarking.run_in_subprocess(f"{__name__}:speed_config", threads=threads, kind=kind, **speed))
        base = speed_rows[0]["seconds"]
        for row in speed_rows:
            row["ratio_to_fp32"] = row["seconds"] / base
            row["peak_rss_mib"] = benchmarking.mib(row["peak_rss_bytes"])
        speed_table = benchmarking.format_table(
            speed_rows, ["kind", "seconds", "ratio_to_fp32", "elements_per_second", "packed_elements_per_second"]
        )
        report += f"\n\nLinear {speed['features']}x{speed['features']}, {speed['tokens']} tokens, fwd+bwd:\n{speed_table}"

    figures = {"model": model, "speed_shape": speed, "sweep": results, "speed": speed_rows, "torch_threads": threads}
    benchmarking.finish(args.out, NAME, figures, report, lambda path: _plot(results, path))
    return 0
