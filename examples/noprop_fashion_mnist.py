"""Train a NoProp classifier on real Fashion-MNIST with a Lightning Trainer, no back-propagation between blocks.

    python examples/noprop_fashion_mnist.py --variant dt --epochs 3 --train-limit 10000

Needs Debian's ``dataset-fashion-mnist`` package (``lightning_bpfree.data.fashion_mnist`` says how to
install it when it is missing).
"""

from __future__ import annotations

import argparse

import lightning as L
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree.data import fashion_mnist
from lightning_bpfree.noprop import NoPropCT, NoPropDT, NoPropFM, class_prototypes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["dt", "ct", "fm"], default="dt")
    parser.add_argument("--embedding", choices=["one-hot", "learned", "prototype"], default="learned")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=10_000)
    parser.add_argument("--test-limit", type=int, default=10_000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--no-inference-noise",
        action="store_true",
        help="DT only: drop the sqrt(c_t) eps term at inference (+4.3 points in docs/noprop.md's benchmark)",
    )
    args = parser.parse_args()

    L.seed_everything(0)
    train_images, train_labels = fashion_mnist("train", limit=args.train_limit)
    test_images, test_labels = fashion_mnist("test", limit=args.test_limit)
    options = dict(embedding=args.embedding, lr=args.lr)
    if args.embedding == "prototype":  # class-mean images; the noisy label is then fed to the convolutions
        options["prototypes"] = class_prototypes(train_images, train_labels, num_classes=10)
    if args.no_inference_noise:
        if args.variant != "dt":
            parser.error("--no-inference-noise applies to --variant dt only")
        options["inference_noise"] = False
    variant = {"dt": NoPropDT, "ct": NoPropCT, "fm": NoPropFM}[args.variant]
    model = variant(num_classes=10, image_shape=(1, 28, 28), **options)

    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.fit(
        model,
        DataLoader(TensorDataset(train_images, train_labels), batch_size=128, shuffle=True),
        DataLoader(TensorDataset(test_images, test_labels), batch_size=1000),
    )
    accuracy = trainer.test(model, DataLoader(TensorDataset(test_images, test_labels), batch_size=1000))
    print(f"NoProp-{args.variant.upper()} ({args.embedding} embedding): test accuracy {accuracy[0]['test_acc']:.4f}")


if __name__ == "__main__":
    main()
