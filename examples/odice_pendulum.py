"""Offline RL with ODICE on a Pendulum dataset collected locally (nothing downloads).

    python examples/odice_pendulum.py --kind medium-expert --steps 10000   # about 2.5 min on one CPU core
    python examples/odice_pendulum.py --quick    # expert data, 2,000 transitions, 200 steps: about 11 s

Collects (or loads from ``--cache-dir``) a D4RL-style dataset, trains the ODICE LightningModule with
the orthogonal gradient with the ``bpfree odice-bench`` settings (lam 0.5, 64x64 MLPs, Adam 1e-3,
batch 128), rolls the policy out ten times during training and prints the normalized return
(0 = random policy, 100 = expert) and cos(g_forward, g_backward). The medium kinds first train a TD3
behaviour policy online (most of a first run's time); the cache makes later runs start at once.
``--quick`` collects the ``expert`` kind, which needs no behaviour training.
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
    parser.add_argument("--kind", default=None, choices=DATASET_KINDS, help="default medium-expert, --quick expert")
    parser.add_argument("--gradient", default="orthogonal", choices=GRADIENTS)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 10000, --quick 200)")
    parser.add_argument("--transitions", type=int, default=None, help="per collected dataset (20000, quick 2000)")
    parser.add_argument("--cache-dir", type=Path, default=Path("bpfree-results/odice-datasets"))
    parser.add_argument("--quick", action="store_true", help="small dataset, few steps and episodes, same code path")
    args = parser.parse_args()
    kind = args.kind or ("expert" if args.quick else "medium-expert")
    steps = args.steps or (200 if args.quick else 10_000)
    transitions = args.transitions or (2_000 if args.quick else 20_000)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    datasets = load_or_make_datasets("Pendulum-v1", [kind], cache_dir=args.cache_dir, num_steps=transitions,
                                     progress=True)  # fmt: skip
    data = datasets[kind]
    behaviour = normalized_return("Pendulum-v1", float(data.episode_returns().mean()))
    print(f"{kind}: {len(data)} transitions, behaviour policy scores {behaviour:.1f}")

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
    evaluation = OfflineEvaluation("Pendulum-v1", every_n_steps=max(steps // 10, 1), episodes=3 if args.quick else 10)
    trainer = L.Trainer(max_steps=steps, callbacks=[evaluation], logger=False, enable_checkpointing=False)
    trainer.fit(model, offline_dataloader(data, batch_size=128, num_batches=steps))
    for row in evaluation.history:
        cosine = row.get("cos_forward_backward", float("nan"))
        print(
            f"step {row['step']:6.0f}  normalized return {row['normalized_return']:6.1f}  cos(g_f, g_b) {cosine:+.2f}"
        )


if __name__ == "__main__":
    main()
