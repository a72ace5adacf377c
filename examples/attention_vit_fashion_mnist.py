"""Train a small ViT with SOFT (or softmax) attention on Fashion-MNIST with a Lightning Trainer.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist``; nothing downloads. Logs (CSV) go to ``--out``.

    python examples/attention_vit_fashion_mnist.py --attention soft    # 2 epochs of 12,000 images: about 2 min
    python examples/attention_vit_fashion_mnist.py --quick             # 1 epoch of 1,000 images: about 15 s

(Times on one CPU core.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree.attention.module import ViTClassifier
from lightning_bpfree.data import fashion_mnist

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--attention", default="soft", choices=["soft", "sdpa", "eager"])
parser.add_argument("--train", type=int, default=None, help="training images (default 12000, --quick 1000)")
parser.add_argument("--test", type=int, default=None, help="test images (default all 10000, --quick 1000)")
parser.add_argument("--epochs", type=int, default=None, help="default 2, --quick 1")
parser.add_argument("--patch", type=int, default=2, help="patch size: (28 / patch)^2 tokens")
parser.add_argument("--landmarks", type=int, default=16)
parser.add_argument("--out", type=Path, default=Path("lightning_logs"), help="CSV logs and checkpoints")
parser.add_argument("--quick", action="store_true", help="fewer images and epochs, same code path (CI)")
args = parser.parse_args()
num_train = args.train or (1000 if args.quick else 12000)
num_test = args.test or (1000 if args.quick else None)  # None: the whole test split
epochs = args.epochs or (1 if args.quick else 2)

L.seed_everything(0)
train = TensorDataset(*fashion_mnist("train", limit=num_train))
test = TensorDataset(*fashion_mnist("test", limit=num_test))
soft_options = {"num_landmarks": args.landmarks} if args.attention == "soft" else {}
module = ViTClassifier(attention=args.attention, patch_size=args.patch, **soft_options)
trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=L.pytorch.loggers.CSVLogger(args.out))
trainer.fit(module, DataLoader(train, batch_size=128, shuffle=True), DataLoader(test, batch_size=512))
(result,) = trainer.test(module, DataLoader(test, batch_size=512))
print(f"ViT with {args.attention} attention, {epochs} epochs on {len(train)} images: "
      f"test accuracy {result['test_acc']:.4f} on {len(test)} images")  # fmt: skip
