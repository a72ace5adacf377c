"""``bpfree fp4-bench``: FP4 formats and NVFP4 recipe ablations on a small LLaMA-style LM, plus FP4 linear speed.

Part 1 trains the same randomly initialised LLaMA-style model (a transformers config, bytes as tokens)
on English text that ships with Python (standard-library docstrings) for a fixed number of steps under
fp32, bf16-mixed, the full NVFP4 recipe, each ablation (no RHT, no stochastic rounding, no 2D weights,
no high-precision layers), the late switch to high precision, MXFP4 and UE5M3, and reports each final
loss's gap to fp32 (the paper's ablation figure). Part 2 times forward+backward of an NVFP4 linear
against a plain fp32 linear and the quantizer's throughput, timed in turns in one subprocess. Every
training configuration runs in its own subprocess, so peak memory is per configuration. Writes
``fp4-bench.{json,md,png}``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from lightning_bpfree import benchmarking
from lightning_bpfree.cli import command_name
from lightning_bpfree.fp4.constants import NVFP4_BLOCK_SIZE
from lightning_bpfree.fp4.formats import UE5M3, FP4Format

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
    "ue5m3_no_tensor_scale",
)
"""Every configuration ``--configs`` accepts; the full sweep runs all but ``ue5m3_no_tensor_scale``."""

DEFAULT_CONFIGS = CONFIGS[:-1]
UE5M3_NO_TENSOR_SCALE = FP4Format("ue5m3_no_tensor_scale", NVFP4_BLOCK_SIZE, UE5M3, "chain", tensor_scale_target=None)
"""E2M1 with UE5M3 block scales and no FP32 tensor scale (``S_enc = 1``): the format of the first sweep's ``ue5m3``."""


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
        # the first sweep's UE5M3, before the tensor scale became the default: E2M1 with UE5M3 block
        # scales and S_enc = 1, so tiny gradient blocks fall below the smallest scale and vanish
        "ue5m3_no_tensor_scale": lambda: FP4Precision(FP4Recipe.ue5m3(fmt=UE5M3_NO_TENSOR_SCALE), **keep),
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


def interleaved_speed(tokens: int, features: int, repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Seconds of forward+backward of a ``features x features`` linear on ``tokens`` rows, fp32 (``nn.Linear``)
    against ``FP4Linear`` (full NVFP4 recipe), and of NVFP4 ``fake_quantize`` / ``quantize`` of the
    ``[tokens, features]`` activation, all in this process.

    The four are timed in turns, one call each per round, and each keeps its fastest round: load from other
    processes on a shared machine then slows all four alike, and the minimum is the least disturbed call,
    so the ratios hold on a busy machine where separate runs would not.

    Returns:
        ``fp32_seconds``, ``nvfp4_seconds``, ``fake_quantize_seconds``, ``quantize_seconds`` (minima),
        ``ratio`` (``nvfp4 / fp32``), ``elements_per_second`` and ``packed_elements_per_second`` (elements of
        the activation per second), and ``rounds`` (every round's seconds, for the spread).
    """
    from lightning_bpfree.fp4.linear import FP4Linear
    from lightning_bpfree.fp4.quantize import fake_quantize, quantize

    torch.manual_seed(0)
    x = torch.randn(tokens, features, requires_grad=True)
    grad = torch.randn(tokens, features)
    layers = {"fp32": torch.nn.Linear(features, features), "nvfp4": FP4Linear(features, features)}

    def step(layer: torch.nn.Module) -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    calls = {
        "fp32": lambda: step(layers["fp32"]),
        "nvfp4": lambda: step(layers["nvfp4"]),
        "fake_quantize": lambda: fake_quantize(x.detach()),
        "quantize": lambda: quantize(x.detach()),
    }
    rounds: dict[str, list[float]] = {name: [] for name in calls}
    for index in range(warmup + repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if index >= warmup:
                rounds[name].append(time.perf_counter() - start)
    best = {name: min(times) for name, times in rounds.items()}
    return {
        "tokens": tokens, "features": features, "repeats": repeats,
        **{f"{name}_seconds": seconds for name, seconds in best.items()},
        "ratio": best["nvfp4"] / best["fp32"],
        "elements_per_second": x.numel() / best["fake_quantize"],
        "packed_elements_per_second": x.numel() / best["quantize"],
        "rounds": rounds,
    }  # fmt: skip


# -- the same bits on CPU and CUDA -------------------------------------------------------------------------
# One implementation of the cross-device comparison, used by benchmarks/gpu_check.py on a lent GPU and by
# the tests marked ``gpu`` (tests/test_claims_fp4.py) wherever a CUDA device exists.

CROSS_DEVICE_CASES: tuple[tuple[str, bool, torch.dtype], ...] = tuple(
    (fmt, block_2d, dtype)
    for fmt in ("nvfp4", "mxfp4", "ue5m3", "ue4m3")
    for block_2d in (False, True)
    for dtype in (torch.float32, torch.bfloat16)
)
"""The 16 (format, 2D blocks, input dtype) combinations whose CPU and CUDA bits must agree."""

LINEAR_CROSS_DEVICE_TOLERANCE = 1.3e-6
"""Largest ``|CPU - CUDA|`` of an ``FP4Linear`` result, per unit of the result's largest magnitude (at least 1).

1.3e-6 is the forward difference measured on an H200 (outputs up to 2.3, as in ``compare_fp4_linear``), so
the forward check has a 2.4x margin; scaling by the magnitude allows the gradients (entries up to ~40) the
same relative float32 accumulation-order error. One operand element quantized differently moves a result
by a grid step times the other operand, ~1e-2 or more: far outside.
"""


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` have the same shape, dtype and bits (``-0.0 != 0.0``; NaN payloads count)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.dtype.is_floating_point:
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(as_int), b.view(as_int)
    return torch.equal(a, b)


def wide_range_tensor(
    rows: int = 256, cols: int = 1024, dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.Tensor:
    """``[rows, cols]`` normal values times a column factor from 1e-4 to 1e4 (8 decades across the blocks, so
    block scales span the scale formats' ranges, subnormal ones included), with row 0's first 16 elements 0
    (a zero block); in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=generator) * torch.logspace(-4, 4, cols)
    x[0, :16] = 0
    return x.to(dtype)


def compare_quantization(
    device: str | torch.device, fmt: str, block_2d: bool, dtype: torch.dtype, seed: int = 0
) -> dict[str, Any]:
    """Quantize ``wide_range_tensor(dtype=dtype, seed=seed)`` on CPU and on ``device`` (nearest rounding).

    Returns:
        the case and whether these agree bit for bit: ``fake_quantize`` (``fake_quantize_equal``), the packed
        E2M1 codes (``codes_equal``), block-scale codes (``scales_equal``), tensor scale (``tensor_scale_equal``)
        and ``dequantize`` of the packed form (``dequantize_equal``); ``bitwise_equal`` is all of them.
    """
    from lightning_bpfree.fp4.quantize import dequantize, fake_quantize, quantize

    x = wide_range_tensor(dtype=dtype, seed=seed)
    on_device = x.to(device)
    packed_cpu = quantize(x, fmt, block_2d=block_2d)
    packed_device = quantize(on_device, fmt, block_2d=block_2d)
    row: dict[str, Any] = {
        "fmt": fmt, "block_2d": block_2d, "dtype": str(dtype).removeprefix("torch."),
        "fake_quantize_equal": bitwise_equal(fake_quantize(x, fmt, block_2d=block_2d),
                                             fake_quantize(on_device, fmt, block_2d=block_2d)),
        "codes_equal": bitwise_equal(packed_cpu.codes, packed_device.codes),
        "scales_equal": bitwise_equal(packed_cpu.scale_bits, packed_device.scale_bits),
        "tensor_scale_equal": bitwise_equal(packed_cpu.tensor_scale, packed_device.tensor_scale),
        "dequantize_equal": bitwise_equal(dequantize(packed_cpu), dequantize(packed_device)),
    }  # fmt: skip
    row["bitwise_equal"] = all(value for key, value in row.items() if key.endswith("_equal"))
    return row


def compare_fp4_linear(device: str | torch.device, seed: int = 0) -> dict[str, Any]:
    """Forward and backward of one ``FP4Linear(512, 256)`` on 64 tokens, on CPU and on ``device``.

    The recipe is NVFP4 with nearest rounding everywhere and no Hadamard transform, so every quantized
    operand is a deterministic elementwise function of the data and must be bit-identical on both devices:
    stochastic rounding draws from each device's own generator (different streams), and the transform is a
    16-wide matmul whose float32 sums may be ordered differently. What may differ is the float32 GEMMs'
    accumulation order, so each result is compared against ``LINEAR_CROSS_DEVICE_TOLERANCE`` times its
    largest magnitude. TF32 is switched off for the duration (``float32_matmul_precision("highest")``).

    Returns:
        for ``output``, ``grad_input``, ``grad_weight`` and ``grad_bias``: ``<name>_max_abs_diff``,
        ``<name>_max_abs`` (of the CPU result) and ``<name>_within_tolerance``; ``within_tolerance`` (all four).
    """
    from lightning_bpfree.fp4.linear import FP4Linear
    from lightning_bpfree.fp4.recipe import FP4Recipe

    recipe = FP4Recipe(stochastic_rounding=False, rht=False)
    # another seed than the weights': one Mersenne Twister stream for both would correlate them
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(64, 512, generator=generator)
    grad_output = torch.randn(64, 256, generator=generator)
    torch.manual_seed(seed)
    reference = FP4Linear(512, 256, recipe=recipe)
    results = {}
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for where in ("cpu", device):
            layer = FP4Linear(512, 256, recipe=recipe).to(where)
            layer.load_state_dict(reference.state_dict())
            x = inputs.to(where).requires_grad_(True)
            output = layer(x)
            output.backward(grad_output.to(where))
            results[str(where)] = {"output": output.detach().cpu(), "grad_input": x.grad.cpu(),
                                   "grad_weight": layer.weight.grad.cpu(), "grad_bias": layer.bias.grad.cpu()}  # fmt: skip
    finally:
        torch.set_float32_matmul_precision(precision)
    cpu, other = results["cpu"], results[str(device)]
    row: dict[str, Any] = {"device": str(device)}
    for name in cpu:
        largest = cpu[name].abs().max().item()
        difference = (cpu[name] - other[name]).abs().max().item()
        row[f"{name}_max_abs_diff"] = difference
        row[f"{name}_max_abs"] = largest
        row[f"{name}_within_tolerance"] = difference <= LINEAR_CROSS_DEVICE_TOLERANCE * max(1.0, largest)
    row["within_tolerance"] = all(row[f"{name}_within_tolerance"] for name in cpu)
    return row


def stochastic_rounding_bias(device: str | torch.device, rows: int = 4096, seed: int = 0) -> dict[str, Any]:
    """Mean error of NVFP4 stochastic rounding of 0.37 on ``device``, against its exact expectation.

    Every 16-element block of a ``[rows, 1024]`` tensor holds one 6.0 (which pins the block scale, so 0.37
    lies between the grid points 0 and 0.5) and 15 copies of 0.37. The 8-bit rule rounds up when
    ``0.37 + r / 256 * 0.5 >= 0.5`` for the drawn ``r`` in 0..255, so the exact mean is
    ``0.5 * #{r: ...} / 256`` (0.3691, not 0.37: unbiased only up to 1/256 of a step).

    Returns:
        ``mean`` of the rounded 0.37s, ``expected`` (the exact mean above, in float64), ``mean_error``
        (``mean - 0.37``, the figure docs/gpu.md quotes), ``standard_error`` (of ``mean``, from the two-point
        distribution), ``z`` (``(mean - expected) / standard_error``) and ``count``.
    """
    from lightning_bpfree.fp4.quantize import fake_quantize

    value = 0.37
    x = torch.full((rows, 1024), value, device=device)
    x[:, ::16] = 6.0
    rounded = fake_quantize(x, "nvfp4", rounding="stochastic",
                            generator=torch.Generator(device=device).manual_seed(seed))  # fmt: skip
    keep = torch.ones(1024, dtype=torch.bool, device=device)
    keep[::16] = False
    samples = rounded[:, keep].double()
    # the two dequantized neighbours of 0.37 (0 and 0.5 up to the scale chain's float32 rounding)
    low, high = fake_quantize(torch.tensor([[6.0] + [0.0] + [0.5] * 14]), "nvfp4")[0, 1:3].double().tolist()
    up = sum(value + r / 256 * 0.5 >= 0.5 for r in range(256)) / 256
    expected = low + up * (high - low)
    standard_error = (high - low) * (up * (1 - up) / samples.numel()) ** 0.5
    mean = samples.mean().item()
    return {"device": str(device), "mean": mean, "expected": expected, "mean_error": mean - value,
            "standard_error": standard_error, "z": (mean - expected) / standard_error, "count": samples.numel()}  # fmt: skip


def cross_device_check(device: str | torch.device) -> dict[str, Any]:
    """Every cross-device comparison: the 16 ``CROSS_DEVICE_CASES``, ``FP4Linear`` and stochastic rounding.

    Returns:
        ``cases`` (one ``compare_quantization`` row each), ``all_bitwise_equal``, ``fp4_linear``
        (``compare_fp4_linear``) and ``stochastic_rounding`` (``stochastic_rounding_bias``).
    """
    cases = [compare_quantization(device, fmt, block_2d, dtype, seed=index)
             for index, (fmt, block_2d, dtype) in enumerate(CROSS_DEVICE_CASES)]  # fmt: skip
    return {"device": str(device), "cases": cases, "all_bitwise_equal": all(row["bitwise_equal"] for row in cases),
            "fp4_linear": compare_fp4_linear(device), "stochastic_rounding": stochastic_rounding_bias(device)}  # fmt: skip


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
        val_blocks, configs = 512, list(DEFAULT_CONFIGS)
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
        # one subprocess timing all four in turns (interleaved_speed), so load on the machine cancels in the ratios
        timing = benchmarking.run_in_subprocess(f"{__name__}:interleaved_speed", threads=threads, **speed)
        fp32 = timing["fp32_seconds"]
        speed_rows = [
            {"kind": "fp32", "seconds": fp32, "ratio_to_fp32": 1.0},
            {"kind": "nvfp4", "seconds": timing["nvfp4_seconds"], "ratio_to_fp32": timing["ratio"]},
            {"kind": "quantize", "seconds": timing["fake_quantize_seconds"],
             "ratio_to_fp32": timing["fake_quantize_seconds"] / fp32,
             "elements_per_second": timing["elements_per_second"],
             "packed_elements_per_second": timing["packed_elements_per_second"]},
        ]  # fmt: skip
        speed_table = benchmarking.format_table(
            speed_rows, ["kind", "seconds", "ratio_to_fp32", "elements_per_second", "packed_elements_per_second"]
        )
        report += (f"\n\nLinear {speed['features']}x{speed['features']}, {speed['tokens']} tokens, fwd+bwd "
                   f"(fastest of {speed['repeats']} rounds in turns):\n{speed_table}")  # fmt: skip
        speed["rounds"] = timing["rounds"]

    figures = {"model": model, "speed_shape": speed, "sweep": results, "speed": speed_rows, "torch_threads": threads}
    benchmarking.finish(args.out, NAME, figures, report, lambda path: _plot(results, path))
    return 0
