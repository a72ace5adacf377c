"""ODICE in a Lightning Trainer: one optimizer step per batch, the evaluation callback, learning from data."""

import copy
import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger

from lightning_bpfree.odice import ODICE
from lightning_bpfree.odice.behaviour import make_dataset
from lightning_bpfree.odice.callback import OfflineEvaluation
from lightning_bpfree.odice.datasets import OfflineDataset, offline_dataloader, rollout, single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: intra-op threads only add contention (and on a shared machine, a lot of it)."""
    with single_thread():
        yield


logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class _Recorder(Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    name, version = "recorder", 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _trainer(steps, callbacks, logger=False):
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )


def test_trainer_steps_once_per_batch_and_callback_evaluates_on_schedule():
    data = rollout("Pendulum-v1", None, 200, seed=0, num_envs=1)
    model = ODICE.for_dataset(data, value_hidden=(16, 16), policy_hidden=(16, 16))
    before = copy.deepcopy(model.state_dict())
    evaluation = OfflineEvaluation("Pendulum-v1", every_n_steps=3, episodes=1)
    recorder = _Recorder()
    trainer = _trainer(6, [evaluation], logger=recorder)
    trainer.fit(model, offline_dataloader(data, batch_size=32, num_batches=6))
    assert trainer.global_step == 6  # value and policy share one optimizer step per batch
    assert [row["step"] for row in evaluation.history] == [0.0, 3.0, 6.0]
    # each evaluation row holds the mean cos(g_f, g_b) of the training steps since the one before
    cosines = [metrics["train/cos_forward_backward"] for _, metrics in recorder.rows if "train/cos_forward_backward" in metrics]
    assert len(cosines) == 6
    for row, window in zip(evaluation.history[1:], (cosines[:3], cosines[3:])):
        assert row["cos_forward_backward"] == pytest.approx(sum(window) / 3, rel=1e-6)
    eval_rows = [metrics for _, metrics in recorder.rows if "eval/normalized_return" in metrics]
    assert len(eval_rows) == 3
    assert any("train/cos_forward_backward" in metrics for _, metrics in recorder.rows)
    # the value net moved, the target followed it by an EMA step (moved, but less)
    after = model.state_dict()
    key = "value.nets.0.0.weight"
    moved = (after[key] - before[key]).norm()
    target_moved = (after["target_" + key] - before["target_" + key]).norm()
    assert moved > 0 and 0 < target_moved < moved


def test_train_diagnostics_are_logged_every_n_steps_but_kept_every_step():
    data = rollout("Pendulum-v1", None, 200, seed=0, num_envs=1)
    model = ODICE.for_dataset(data, value_hidden=(8, 8), policy_hidden=(8, 8), log_every_n_steps=3)
    recorder = _Recorder()
    seen = []

    class _Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(pl_module.last_diagnostics["value_loss"])

    _trainer(7, [_Watch()], logger=recorder).fit(model, offline_dataloader(data, batch_size=16, num_batches=7))
    logged = [metrics["train/value_loss"] for _, metrics in recorder.rows if "train/value_loss" in metrics]
    # Lightning repeats the last logged value in between: new values come from batches 0, 3 and 6 only
    assert len(logged) == 7 and len(set(logged)) == 3
    assert [seen[0], seen[3], seen[6]] == pytest.approx(sorted(set(logged), key=logged.index))
    assert len(seen) == 7 and len(set(seen)) == 7
    with pytest.raises(ValueError, match="log_every_n_steps"):
        ODICE(3, 1, log_every_n_steps=0)


def test_evaluation_rejects_bad_options():
    with pytest.raises(ValueError, match="every_n_steps"):
        OfflineEvaluation("Pendulum-v1", every_n_steps=0)
    with pytest.raises(ValueError, match="env_id"):
        OfflineEvaluation("Pong-v5")


def test_short_training_clones_the_better_actions():
    # expert and random transitions mixed: the weighted behaviour cloning must raise the policy's
    # likelihood of the expert's actions, and raise it more than that of the random actions
    expert = make_dataset("Pendulum-v1", "expert", num_steps=1000, seed=0)
    random = make_dataset("Pendulum-v1", "random", num_steps=1000, seed=0)
    data = OfflineDataset.concatenate([expert, random])
    L.seed_everything(0, verbose=False)
    model = ODICE.for_dataset(
        data, lam=0.5, value_hidden=(32, 32), policy_hidden=(32, 32), value_lr=1e-3, policy_lr=1e-3
    )

    def log_likelihood(part):
        with torch.no_grad():
            obs, unit_actions = torch.as_tensor(part.observations), torch.as_tensor(part.actions) / 2.0
            return float(model.policy.log_prob(obs, unit_actions).mean())

    expert_before, random_before = log_likelihood(expert), log_likelihood(random)
    _trainer(200, []).fit(model, offline_dataloader(data, batch_size=128, num_batches=200))
    expert_gain = log_likelihood(expert) - expert_before
    random_gain = log_likelihood(random) - random_before
    assert expert_gain > 0.1 and expert_gain > random_gain, (expert_gain, random_gain)


@pytest.mark.slow
def test_training_on_medium_data_improves_the_return():
    data = make_dataset("Pendulum-v1", "medium", num_steps=10_000, seed=0)
    L.seed_everything(0, verbose=False)
    model = ODICE.for_dataset(
        data, lam=0.5, value_hidden=(64, 64), policy_hidden=(64, 64), value_lr=1e-3, policy_lr=1e-3
    )
    # with the paper's reward scale the orthogonal rule needs a few thousand steps on this data
    evaluation = OfflineEvaluation("Pendulum-v1", every_n_steps=1000, episodes=10)
    _trainer(6000, [evaluation]).fit(model, offline_dataloader(data, batch_size=128, num_batches=6000))
    start = evaluation.history[0]["normalized_return"]
    best_late = max(row["normalized_return"] for row in evaluation.history[-2:])
    assert best_late > start + 20, evaluation.history
