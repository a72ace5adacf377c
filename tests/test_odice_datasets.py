"""Offline datasets collected from gymnasium: shapes, terminals vs timeouts, rewards, .npz round trip."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from lightning_bpfree.odice.behaviour import make_dataset, pendulum_expert, train_behaviour_policy
from lightning_bpfree.odice.datasets import (
    FIELDS,
    REFERENCE_RETURNS,
    OfflineBatches,
    OfflineDataset,
    evaluate_policy,
    make_env,
    normalized_return,
    reward_scale_for,
    rollout,
    single_thread,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: intra-op threads only add contention (and on a shared machine, a lot of it)."""
    with single_thread():
        yield


class _Corridor(gym.Env):
    """Walk right on a line; the episode terminates on reaching position ``goal``; reward -1 per step."""

    observation_space = gym.spaces.Box(-100.0, 100.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, goal: int = 5):
        self.goal = goal

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.position = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.position += 1
        return np.array([self.position], np.float32), -1.0, self.position >= self.goal, False, {}


def _corridor(goal, limit):
    return lambda: gym.wrappers.TimeLimit(_Corridor(goal), max_episode_steps=limit)


def test_pendulum_random_dataset_fields_timeouts_and_rewards():
    data = rollout("Pendulum-v1", None, 700, seed=3, num_envs=2)
    n = len(data)
    assert n == 800  # whole 200-step episodes only: 4 of them
    assert data.observations.shape == (n, 3) and data.next_observations.shape == (n, 3)
    assert data.actions.shape == (n, 1) and data.rewards.shape == (n,)
    assert data.observations.dtype == np.float32
    assert not data.terminals.any()  # Pendulum never terminates; the time limit truncates
    assert np.array_equal(np.flatnonzero(data.timeouts), np.arange(199, n, 200))
    assert np.all(np.abs(data.actions) <= 2.0)
    # inside an episode, next_observations[t] is observations[t + 1]
    inside = ~data.timeouts[:-1]
    np.testing.assert_array_equal(data.next_observations[:-1][inside], data.observations[1:][inside])
    # Pendulum-v1 reward: -(theta^2 + 0.1 theta_dot^2 + 0.001 u^2) of the state before the step
    theta = np.arctan2(data.observations[:, 1], data.observations[:, 0])
    expected = -(theta**2 + 0.1 * data.observations[:, 2] ** 2 + 0.001 * data.actions[:, 0] ** 2)
    np.testing.assert_allclose(data.rewards, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(data.episode_returns().sum(), data.rewards.sum(), rtol=1e-5)
    assert len(data.episode_returns()) == 4


def test_terminals_and_timeouts_are_told_apart():
    terminating = rollout("custom", None, 20, env_factory=_corridor(goal=5, limit=50), num_envs=1)
    assert np.array_equal(np.flatnonzero(terminating.terminals), np.arange(4, len(terminating), 5))
    assert not terminating.timeouts.any()
    np.testing.assert_array_equal(terminating.episode_returns(), -5.0 * np.ones(len(terminating) // 5))
    truncated = rollout("custom", None, 9, env_factory=_corridor(goal=5, limit=3), num_envs=1)
    assert np.array_equal(np.flatnonzero(truncated.timeouts), np.arange(2, len(truncated), 3))
    assert not truncated.terminals.any()
    # a timeout keeps the true last state as next observation (3), never the reset state (0)
    assert np.all(truncated.next_observations[truncated.timeouts, 0] == 3.0)


def test_npz_round_trip_and_concatenate(tmp_path):
    data = rollout("Pendulum-v1", None, 200, seed=1, num_envs=1)
    data.kind = "random"
    path = data.save(tmp_path / "d.npz")
    loaded = OfflineDataset.load(path)
    for name in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(data, name))
    assert loaded.env_id == "Pendulum-v1" and loaded.kind == "random"
    assert loaded.metadata["action_low"] == [-2.0] and loaded.metadata["action_high"] == [2.0]
    both = OfflineDataset.concatenate([data, loaded], kind="mix")
    assert len(both) == 2 * len(data) and both.timeouts.sum() == 2
    np.savez(tmp_path / "bad.npz", observations=data.observations)
    with pytest.raises(ValueError, match="lacks the fields"):
        OfflineDataset.load(tmp_path / "bad.npz")


def test_dataset_rejects_inconsistent_arrays():
    with pytest.raises(ValueError, match="rows"):
        OfflineDataset(np.zeros((3, 2)), np.zeros((3, 1)), np.zeros(2), np.zeros((3, 2)), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="next_observations"):
        OfflineDataset(np.zeros((3, 2)), np.zeros((3, 1)), np.zeros(3), np.zeros((3, 4)), np.zeros(3), np.zeros(3))


def test_bad_names_raise_clearly():
    with pytest.raises(ValueError, match="kind must be one of"):
        make_dataset("Pendulum-v1", "expert-replay")
    with pytest.raises(ValueError, match="env_id must be one of"):
        make_env("CartPole-v1")
    with pytest.raises(ValueError, match="num_steps"):
        rollout("Pendulum-v1", None, 0)
    try:
        import mujoco  # noqa: F401

        has_mujoco = True
    except ImportError:
        has_mujoco = False
    if has_mujoco:
        make_env("Hopper-v5").close()
    else:
        with pytest.raises(ImportError, match="mujoco"):
            make_env("Hopper-v5")


def test_normalized_return_and_scripted_expert():
    random_return, expert_return = REFERENCE_RETURNS["Pendulum-v1"]
    assert normalized_return("Pendulum-v1", random_return) == 0.0
    assert normalized_return("Pendulum-v1", expert_return) == 100.0
    # the scripted controller is the Pendulum expert: it scores near 100 on fresh start states
    assert normalized_return("Pendulum-v1", evaluate_policy("Pendulum-v1", pendulum_expert, 8, seed=99)) > 90
    random_policy_score = evaluate_policy("Pendulum-v1", lambda o: np.random.uniform(-2, 2, (len(o), 1)), 8)
    assert normalized_return("Pendulum-v1", random_policy_score) < 30


def test_expert_and_mixture_kinds():
    expert = make_dataset("Pendulum-v1", "expert", num_steps=300)
    assert expert.kind == "expert" and len(expert) == 400  # whole episodes: two of 200
    assert normalized_return("Pendulum-v1", float(expert.episode_returns().mean())) > 80


def test_behaviour_run_keeps_whole_episodes():
    run = train_behaviour_policy("Pendulum-v1", max_steps=700, start_steps=200, eval_every=200, hidden=16)
    assert len(run.replay) == 600 and run.replay.timeouts.sum() == 3
    assert [step for step, _ in run.evaluations] == [400, 600]
    assert run.policy(np.zeros((2, 3), np.float32)).shape == (2, 1)


def test_offline_batches_scale_rewards_and_are_seeded():
    data = rollout("Pendulum-v1", None, 400, seed=0, num_envs=2)
    returns = data.episode_returns()
    # the paper's rule: time limit / return range, so scaled returns span one unit per step
    # (Pendulum-v1: 200 steps; not MuJoCo's 1000, which would make Pendulum's residuals 5x too large)
    assert reward_scale_for(data) == pytest.approx(200 / (returns.max() - returns.min()))
    scaled = returns * reward_scale_for(data)
    assert scaled.max() - scaled.min() == pytest.approx(200.0)
    assert reward_scale_for(data, max_episode_steps=1000) == pytest.approx(1000 / (returns.max() - returns.min()))
    unregistered = OfflineDataset(**{name: getattr(data, name) for name in FIELDS}, env_id="NoSuchEnv-v0")
    assert reward_scale_for(unregistered) == pytest.approx(200 / (returns.max() - returns.min()))  # longest episode
    with pytest.raises(ValueError, match="max_episode_steps"):
        reward_scale_for(data, max_episode_steps=0)
    batches = list(OfflineBatches(data, batch_size=32, num_batches=3, reward_scale=0.5, seed=7))
    assert len(batches) == 3
    first = batches[0]
    assert first["observations"].shape == (32, 3) and first["terminals"].shape == (32,)
    assert first["observations"].dtype == torch.float32
    rows = [int(np.flatnonzero((data.observations == o.numpy()).all(1))[0]) for o in first["observations"]]
    np.testing.assert_allclose(first["rewards"].numpy(), 0.5 * data.rewards[rows], rtol=1e-6)
    again = next(iter(OfflineBatches(data, batch_size=32, num_batches=3, reward_scale=0.5, seed=7)))
    assert torch.equal(again["actions"], first["actions"])
    with pytest.raises(TypeError, match="reward_scale"):
        OfflineBatches(data, reward_scale="max")
