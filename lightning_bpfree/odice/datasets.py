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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_bpfree.validation import (
    check_choice,
    check_finite_tensor,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
    check_seed,
)

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
        for name in ("observations", "actions", "rewards", "next_observations"):
            values = getattr(self, name)
            if not np.issubdtype(values.dtype, np.number):
                raise TypeError(f"{name} must hold numbers, got dtype {values.dtype}")
            # refused here, at the source, rather than training the value net to NaN
            check_finite_tensor(name, values)
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
    else:
        check_choice("env_id", env_id, REFERENCE_RETURNS)
    env = gym.make(env_id)
    if seed is not None:
        env.action_space.seed(seed)
    return env


def normalized_return(env_id: str, episode_return: float) -> float:
    """D4RL's normalized score: 0 for a random policy, 100 for the expert."""
    check_choice("env_id", env_id, REFERENCE_RETURNS)
    random_return, expert_return = REFERENCE_RETURNS[env_id]
    return 100.0 * (episode_return - random_return) / (expert_return - random_return)


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
    check_positive_int("num_steps", num_steps)
    check_positive_int("num_envs", num_envs)
    check_nonnegative_float("action_noise", action_noise)
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
    check_positive_int("episodes", episodes)
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
    check_positive_int("max_episode_steps", max_episode_steps)
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
        if not isinstance(dataset, OfflineDataset):
            raise TypeError(f"dataset must be an OfflineDataset (see make_dataset), got {type(dataset).__name__}")
        check_positive_int("batch_size", batch_size)
        check_positive_int("num_batches", num_batches)
        if isinstance(reward_scale, str) and reward_scale == "auto":
            reward_scale = reward_scale_for(dataset)
        # a negative scale would turn rewards into costs, zero would erase them
        self.reward_scale = check_positive_float("reward_scale", reward_scale)
        check_seed("seed", seed)
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
