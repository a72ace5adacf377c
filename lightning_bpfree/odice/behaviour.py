"""Behaviour policies and the offline datasets collected with them.

- :func:`pendulum_expert`: a scripted near-optimal Pendulum-v1 controller (the ``expert`` kind).
- :func:`train_behaviour_policy`: a short online TD3 run (Fujimoto et al., 2018) whose actor is the
  ``medium`` policy and whose replay buffer is the ``medium-replay`` dataset.
- :func:`make_dataset` / :func:`load_or_make_datasets`: one dataset of each D4RL-style kind (see
  :mod:`lightning_bpfree.odice.datasets` for the fields and the kinds).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightning_bpfree.odice.datasets import (
    DATASET_KINDS,
    FIELDS,
    ActionFn,
    OfflineDataset,
    evaluate_policy,
    make_env,
    normalized_return,
    rollout,
    single_thread,
)
from lightning_bpfree.validation import check_choice, check_positive_int, check_seed


def pendulum_expert(observations: np.ndarray) -> np.ndarray:
    """A near-optimal scripted Pendulum-v1 controller: ``[n, 3]`` observations -> ``[n, 1]`` torques.

    Far from upright it pumps energy towards the upright energy (torque along the angular velocity while
    the energy is short); near upright a PD law balances. Mean return about -140 per 200-step episode.
    """
    cos_theta, sin_theta, velocity = observations[:, 0], observations[:, 1], observations[:, 2]
    theta = np.arctan2(sin_theta, cos_theta)
    # Pendulum-v1 has theta'' = 15 sin(theta) + 3 u, so 0.5 theta'^2 + 15 cos(theta) is conserved; 15 upright.
    energy = 0.5 * velocity**2 + 15.0 * cos_theta
    pump = 2.0 * np.sign(velocity * (15.0 - energy) + 1e-6)
    balance = -(12.0 * theta + 2.5 * velocity)
    return np.clip(np.where(cos_theta > 0.85, balance, pump), -2.0, 2.0)[:, None].astype(np.float32)


# --------------------------------------------------------------------------------------------------
# A short TD3 run: the "medium" behaviour policy and its replay buffer


def _mlp(sizes: list[int], output_activation: type[nn.Module] | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    if output_activation is not None:
        layers.append(output_activation())
    return nn.Sequential(*layers)


@dataclass
class BehaviourRun:
    """What :func:`train_behaviour_policy` returns."""

    policy: ActionFn
    replay: OfflineDataset
    evaluations: list[tuple[int, float]]
    """(environment steps, mean return) after each evaluation."""


@single_thread()
def train_behaviour_policy(
    env_id: str,
    *,
    target_normalized: float = 33.0,
    max_steps: int = 30_000,
    eval_every: int = 1_000,
    seed: int = 0,
    hidden: int = 64,
    batch_size: int = 128,
    start_steps: int = 1_000,
    progress: bool = False,
) -> BehaviourRun:
    """Train TD3 online until its normalized return reaches ``target_normalized`` (or ``max_steps``).

    The actor at that point is the "medium" policy; every transition seen so far is the
    "medium-replay" dataset. One gradient step per environment step (TD3 defaults: target noise
    0.2, clip 0.5, policy delay 2, soft update 0.005, exploration noise 0.1; small nets for speed).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    env = make_env(env_id, seed=seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    scale, centre = torch.tensor((high - low) / 2), torch.tensor((high + low) / 2)
    td3 = _TD3(obs_dim, act_dim, hidden)

    def act(observations: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            unit = td3.actor(torch.as_tensor(observations, dtype=torch.float32))
        return (unit * scale + centre).numpy()

    buffer = {
        "observations": np.zeros((max_steps, obs_dim), np.float32),
        "actions": np.zeros((max_steps, act_dim), np.float32),
        "rewards": np.zeros(max_steps, np.float32),
        "next_observations": np.zeros((max_steps, obs_dim), np.float32),
        "terminals": np.zeros(max_steps, bool),
        "timeouts": np.zeros(max_steps, bool),
    }
    evaluations: list[tuple[int, float]] = []
    reached = False
    obs, _ = env.reset(seed=seed)
    steps = range(max_steps)
    if progress:
        from lightning_bpfree.benchmarking import progress as bar

        steps = bar(steps, desc=f"TD3 behaviour policy ({env_id})")
    size = 0
    for step in steps:
        if step < start_steps:
            action = rng.uniform(low, high)
        else:
            action = act(obs[None])[0] + rng.normal(0, 0.1, act_dim) * (high - low) / 2
        action = np.clip(action, low, high).astype(np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        row = (obs, action, reward, next_obs, terminated, truncated and not terminated)
        for name, value in zip(FIELDS, row):
            buffer[name][step] = value
        size = step + 1
        episode_over = terminated or truncated
        obs = env.reset()[0] if episode_over else next_obs
        if size >= batch_size:
            index = rng.integers(size, size=batch_size)
            batch = {name: torch.as_tensor(value[index], dtype=torch.float32) for name, value in buffer.items()}
            td3.update(batch, (batch["actions"] - centre) / scale, update_actor=step % 2 == 0)
        if size % eval_every == 0 and size > start_steps and not reached:
            score = evaluate_policy(env_id, act, episodes=5, seed=seed + 777)
            evaluations.append((size, score))
            reached = normalized_return(env_id, score) >= target_normalized
        if reached and episode_over:  # stop on an episode boundary: the replay holds whole episodes only
            break
    env.close()
    ends = np.flatnonzero(buffer["terminals"][:size] | buffer["timeouts"][:size])
    keep = ends[-1] + 1 if len(ends) else 0
    meta = {"action_low": low.tolist(), "action_high": high.tolist(), "seed": seed, "td3_steps": size}
    replay = OfflineDataset(
        **{name: value[:keep] for name, value in buffer.items()},
        env_id=env_id,
        kind="medium-replay",
        metadata=meta,
    )
    return BehaviourRun(policy=act, replay=replay, evaluations=evaluations)


class _TD3(nn.Module):
    """Twin-critic TD3 (Fujimoto et al. 2018) on actions scaled to [-1, 1]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, lr: float = 1e-3):
        super().__init__()
        self.actor = _mlp([obs_dim, hidden, hidden, act_dim], nn.Tanh)
        self.critics = nn.ModuleList(_mlp([obs_dim + act_dim, hidden, hidden, 1]) for _ in range(2))
        self.actor_target, self.critics_target = copy.deepcopy(self.actor), copy.deepcopy(self.critics)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.critic_opt = torch.optim.Adam(self.critics.parameters(), lr=lr)

    def update(
        self,
        batch: dict[str, torch.Tensor],
        unit_actions: torch.Tensor,
        update_actor: bool,
        discount: float = 0.99,
        tau: float = 0.005,
    ) -> None:
        obs, next_obs = batch["observations"], batch["next_observations"]
        with torch.no_grad():
            noise = (torch.randn_like(unit_actions) * 0.2).clamp(-0.5, 0.5)
            next_in = torch.cat([next_obs, (self.actor_target(next_obs) + noise).clamp(-1.0, 1.0)], dim=1)
            target_q = torch.min(self.critics_target[0](next_in), self.critics_target[1](next_in)).squeeze(1)
            target = batch["rewards"] + discount * (1.0 - batch["terminals"]) * target_q
        state_action = torch.cat([obs, unit_actions], dim=1)
        critic_loss = sum(((critic(state_action).squeeze(1) - target) ** 2).mean() for critic in self.critics)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        if update_actor:  # delayed policy updates
            actor_loss = -self.critics[0](torch.cat([obs, self.actor(obs)], dim=1)).mean()
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_opt.step()
            with torch.no_grad():
                for net, target_net in ((self.actor, self.actor_target), (self.critics, self.critics_target)):
                    for p, p_target in zip(net.parameters(), target_net.parameters()):
                        p_target.lerp_(p, tau)


# --------------------------------------------------------------------------------------------------
# The dataset kinds


def expert_policy(env_id: str, *, seed: int = 0, progress: bool = False) -> ActionFn:
    """The expert behaviour policy of ``env_id`` (scripted for Pendulum, a longer TD3 run for MuJoCo)."""
    if env_id == "Pendulum-v1":
        return pendulum_expert
    return train_behaviour_policy(
        env_id,
        target_normalized=90.0,
        max_steps=1_000_000,
        eval_every=10_000,
        seed=seed,
        hidden=256,
        batch_size=256,
        start_steps=10_000,
        progress=progress,
    ).policy


def make_dataset(
    env_id: str,
    kind: str,
    *,
    num_steps: int = 20_000,
    seed: int = 0,
    behaviour: BehaviourRun | None = None,
    progress: bool = False,
) -> OfflineDataset:
    """Collect one dataset ``kind`` (see :data:`DATASET_KINDS`) of about ``num_steps`` transitions.

    ``behaviour`` reuses a :func:`train_behaviour_policy` run (it backs ``medium``, ``medium-replay``
    and ``medium-expert``); without it one is trained here. ``medium-replay`` is the whole replay
    buffer, whatever its length; ``medium-expert`` holds ``num_steps`` of each.
    """
    check_choice("kind", kind, DATASET_KINDS)
    check_positive_int("num_steps", num_steps)
    check_seed("seed", seed)  # checked before a behaviour policy is trained for minutes
    make_env(env_id).close()  # fail early on an unknown id or missing mujoco
    if kind == "random":
        data = rollout(env_id, None, num_steps, seed=seed)
    elif kind == "expert":
        data = rollout(env_id, expert_policy(env_id, seed=seed), num_steps, seed=seed, action_noise=0.05)
    else:
        behaviour = behaviour or train_behaviour_policy(env_id, seed=seed, progress=progress)
        if kind == "medium-replay":
            data = behaviour.replay
        else:
            data = rollout(env_id, behaviour.policy, num_steps, seed=seed, action_noise=0.05)
            if kind == "medium-expert":
                expert = rollout(env_id, expert_policy(env_id, seed=seed), num_steps, seed=seed + 1, action_noise=0.05)
                data = OfflineDataset.concatenate([data, expert])
    data.kind = kind
    return data


def load_or_make_datasets(
    env_id: str,
    kinds: tuple[str, ...] | list[str] = ("random", "medium", "medium-replay", "medium-expert"),
    *,
    cache_dir: str | Path,
    num_steps: int = 20_000,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, OfflineDataset]:
    """Load ``<cache_dir>/<env_id>-<kind>-<num_steps>-s<seed>.npz`` for each kind, collecting missing ones.

    One behaviour run backs every medium kind, so they share the same "medium" policy.
    """
    cache_dir = Path(cache_dir)
    out: dict[str, OfflineDataset] = {}
    behaviour: BehaviourRun | None = None
    for kind in kinds:
        path = cache_dir / f"{env_id}-{kind}-{num_steps}-s{seed}.npz"
        if path.exists():
            out[kind] = OfflineDataset.load(path)
            continue
        if kind.startswith("medium") and behaviour is None:
            behaviour = train_behaviour_policy(env_id, seed=seed, progress=progress)
        out[kind] = make_dataset(env_id, kind, num_steps=num_steps, seed=seed, behaviour=behaviour)
        out[kind].save(path)
    return out
