"""Offline RL with ODICE on a Pendulum dataset collected locally (nothing downloads).

    .venv/bin/python examples/odice_pendulum.py --kind medium-expert --steps 10000

Collects (or loads from ``--cache-dir``) a D4RL-style dataset, trains the ODICE LightningModule with
the orthogonal gradient with the ``bpfree odice-bench`` settings (lam 0.5, 64x64 MLPs, Adam 1e-3,
batch 128), rolls the policy out ten times during training and prints the normalized return
(0 = random policy, 100 = expert) and cos(g_forward, g_backward).
"""

import argparse
import logging
from pathlib import Path

import lightning as L
import torch

from lightning_bpfree.odice import ODICE
from lightning_bpfree.odice.behaviour import load_or_make_datasets
from lightning_bpfree.odice.callback import OfflineEvaluation
from lightning_bpfree.odice.core import GRADIENTS
from lightning_bpfree.odice.datasets import DATASET_KINDS, normalized_return, offline_dataloader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="medium-expert", choices=DATASET_KINDS)
    parser.add_argument("--gradient", default="orthogonal", choices=GRADIENTS)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--cache-dir", type=Path, default=Path("bpfree-results/odice-datasets"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    data = load_or_make_datasets("Pendulum-v1", [args.kind], cache_dir=args.cache_dir, progress=True)[args.kind]
    behaviour = normalized_return("Pendulum-v1", float(data.episode_returns().mean()))
    print(f"{args.kind}: {len(data)} transitions, behaviour policy scores {behaviour:.1f}")

    L.seed_everything(0)
    model = ODICE.for_dataset(
        data,
        gradient=args.gradient,
        lam=0.5,
        value_hidden=(64, 64),
        policy_hidden=(64, 64),
        value_lr=1e-3,
        policy_lr=1e-3,
        log_every_n_steps=100,
    )
    evaluation = OfflineEvaluation("Pendulum-v1", every_n_steps=max(args.steps // 10, 1), episodes=10)
    trainer = L.Trainer(max_steps=args.steps, callbacks=[evaluation], logger=False, enable_checkpointing=False)
    trainer.fit(model, offline_dataloader(data, batch_size=128, num_batches=args.steps))
    for row in evaluation.history:
        cosine = row.get("cos_forward_backward", float("nan"))
        print(
            f"step {row['step']:6.0f}  normalized return {row['normalized_return']:6.1f}  cos(g_f, g_b) {cosine:+.2f}"
        )


if __name__ == "__main__":
    main()
