"""Train a small ViT with SOFT (or softmax) attention on Fashion-MNIST with a Lightning Trainer.

Run: ``python examples/attention_vit_fashion_mnist.py --attention soft --train 12000 --epochs 2``
(Fashion-MNIST comes from Debian's ``dataset-fashion-mnist``; nothing downloads.)
"""

from __future__ import annotations

import argparse

import lightning as L
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree.attention.module import ViTClassifier
from lightning_bpfree.data import fashion_mnist

parser = argparse.ArgumentParser()
parser.add_argument("--attention", default="soft", choices=["soft", "sdpa", "eager"])
parser.add_argument("--train", type=int, default=12000, help="training images")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--patch", type=int, default=2, help="patch size: (28 / patch)^2 tokens")
parser.add_argument("--landmarks", type=int, default=16)
args = parser.parse_args()

L.seed_everything(0)
train = TensorDataset(*fashion_mnist("train", limit=args.train))
test = TensorDataset(*fashion_mnist("test"))
soft_options = {"num_landmarks": args.landmarks} if args.attention == "soft" else {}
module = ViTClassifier(attention=args.attention, patch_size=args.patch, **soft_options)
trainer = L.Trainer(accelerator="cpu", max_epochs=args.epochs, logger=L.pytorch.loggers.CSVLogger("lightning_logs"))
trainer.fit(module, DataLoader(train, batch_size=128, shuffle=True), DataLoader(test, batch_size=512))
trainer.test(module, DataLoader(test, batch_size=512))
