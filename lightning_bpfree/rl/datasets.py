"""D4RL-style offline datasets collected locally from gymnasium environments (nothing downloads).

A dataset is a flat table of transitions with the fields D4RL uses: ``observations [N, obs_dim]``,
``actions [N, act_dim]`` (in the environment's own units), ``rewards [N]``, ``next_observations
[N, obs_dim]``, ``terminals [N]`` (the MDP ended: no bootstrapping from ``next_observations``) and
``timeouts [N]`` (the time limit cut the episode: ``next_observations`` is a real state and values
still bootstrap from it). It is saved and loaded as one ``.npz`` file.

Kinds, as in D4RL but collected here:

- ``random``: uniform random actions.
- ``medium``: rollouts of a TD3 policy trained briefly here, stopped once its return reaches about a
  third of the way from random to expert (D4RL's "medium" is about one third of expert).
- ``medium-replay``: the replay buffer of that short training run.
- ``expert``: a near-optimal controller (for Pendulum a scripted energy-pumping swing-up plus a PD
  balance controller, about -140 per episode; for MuJoCo a TD3 policy trained longer).
- ``medium-expert``: ``medium`` and ``expert`` concatenated.

Environments: ``Pendulum-v1`` (classic control, always available) and, when the ``mujoco`` package is
installed, ``Hopper-v5`` and ``HalfCheetah-v5``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

DATASET_KINDS = ("random", "medium", "medium-replay", "medium-expert", "expert")
FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")

# Mean episode returns of a uniform-random policy and of the expert, for the normalized score
# 100 * (R - random) / (expert - random). Pendulum: measured here (random over 50 episodes, the scripted
# expert over 200). MuJoCo: D4RL's reference scores for the v2 tasks (the v5 tasks share the dynamics).
REFERENCE_RETURNS: dict[str, tuple[float, float]] = {
    "Pendulum-v1": (-1258.0, -145.0),
    "Hopper-v5": (-20.272305, 3234.3),
    "HalfCheetah-v5": (-280.178953, 12135.0),
}
_MUJOCO_ENVS = ("Hopper-v5", "HalfCheetah-v5")

ActionFn = Callable[[np.ndarray], np.ndarray]
"""A policy for collection and evaluation: observations ``[n, obs_dim]`` -> actions ``[n, act_dim]``."""


@dataclass
class OfflineDataset:
    """A table of transitions; see the module docstring for the fields and their shapes."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    env_id: str = ""
    kind: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.observations)
        for name in FIELDS:
            value = np.asarray(getattr(self, name))
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} rows, observations has {n}")
            setattr(self, name, value)
        if self.observations.ndim != 2 or self.next_observations.shape != self.observations.shape:
            raise ValueError(
                "observations and next_observations must both be [N, obs_dim], got "
                f"{self.observations.shape} and {self.next_observations.shape}"
            )
        if self.actions.ndim != 2 or self.rewards.ndim != 1:
            raise ValueError(
                f"actions must be [N, act_dim], rewards [N]; got {self.actions.shape}, {self.rewards.shape}"
            )
        self.terminals = self.terminals.astype(bool)
        self.timeouts = self.timeouts.astype(bool)

    def __len__(self) -> int:
        return len(self.observations)

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of every complete episode (one ending in a terminal or a timeout)."""
        ends = np.flatnonzero(self.terminals | self.timeouts)
        sums = np.cumsum(self.rewards)
        totals = sums[ends]
        return np.diff(np.concatenate([[0.0], totals])) if len(ends) else np.zeros(0)

    def save(self, path: str | Path) -> Path:
        """Write the dataset to ``path`` (``.npz``, uncompressed) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {name: getattr(self, name) for name in FIELDS}
        meta = {"env_id": self.env_id, "kind": self.kind, **self.metadata}
        with open(path, "wb") as handle:
            np.savez(handle, **arrays, metadata=np.array(repr(meta)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> OfflineDataset:
        """Read a dataset written by :meth:`save` (or any ``.npz`` with the six D4RL fields)."""
        with np.load(Path(path), allow_pickle=False) as data:
            missing = [name for name in FIELDS if name not in data.files]
            if missing:
                raise ValueError(f"{path} lacks the fields {missing}; a dataset needs {list(FIELDS)}")
            arrays = {name: data[name] for name in FIELDS}
            meta = _literal(str(data["metadata"])) if "metadata" in data.files else {}
        env_id, kind = meta.pop("env_id", ""), meta.pop("kind", "")
        return cls(**arrays, env_id=env_id, kind=kind, metadata=meta)

    @classmethod
    def concatenate(cls, parts: list[OfflineDataset], kind: str = "") -> OfflineDataset:
        """One dataset holding every transition of ``parts`` (episodes stay intact)."""
        if not parts:
            raise ValueError("parts must hold at least one dataset")
        arrays = {name: np.concatenate([getattr(p, name) for p in parts]) for name in FIELDS}
        return cls(**arrays, env_id=parts[0].env_id, kind=kind, metadata=dict(parts[0].metadata))


def _literal(text: str) -> dict[str, Any]:
    import ast

    return dict(ast.literal_eval(text))


# --------------------------------------------------------------------------------------------------
# Environments


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread inside the block: the tiny per-step networks of collection and
    evaluation gain nothing from intra-op threads, and on a busy machine the threads cost a lot."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_env(env_id: str, seed: int | None = None):
    """``gymnasium.make(env_id)`` with a clear error for unknown ids and missing MuJoCo."""
    import gymnasium as gym

    if env_id in _MUJOCO_ENVS:
        try:
            import mujoco  # noqa: F401
        except ImportError as error:
            raise ImportError(f"{env_id} needs the `mujoco` package: pip install mujoco") from error
    elif env_id not in REFERENCE_RETURNS:
        raise ValueError(f"env_id must be one of {sorted(REFERENCE_RETURNS)}, got {env_id!r}")
    env = gym.make(env_id)
    if seed is not None:
        env.action_space.seed(seed)
    return env


def normalized_return(env_id: str, episode_return: float) -> float:
    """D4RL's normalized score: 0 for a random policy, 100 for the expert."""
    if env_id not in REFERENCE_RETURNS:
        raise ValueError(f"env_id must be one of {sorted(REFERENCE_RETURNS)}, got {env_id!r}")
    random_return, expert_return = REFERENCE_RETURNS[env_id]
    return 100.0 * (episode_return - random_return) / (expert_return - random_return)


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


@single_thread()
def rollout(
    env_id: str,
    policy: ActionFn | None,
    num_steps: int,
    *,
    seed: int = 0,
    num_envs: int = 8,
    action_noise: float = 0.0,
    env_factory: Callable[[], Any] | None = None,
) -> OfflineDataset:
    """Collect ``num_steps`` transitions with ``policy`` (``None``: uniform random actions).

    ``num_envs`` environments step in lock-step so the policy sees batches. ``action_noise`` adds
    Gaussian noise with that standard deviation, in units of half the action range, before clipping.
    Only whole episodes are kept: the first finished episodes whose lengths add up to at least
    ``num_steps``, so every episode ends in exactly one terminal or timeout.
    ``env_factory`` replaces ``make_env(env_id)`` (for custom environments).
    """
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    if num_envs <= 0:
        raise ValueError(f"num_envs must be positive, got {num_envs}")
    if action_noise < 0:
        raise ValueError(f"action_noise must be >= 0, got {action_noise}")
    envs = [env_factory() if env_factory else make_env(env_id) for _ in range(num_envs)]
    low, high = envs[0].action_space.low, envs[0].action_space.high
    rng = np.random.default_rng(seed)
    observations = np.stack([env.reset(seed=seed * 10_007 + i)[0] for i, env in enumerate(envs)])
    episodes: list[dict[str, list]] = [_empty_episode() for _ in envs]
    finished: list[dict[str, list]] = []
    collected = 0
    while collected < num_steps:
        if policy is None:
            actions = rng.uniform(low, high, size=(num_envs, len(low)))
        else:
            actions = np.asarray(policy(observations.astype(np.float32)), dtype=np.float64)
            if action_noise:
                actions = actions + rng.normal(0.0, action_noise, actions.shape) * (high - low) / 2
        actions = np.clip(actions, low, high).astype(np.float32)
        for i, env in enumerate(envs):
            next_obs, reward, terminated, truncated, _ = env.step(actions[i])
            episode = episodes[i]
            for name, value in zip(
                FIELDS,
                (observations[i].copy(), actions[i], reward, next_obs, terminated, truncated and not terminated),
            ):
                episode[name].append(value)
            if terminated or truncated:
                finished.append(episode)
                collected += len(episode["rewards"])
                episodes[i] = _empty_episode()
                next_obs, _ = env.reset(seed=int(rng.integers(2**31)))
            observations[i] = next_obs
    for env in envs:
        env.close()
    lengths = np.cumsum([len(e["rewards"]) for e in finished])
    finished = finished[: int(np.searchsorted(lengths, num_steps)) + 1]  # the fewest episodes reaching num_steps
    arrays = {name: np.concatenate([np.asarray(e[name]) for e in finished]) for name in FIELDS}
    for name in ("observations", "next_observations", "actions", "rewards"):
        arrays[name] = arrays[name].astype(np.float32)
    if arrays["actions"].ndim == 1:
        arrays["actions"] = arrays["actions"][:, None]
    meta = {"action_low": low.tolist(), "action_high": high.tolist(), "seed": seed}
    return OfflineDataset(**arrays, env_id=env_id, metadata=meta)


def _empty_episode() -> dict[str, list]:
    return {name: [] for name in FIELDS}


@single_thread()
def evaluate_policy(env_id: str, policy: ActionFn, episodes: int = 10, *, seed: int = 12345, env_factory=None) -> float:
    """Mean undiscounted return of ``policy`` over ``episodes`` full episodes (all run side by side)."""
    if episodes <= 0:
        raise ValueError(f"episodes must be positive, got {episodes}")
    envs = [env_factory() if env_factory else make_env(env_id) for _ in range(episodes)]
    observations = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]).astype(np.float32)
    low, high = envs[0].action_space.low, envs[0].action_space.high
    returns = np.zeros(episodes)
    alive = np.ones(episodes, dtype=bool)
    while alive.any():
        index = np.flatnonzero(alive)
        actions = np.clip(np.asarray(policy(observations[index]), dtype=np.float32), low, high)
        for row, i in enumerate(index):
            next_obs, reward, terminated, truncated, _ = envs[i].step(actions[row])
            returns[i] += reward
            observations[i] = next_obs
            alive[i] = not (terminated or truncated)
    for env in envs:
        env.close()
    return float(returns.mean())


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
    if kind not in DATASET_KINDS:
        raise ValueError(f"kind must be one of {DATASET_KINDS}, got {kind!r}")
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


# --------------------------------------------------------------------------------------------------
# Feeding a Trainer


def reward_scale_for(dataset: OfflineDataset, max_episode_steps: int | None = None) -> float:
    """The paper's reward rescaling: ``max_episode_steps / (max episode return - min episode return)``.

    The paper's code divides the rewards by the range of episode returns and multiplies by the
    environment's time limit (1000 for its MuJoCo tasks), so that the scaled episode returns span as
    many units as an episode has steps. ``max_episode_steps`` defaults to the gymnasium time limit of
    ``dataset.env_id`` (Pendulum-v1: 200), or the longest episode in the dataset when the id has none.
    (1.0 when the dataset holds fewer than two complete episodes or all their returns are equal.)
    """
    returns = dataset.episode_returns()
    if len(returns) < 2 or float(returns.max() - returns.min()) == 0.0:
        return 1.0
    if max_episode_steps is None:
        max_episode_steps = _time_limit(dataset)
    if max_episode_steps <= 0:
        raise ValueError(f"max_episode_steps must be positive, got {max_episode_steps}")
    return float(max_episode_steps) / float(returns.max() - returns.min())


def _time_limit(dataset: OfflineDataset) -> int:
    import gymnasium as gym

    try:
        limit = gym.spec(dataset.env_id).max_episode_steps
    except gym.error.Error:
        limit = None
    if limit:
        return int(limit)
    ends = np.flatnonzero(dataset.terminals | dataset.timeouts)
    return int(np.diff(np.concatenate([[-1], ends])).max())


class OfflineBatches(torch.utils.data.IterableDataset):
    """``num_batches`` random minibatches (sampled with replacement) of an :class:`OfflineDataset`.

    Each item is a whole batch: a dict of float32 tensors ``observations [B, obs_dim]``,
    ``actions [B, act_dim]``, ``rewards [B]`` (times ``reward_scale``), ``next_observations`` and
    ``terminals [B]`` (1.0 where the MDP ended). Use it with ``DataLoader(batch_size=None)``
    (:func:`offline_dataloader` does).
    """

    def __init__(
        self,
        dataset: OfflineDataset,
        batch_size: int = 256,
        num_batches: int = 1000,
        reward_scale: float | str = "auto",
        seed: int = 0,
    ) -> None:
        if batch_size <= 0 or num_batches <= 0:
            raise ValueError(f"batch_size and num_batches must be positive, got {batch_size}, {num_batches}")
        if reward_scale == "auto":
            reward_scale = reward_scale_for(dataset)
        elif not isinstance(reward_scale, (int, float)) or isinstance(reward_scale, bool):
            raise TypeError(f"reward_scale must be a number or 'auto', got {reward_scale!r}")
        self.reward_scale = float(reward_scale)
        self.batch_size, self.num_batches, self.seed = batch_size, num_batches, seed
        self.tensors = {
            "observations": torch.as_tensor(dataset.observations, dtype=torch.float32),
            "actions": torch.as_tensor(dataset.actions, dtype=torch.float32),
            "rewards": torch.as_tensor(dataset.rewards, dtype=torch.float32) * self.reward_scale,
            "next_observations": torch.as_tensor(dataset.next_observations, dtype=torch.float32),
            "terminals": torch.as_tensor(dataset.terminals, dtype=torch.float32),
        }
        self._epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self._epoch)
        self._epoch += 1
        n = len(self.tensors["rewards"])
        for _ in range(self.num_batches):
            index = torch.randint(n, (self.batch_size,), generator=generator)
            yield {name: value[index] for name, value in self.tensors.items()}


def offline_dataloader(
    dataset: OfflineDataset,
    batch_size: int = 256,
    num_batches: int = 1000,
    reward_scale: float | str = "auto",
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader of :class:`OfflineBatches` (batches are built in the main process)."""
    return torch.utils.data.DataLoader(
        OfflineBatches(dataset, batch_size, num_batches, reward_scale, seed), batch_size=None
    )
