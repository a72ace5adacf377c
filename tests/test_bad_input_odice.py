"""Bad input to ODICE (orthogonal_project, ODICE, OfflineEvaluation, OfflineDataset,
offline_dataloader, make_dataset): errors that name the argument; NaN or inf data refused."""

import numpy as np
import pytest
import torch

from lightning_bpfree.odice import ODICE, OfflineEvaluation, make_dataset, offline_dataloader, orthogonal_project
from lightning_bpfree.odice.datasets import OfflineDataset

NAN, INF = float("nan"), float("inf")
SMALL = {"value_hidden": (8,), "policy_hidden": (8,)}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"eta": INF}, ValueError, "eta"),
        ({"eta": NAN}, ValueError, "eta"),
        ({"eta": -1.0}, ValueError, "eta"),
        ({"eta": "1"}, TypeError, "eta"),
        ({"mode": "mgda"}, ValueError, "mode"),
        ({"granularity": "layer"}, ValueError, "granularity"),
        ({"g_backward": torch.ones(4)}, ValueError, "g_backward"),
        ({"g_backward": [torch.ones(3), torch.ones(3)]}, ValueError, "g_backward"),
        ({"g_forward": [1.0, 2.0, 3.0]}, TypeError, "g_forward"),
        ({"g_forward": []}, TypeError, "g_forward"),
    ],
)
def test_orthogonal_project_rejects_bad_arguments(kwargs, error, message):
    arguments = {"g_forward": torch.ones(3), "g_backward": torch.ones(3), **kwargs}
    with pytest.raises(error, match=message):
        orthogonal_project(**arguments)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"eta": INF}, ValueError, "eta"),
        ({"eta": -0.5}, ValueError, "eta"),
        ({"value_lr": -2e-4}, ValueError, "value_lr"),  # gradient ascent
        ({"value_lr": INF}, ValueError, "value_lr"),
        ({"value_lr": 0.0}, ValueError, "value_lr"),
        ({"policy_lr": NAN}, ValueError, "policy_lr"),
        ({"policy_lr": "2e-4"}, TypeError, "policy_lr"),
        ({"policy_weight_decay": -1e-4}, ValueError, "policy_weight_decay"),
        ({"max_weight": -1.0}, ValueError, "max_weight"),  # every BC weight would be -1
        ({"max_weight": 0.0}, ValueError, "max_weight"),
        ({"max_weight": NAN}, ValueError, "max_weight"),
        ({"lam": 0.0}, ValueError, "lam"),
        ({"lam": 1.5}, ValueError, "lam"),
        ({"discount": 1.0}, ValueError, "discount"),
        ({"discount": -0.1}, ValueError, "discount"),
        ({"target_update_rate": 0.0}, ValueError, "target_update_rate"),
        ({"gradient": "full"}, ValueError, "gradient"),
        ({"divergence": "kl"}, ValueError, "divergence"),
        ({"obs_dim": 0}, ValueError, "obs_dim"),
        ({"act_dim": 1.0}, TypeError, "act_dim"),
        ({"value_hidden": (8, 0)}, ValueError, r"value_hidden\[1\]"),
        ({"policy_hidden": 8}, TypeError, "policy_hidden"),
        ({"layer_norm": "true"}, TypeError, "layer_norm"),
        ({"track_cosine": 1}, TypeError, "track_cosine"),
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
        ({"action_low": [1.0], "action_high": [-1.0]}, ValueError, "action_low"),
        ({"action_low": [-1.0, -1.0]}, ValueError, "action_low"),
    ],
)
def test_odice_rejects_bad_hyperparameters(kwargs, error, message):
    arguments = {"obs_dim": 3, "act_dim": 1, **SMALL, **kwargs}
    with pytest.raises(error, match=message):
        ODICE(**arguments)


def _batch(n=4):
    generator = torch.Generator().manual_seed(0)
    return {
        "observations": torch.randn(n, 3, generator=generator),
        "actions": torch.rand(n, 1, generator=generator) * 2 - 1,
        "rewards": torch.randn(n, generator=generator),
        "next_observations": torch.randn(n, 3, generator=generator),
        "terminals": torch.zeros(n),
    }


def test_a_batch_without_terminals_names_every_missing_key():
    model = ODICE(3, 1, **SMALL)
    batch = _batch()
    del batch["terminals"], batch["rewards"]
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['rewards', 'terminals'\]"):
        model.compute_gradients(batch)


@pytest.mark.parametrize(
    "key, value, error, message",
    [
        ("rewards", NAN, ValueError, r"batch\['rewards'\] holds NaN or inf"),
        ("rewards", INF, ValueError, r"batch\['rewards'\] holds NaN or inf"),
        ("observations", NAN, ValueError, r"batch\['observations'\] holds NaN or inf"),
        ("next_observations", -INF, ValueError, r"batch\['next_observations'\] holds NaN or inf"),
        ("actions", NAN, ValueError, r"batch\['actions'\] holds NaN or inf"),
    ],
)
def test_non_finite_data_is_refused_before_any_gradient(key, value, error, message):
    model = ODICE(3, 1, **SMALL)
    batch = _batch()
    batch[key][1] = value
    with pytest.raises(error, match=message):
        model.compute_gradients(batch)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.update(rewards=b["rewards"][:, None]), r"batch\['rewards'\] must be \[B\]"),
        (lambda b: b.update(observations=b["observations"][:2]), r"has 4 rows, batch\[.observations.\] 2"),
        (lambda b: b.update(next_observations=torch.randn(4, 5)), "next_observations"),
        (lambda b: b.update(actions=[0.0] * 4), r"batch\['actions'\] must be a torch.Tensor"),
    ],
)
def test_malformed_batches_are_refused(change, message):
    model = ODICE(3, 1, **SMALL)
    batch = _batch()
    change(batch)
    with pytest.raises((ValueError, TypeError), match=message):
        model.compute_gradients(batch)


def test_a_batch_must_be_a_dict():
    with pytest.raises(TypeError, match="batch must be a dict"):
        ODICE(3, 1, **SMALL).compute_gradients([torch.zeros(3)])


def _dataset(**changes):
    arrays = {
        "observations": np.zeros((4, 3)),
        "actions": np.zeros((4, 1)),
        "rewards": np.zeros(4),
        "next_observations": np.zeros((4, 3)),
        "terminals": np.zeros(4),
        "timeouts": np.array([0, 1, 0, 1]),
    }
    arrays.update(changes)
    return OfflineDataset(**arrays, env_id="Pendulum-v1")


@pytest.mark.parametrize("field", ["observations", "actions", "rewards", "next_observations"])
def test_datasets_with_nan_or_inf_are_refused_naming_the_field(field):
    values = _dataset().__dict__[field].copy()
    values[2] = NAN
    with pytest.raises(ValueError, match=f"{field} holds 1 non-finite|{field} holds .* non-finite"):
        _dataset(**{field: values})


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"num_batches": -1}, ValueError, "num_batches"),
        ({"reward_scale": -1.0}, ValueError, "reward_scale"),
        ({"reward_scale": 0.0}, ValueError, "reward_scale"),
        ({"reward_scale": NAN}, ValueError, "reward_scale"),
        ({"reward_scale": "none"}, TypeError, "reward_scale"),
        ({"seed": -1}, ValueError, "seed"),
        ({"dataset": {"observations": np.zeros((4, 3))}}, TypeError, "dataset"),
    ],
)
def test_offline_dataloader_rejects_bad_arguments(kwargs, error, message):
    arguments = {"dataset": _dataset(), **kwargs}
    with pytest.raises(error, match=message):
        offline_dataloader(**arguments)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"kind": "medium-ish"}, ValueError, "kind"),
        ({"env_id": "Nope-v0"}, ValueError, "env_id"),
        ({"num_steps": 0}, ValueError, "num_steps"),
        ({"seed": -5}, ValueError, "seed"),
    ],
)
def test_make_dataset_rejects_bad_arguments_before_collecting(kwargs, error, message):
    arguments = {"env_id": "Pendulum-v1", "kind": "medium", **kwargs}
    with pytest.raises(error, match=message):
        make_dataset(**arguments)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"episodes": -1}, ValueError, "episodes"),
        ({"env_id": "CartPole-v0"}, ValueError, "env_id"),
    ],
)
def test_offline_evaluation_rejects_bad_arguments(kwargs, error, message):
    arguments = {"env_id": "Pendulum-v1", **kwargs}
    with pytest.raises(error, match=message):
        OfflineEvaluation(**arguments)
