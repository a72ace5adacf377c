"""``bpfree noprop-bench``: NoProp-DT, -CT, -FM against backprop with the same backbone on Fashion-MNIST.

For each method, in its own subprocess: first the peak resident memory of three training steps on one
batch (above the interpreter's footprint after importing torch), then a Lightning fit on a training
subset with test accuracy after every epoch and seconds per training epoch (evaluation excluded). NoProp-DT is
evaluated twice after every epoch from the same weights: with the paper's inference noise and without it
(``inference_noise=False``). Prints a table and writes ``noprop-bench.json``, ``noprop-bench.md`` and ``noprop-bench.png`` (accuracy against epochs,
step memory) into ``--out``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from lightning_bpfree import benchmarking
from lightning_bpfree.cli import command_name

NAME = command_name(__name__)
METHODS = ("backprop", "noprop-dt", "noprop-ct", "noprop-fm")
IMAGE_SHAPE = (1, 28, 28)


def _check_methods(methods: list[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods must be among {METHODS}, got {unknown}")


def build_module(method: str, num_blocks: int, hidden: int, channels: list[int], lr: float):
    """The LightningModule of ``method`` (one of ``METHODS``) on 28x28 grey images, 10 classes."""
    from lightning_bpfree.noprop.module import BackpropBaseline, NoPropCT, NoPropDT, NoPropFM

    _check_methods([method])
    shared = dict(hidden=hidden, channels=tuple(channels), lr=lr)
    if method == "backprop":
        return BackpropBaseline(10, IMAGE_SHAPE, **shared)
    if method == "noprop-dt":
        return NoPropDT(10, IMAGE_SHAPE, num_blocks=num_blocks, **shared)
    return (NoPropCT if method == "noprop-ct" else NoPropFM)(10, IMAGE_SHAPE, **shared)


def train_config(
    method: str,
    epochs: int,
    train_limit: int,
    test_limit: int,
    batch_size: int,
    num_blocks: int,
    hidden: int,
    channels: list[int],
    lr: float,
    seed: int,
    inference_samples: tuple[int, ...] = (),
    evaluate_every_epoch: bool = True,
) -> dict[str, Any]:
    """Fit ``method`` on the first ``train_limit`` training images; test accuracy after each epoch
    (or, with ``evaluate_every_epoch=False``, after the last epoch only: the lists below then hold one entry).

    Returns ``accuracy`` (list, one per evaluated epoch, in [0, 1]), ``epoch_seconds`` (wall-clock, training only,
    no evaluation), ``epoch_cpu_seconds`` (the same span in this process's CPU time, which other jobs on the
    machine disturb far less than wall-clock time), ``parameters`` and ``method``; for NoProp-DT also
    ``accuracy_without_inference_noise``
    (the same weights, inference without the ``sqrt(c_t) eps`` term) and
    ``final_accuracy_by_inference_samples`` (``{K: accuracy}`` of the final weights with the paper's
    noisy inference, class probabilities averaged over ``K`` chains, for each ``K`` in ``inference_samples``).
    """
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_bpfree.data import fashion_mnist

    L.seed_everything(seed, verbose=False)
    train = TensorDataset(*fashion_mnist("train", limit=train_limit))
    test = TensorDataset(*fashion_mnist("test", limit=test_limit))
    model = build_module(method, num_blocks, hidden, channels, lr)

    class Record(L.Callback):
        def __init__(self) -> None:
            self.accuracy: list[float] = []
            self.accuracy_without_noise: list[float] = []
            self.epoch_seconds: list[float] = []
            self.epoch_cpu_seconds: list[float] = []

        def on_train_epoch_start(self, trainer, module) -> None:
            self._start, self._validation = time.perf_counter(), 0.0
            self._cpu_start, self._cpu_validation = time.process_time(), 0.0

        def on_validation_epoch_start(self, trainer, module) -> None:
            self._validation_start = time.perf_counter()
            self._cpu_validation_start = time.process_time()

        def on_validation_epoch_end(self, trainer, module) -> None:
            self.accuracy.append(float(trainer.callback_metrics["val_acc"]))
            if method == "noprop-dt":
                self.accuracy_without_noise.append(_test_accuracy(module, test, inference_noise=False))
            self._validation += time.perf_counter() - self._validation_start
            self._cpu_validation += time.process_time() - self._cpu_validation_start

        def on_train_epoch_end(self, trainer, module) -> None:
            # Lightning validates inside the training epoch; its time is not training time.
            self.epoch_seconds.append(time.perf_counter() - self._start - self._validation)
            self.epoch_cpu_seconds.append(time.process_time() - self._cpu_start - self._cpu_validation)

    record = Record()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[record],
        check_val_every_n_epoch=1 if evaluate_every_epoch else epochs,
    )  # fmt: skip
    trainer.fit(
        model,
        DataLoader(train, batch_size=batch_size, shuffle=True),
        DataLoader(test, batch_size=1000),
    )
    result = {
        "method": method,
        "accuracy": record.accuracy,
        "epoch_seconds": record.epoch_seconds,
        "epoch_cpu_seconds": record.epoch_cpu_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if method == "noprop-dt":
        result["accuracy_without_inference_noise"] = record.accuracy_without_noise
        # the paper's noisy update, class probabilities averaged over several chains: final weights only
        result["final_accuracy_by_inference_samples"] = {
            samples: _test_accuracy(model, test, inference_samples=samples) for samples in inference_samples
        }
    return result


@torch.no_grad()
def _test_accuracy(module, test, **net_settings: Any) -> float:
    """Test accuracy of a NoPropDT module with some inference settings of its net changed for the
    evaluation (e.g. ``inference_noise=False``); restores them and the training mode."""
    images, labels = test.tensors
    saved = {name: getattr(module.net, name) for name in net_settings}
    was_training = module.training
    module.eval()
    for name, value in net_settings.items():
        setattr(module.net, name, value)
    try:
        correct = sum(
            int((module(images[i : i + 1000]).argmax(-1) == labels[i : i + 1000]).sum())
            for i in range(0, len(labels), 1000)
        )
    finally:
        for name, value in saved.items():
            setattr(module.net, name, value)
        module.train(was_training)
    return correct / len(labels)


def measure(method: str, batch_size: int, num_blocks: int, hidden: int, channels: list[int], **fit_args: Any):
    """Peak memory of a training step of ``method``, then :func:`train_config`; for :func:`run_in_subprocess`.

    The step runs first, before Lightning is imported and data are loaded, so the peak RSS reached by
    then (``step_peak_rss_bytes``) minus the RSS on entry (``entry_rss_bytes``) is the memory of the
    model, its optimizer states and one step's activations.
    """
    entry = benchmarking.peak_rss_bytes()
    step_memory(method, batch_size, num_blocks, hidden, channels)
    step_peak = benchmarking.peak_rss_bytes()
    result = train_config(method, batch_size=batch_size, num_blocks=num_blocks, hidden=hidden, channels=channels,
                          **fit_args)  # fmt: skip
    return {**result, "entry_rss_bytes": entry, "step_peak_rss_bytes": step_peak}


def step_memory(
    method: str, batch_size: int, num_blocks: int, hidden: int, channels: list[int], steps: int = 3
) -> dict[str, int]:
    """Run ``steps`` training steps of ``method`` on one random batch (plain PyTorch, AdamW).

    Returns ``{"trainable": n, "changed": m}``: how many trainable parameter tensors there are and how
    many the steps moved, so a probe that silently trains nothing is caught.
    """
    from lightning_bpfree.noprop.algorithms import NoPropCTNet, NoPropDTNet, NoPropFMNet, noprop_dt_step
    from lightning_bpfree.noprop.backbone import BackpropClassifier

    _check_methods([method])
    torch.manual_seed(0)
    images, labels = torch.rand(batch_size, *IMAGE_SHAPE), torch.randint(0, 10, (batch_size,))
    shared = dict(hidden=hidden, channels=tuple(channels))
    if method == "noprop-dt":
        net = NoPropDTNet(10, IMAGE_SHAPE, num_blocks=num_blocks, **shared)
        block_optimizers = [torch.optim.AdamW(block.parameters()) for block in net.blocks]
        head_optimizer = torch.optim.AdamW(net.head_parameters())
        before = _trainable_copy(net)
        for _ in range(steps):
            noprop_dt_step(net, block_optimizers, head_optimizer, images, labels)
        return _moved(net, before)
    if method == "backprop":
        net = BackpropClassifier(10, IMAGE_SHAPE, **shared)

        def loss_fn():
            return torch.nn.functional.cross_entropy(net(images), labels)
    else:
        net = (NoPropCTNet if method == "noprop-ct" else NoPropFMNet)(10, IMAGE_SHAPE, **shared)

        def loss_fn():
            return net.loss(images, labels)[0]

    optimizer = torch.optim.AdamW(net.parameters())
    before = _trainable_copy(net)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
    return _moved(net, before)


def _trainable_copy(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in net.named_parameters() if p.requires_grad}


def _moved(net: torch.nn.Module, before: dict[str, torch.Tensor]) -> dict[str, int]:
    parameters = dict(net.named_parameters())
    changed = sum(not torch.equal(parameters[name], value) for name, value in before.items())
    return {"trainable": len(before), "changed": changed}


LAST_EPOCHS = 5
DT_WITHOUT_NOISE = "noprop-dt, no inference noise"


def accuracy_curves(results: dict[str, dict[str, Any]]) -> dict[str, tuple[str, list[float]]]:
    """Test accuracy per epoch by display name: each method, plus NoProp-DT without inference noise.

    Returns ``{name: (method, [accuracy per epoch, in [0, 1]])}``.
    """
    curves = {}
    for method, result in results.items():
        curves[method] = (method, result["accuracy"])
        if "accuracy_without_inference_noise" in result:
            curves[DT_WITHOUT_NOISE] = (method, result["accuracy_without_inference_noise"])
    return curves


def target_verdicts(curves: dict[str, tuple[str, list[float]]], last: int) -> list[str]:
    """The issue's target, NoProp-DT within 1 point of backprop, judged on the mean of the last epochs."""
    if "backprop" not in curves:
        return []
    mean = {name: 100 * sum(curve[-last:]) / last for name, (_, curve) in curves.items()}
    return [
        f"{name} within 1 point of backprop (mean of last {last} epochs): "
        f"{'yes' if mean[name] >= mean['backprop'] - 1 - 1e-9 else 'no'} ({mean[name]:.2f} vs {mean['backprop']:.2f})"
        for name in ("noprop-dt", DT_WITHOUT_NOISE)
        if name in mean
    ]


def _plot(results: dict[str, dict[str, Any]], path) -> None:
    fig, (accuracy_axis, memory_axis) = benchmarking.new_figure(ncols=2, width=5.5, height=3.8)
    for name, (_, curve) in accuracy_curves(results).items():
        epochs = range(1, len(curve) + 1)
        accuracy_axis.plot(epochs, [100 * a for a in curve], marker="o", markersize=3, label=name)
    accuracy_axis.set_xlabel("epoch")
    accuracy_axis.xaxis.get_major_locator().set_params(integer=True)
    accuracy_axis.set_ylabel("test accuracy (%)")
    accuracy_axis.set_title("Fashion-MNIST")
    accuracy_axis.grid(alpha=0.3)
    accuracy_axis.legend()
    names = list(results)
    memory_axis.bar(names, [results[m]["step_memory_mib"] for m in names], color="tab:gray")
    memory_axis.set_ylabel("MiB above imports")
    memory_axis.set_title("peak RSS of a training step")
    memory_axis.tick_params(axis="x", rotation=20)
    benchmarking.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = benchmarking.bench_parser(NAME, __doc__)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="default: all")
    parser.add_argument("--epochs", type=benchmarking.positive_int, default=None, help="training epochs (default 20, quick 2)")
    parser.add_argument("--train-limit", type=benchmarking.positive_int, default=None, help="training images (default 6000, quick 1000)")
    parser.add_argument("--test-limit", type=benchmarking.positive_int, default=None, help="test images (default all 10000, quick 500)")
    parser.add_argument("--batch-size", type=benchmarking.positive_int, default=128, help="training batch size")
    parser.add_argument("--num-blocks", type=benchmarking.positive_int, default=10, help="NoProp-DT blocks T")
    parser.add_argument("--hidden", type=benchmarking.positive_int, default=128, help="width of every hidden layer")
    parser.add_argument("--channels", type=benchmarking.positive_int, nargs="+", default=[16, 32], help="conv widths of the image encoder")
    parser.add_argument("--lr", type=benchmarking.positive_float, default=3e-3, help="AdamW lr of every method")
    parser.add_argument(
        "--dt-inference-samples", type=benchmarking.positive_int, nargs="+", default=None,
        help="after training, DT's paper inference averaged over K chains, for each K (default 1 2 4 8, quick 2)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    epochs = args.epochs or (2 if args.quick else 20)
    train_limit = args.train_limit or (1000 if args.quick else 6000)
    test_limit = args.test_limit or (500 if args.quick else 10_000)
    samples = args.dt_inference_samples or ([2] if args.quick else [1, 2, 4, 8])
    model_args = dict(num_blocks=args.num_blocks, hidden=args.hidden, channels=args.channels)
    threads = benchmarking.torch_threads(args.threads)

    results: dict[str, dict[str, Any]] = {}
    for method in benchmarking.progress(args.methods, desc=NAME):
        result = benchmarking.run_in_subprocess(
            f"{__name__}:measure", threads=threads, method=method, epochs=epochs, train_limit=train_limit,
            test_limit=test_limit, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            inference_samples=samples, **model_args,
        )  # fmt: skip
        result["step_memory_mib"] = benchmarking.mib(result["step_peak_rss_bytes"] - result["entry_rss_bytes"])
        results[method] = result

    curves = accuracy_curves(results)
    last = min(LAST_EPOCHS, epochs)
    rows = [
        {
            "method": name,
            f"test acc, mean of last {last} epochs (%)": 100 * sum(curve[-last:]) / last,
            "final acc (%)": 100 * curve[-1],
            "best acc (%)": 100 * max(curve),
            "s / epoch": statistics.median_high(results[method]["epoch_seconds"]),
            "step memory (MiB)": results[method]["step_memory_mib"],
            "parameters": results[method]["parameters"],
        }
        for name, (method, curve) in curves.items()
    ]
    verdicts = target_verdicts(curves, last)
    report = [
        f"Fashion-MNIST: {train_limit} training images, {test_limit} test images, {epochs} epochs, "
        f"batch {args.batch_size}, {threads} thread(s) per method",
        benchmarking.format_table(rows),
        "\n".join(verdicts),
    ]
    if "noprop-dt" in results:
        averaged = results["noprop-dt"]["final_accuracy_by_inference_samples"]
        report.append(
            "NoProp-DT after the last epoch, paper inference, class probabilities averaged over K chains:\n"
            + benchmarking.format_table([{"chains averaged": int(k), "noprop-dt final test acc (%)": 100 * a}
                            for k, a in averaged.items()])
        )  # fmt: skip
    config = dict(vars(args), epochs=epochs, train_limit=train_limit, test_limit=test_limit, threads=threads,
                  out=str(args.out))  # fmt: skip
    figures = {"config": config, "results": results, "table": rows, "target": verdicts}
    benchmarking.finish(args.out, NAME, figures, "\n\n".join(report), lambda path: _plot(results, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
