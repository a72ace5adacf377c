"""Teach a small masked-diffusion LM 2-digit addition: supervised warm-up, then BGPO with an exact-answer reward.

    python examples/bgpo_addition.py                  # 600 warm-up + 150 RL steps: about 65 s on one CPU core
    python examples/bgpo_addition.py --objective diffu-grpo
    python examples/bgpo_addition.py --quick          # 100 warm-up + 5 RL steps: about 12 s

Prints the warm-up loss on fixed problems before and after, held-out accuracy after the warm-up and after
RL, and the rollout reward every 10 RL steps.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_bpfree.bgpo import BGPO
from lightning_bpfree.bgpo.losses import sft_loss
from lightning_bpfree.bgpo.module import MaskedDiffusionSFT
from lightning_bpfree.bgpo.tasks import AdditionTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup-steps", type=int, default=None, help="supervised steps (default 600, --quick 100)")
    parser.add_argument("--rl-steps", type=int, default=None, help="RL steps (default 150, --quick 5)")
    parser.add_argument("--objective", default="bgpo", choices=["bgpo", "naive", "diffu-grpo"])
    parser.add_argument("--mc-samples", type=int, default=4, help="Monte Carlo mask draws n_t per ELBO")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer steps and held-out problems, same code path (CI)")
    args = parser.parse_args()
    warmup_steps = args.warmup_steps or (100 if args.quick else 600)
    rl_steps = args.rl_steps or (5 if args.quick else 150)

    L.seed_everything(args.seed)
    task = AdditionTask(num_digits=2, seed=args.seed)
    policy = task.make_policy(hidden_size=64, num_layers=2)  # BertForMaskedLM, ~0.1 M parameters
    num_held_out = 200 if args.quick else 1000
    held_out = task.prompt_dataset(num_held_out, "held_out", torch.Generator().manual_seed(1)).tensors[0]

    # 1. supervised warm-up: minimise the masked-diffusion negative ELBO of correct answers
    warmup_data = task.supervised_dataset(64 * warmup_steps, torch.Generator().manual_seed(2))
    probe = task.supervised_dataset(512, torch.Generator().manual_seed(4)).tensors  # fixed problems for the loss

    def probe_loss() -> float:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(5)  # the same masks before and after
            return float(sft_loss(policy, *probe))

    loss_before = probe_loss()
    trainer = L.Trainer(max_steps=warmup_steps, logger=False, enable_checkpointing=False)
    trainer.fit(MaskedDiffusionSFT(policy, lr=2e-3), DataLoader(warmup_data, batch_size=64, shuffle=True))
    print(f"warm-up: masked-diffusion loss on 512 fixed problems {loss_before:.3f} -> {probe_loss():.3f}")
    print(f"after warm-up: held-out accuracy {task.accuracy(policy, held_out):.3f} (greedy)")

    # 2. RL: 16 prompts x 8 sampled answers per step, reward 1 for the exact sum
    module = BGPO(
        policy,
        reward_fn=task.reward,
        response_length=task.response_length,
        group_size=8,
        num_mc_samples=args.mc_samples,
        objective=args.objective,
        lr=3e-4,
        updates_per_batch=2,
        suppress_token_ids=task.special_tokens,
    )
    prompts = task.prompt_dataset(16 * rl_steps, generator=torch.Generator().manual_seed(3))
    # max_steps counts optimizer steps: updates_per_batch (2) per batch of rollouts
    trainer = L.Trainer(max_steps=2 * rl_steps, logger=False, enable_checkpointing=False)
    trainer.fit(module, DataLoader(prompts, batch_size=16, shuffle=True))

    rewards = [step["reward"] for step in module.history]
    for start in range(0, len(rewards), 10):
        window = rewards[start : start + 10]
        print(f"RL steps {start + 1:>3}-{start + len(window):<3} mean rollout reward {sum(window) / len(window):.3f}")
    print(f"after {args.objective}: held-out accuracy {task.accuracy(policy, held_out):.3f} (greedy)")


if __name__ == "__main__":
    main()
