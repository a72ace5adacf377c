"""Train a NoProp classifier on real Fashion-MNIST with a Lightning Trainer, no back-propagation between blocks.

    python examples/noprop_fashion_mnist.py --variant dt    # 3 epochs of 10,000 images: about 4 min on one CPU core
    python examples/noprop_fashion_mnist.py --quick         # 1 epoch of 1,000 images, 1,000 test: about 20 s

Needs Debian's ``dataset-fashion-mnist`` package (``lightning_bpfree.data.fashion_mnist`` says how to
install it when it is missing).
"""

from __future__ import annotations

import argparse

import lightning as L
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree.data import fashion_mnist
from lightning_bpfree.noprop import NoPropCT, NoPropDT, NoPropFM, class_prototypes


class LossHistory(L.Callback):
    """Records the logged training loss after every batch (DT: the mean denoising loss of the blocks)."""

    def __init__(self, key: str) -> None:
        self.key, self.losses = key, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics[self.key]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["dt", "ct", "fm"], default="dt")
    parser.add_argument("--embedding", choices=["one-hot", "learned", "prototype"], default="learned")
    parser.add_argument("--epochs", type=int, default=None, help="default 3, --quick 1")
    parser.add_argument("--train-limit", type=int, default=None, help="training images (default 10000, --quick 1000)")
    parser.add_argument("--test-limit", type=int, default=None, help="test images (default 10000, --quick 1000)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--no-inference-noise",
        action="store_true",
        help="DT only: drop the sqrt(c_t) eps term at inference (+4.3 points in docs/noprop.md's benchmark)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer images and epochs, same code path (CI)")
    args = parser.parse_args()
    epochs = args.epochs or (1 if args.quick else 3)
    train_limit = args.train_limit or (1_000 if args.quick else 10_000)
    test_limit = args.test_limit or (1_000 if args.quick else 10_000)

    L.seed_everything(0)
    train_images, train_labels = fashion_mnist("train", limit=train_limit)
    test_images, test_labels = fashion_mnist("test", limit=test_limit)
    options = dict(embedding=args.embedding, lr=args.lr)
    if args.embedding == "prototype":  # class-mean images; the noisy label is then fed to the convolutions
        options["prototypes"] = class_prototypes(train_images, train_labels, num_classes=10)
    if args.no_inference_noise:
        if args.variant != "dt":
            parser.error("--no-inference-noise applies to --variant dt only")
        options["inference_noise"] = False
    variant = {"dt": NoPropDT, "ct": NoPropCT, "fm": NoPropFM}[args.variant]
    model = variant(num_classes=10, image_shape=(1, 28, 28), **options)

    history = LossHistory("train_block_loss" if args.variant == "dt" else "train_loss")
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        callbacks=[history])  # fmt: skip
    trainer.fit(
        model,
        DataLoader(TensorDataset(train_images, train_labels), batch_size=128, shuffle=True),
        DataLoader(TensorDataset(test_images, test_labels), batch_size=1000),
    )
    accuracy = trainer.test(model, DataLoader(TensorDataset(test_images, test_labels), batch_size=1000))
    first, last = history.losses[:4], history.losses[-4:]  # means of the first and last four batches
    print(f"{history.key}: {sum(first) / len(first):.4f} -> {sum(last) / len(last):.4f} "
          f"over {len(history.losses)} batches")  # fmt: skip
    print(f"NoProp-{args.variant.upper()} ({args.embedding} embedding): test accuracy {accuracy[0]['test_acc']:.4f}")


if __name__ == "__main__":
    main()
