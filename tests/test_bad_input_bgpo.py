"""Bad input to BGPO (losses, MaskedDiffusionLM, BGPO, MaskedDiffusionSFT, AdditionTask): errors that
name the argument, and a batch with a non-finite reward skipped (weights bitwise unchanged) and counted."""

import pytest
import torch
from test_bgpo_module import _trainer
from torch.utils.data import DataLoader

from lightning_bpfree.bgpo import (
    BGPO,
    AdditionTask,
    MaskedDiffusionLM,
    MaskedDiffusionSFT,
    bgpo_loss,
    diffu_grpo_loss,
    elbo_ratio_loss,
)

NAN, INF = float("nan"), float("inf")


def _policy(task: AdditionTask) -> MaskedDiffusionLM:
    torch.manual_seed(0)
    return task.make_policy(hidden_size=16, num_layers=1, num_heads=2)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_a_non_finite_reward_skips_the_update_and_is_counted(bad):
    """Issue 15, section 2 item 9: one NaN reward among 4 rollouts made every weight NaN after one step."""
    task = AdditionTask(1)
    policy = _policy(task)

    def reward(prompts, responses):
        rewards = torch.arange(len(prompts), dtype=torch.float32)
        rewards[1] = bad
        return rewards

    module = BGPO(policy, reward, task.response_length, group_size=4, num_mc_samples=2, updates_per_batch=2)
    before = [p.detach().clone() for p in policy.parameters()]
    trainer = _trainer(4)
    trainer.fit(module, DataLoader(task.prompt_dataset(4), batch_size=1))
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert module.skipped_steps == 2 and trainer.global_step == 4  # skipped steps still count
    assert trainer.callback_metrics["train/skipped_steps"] == 2
    assert [row["skipped_steps"] for row in module.history] == [1.0, 2.0]
    optimizer = trainer.optimizers[0]
    assert all(not optimizer.state[p] for p in policy.parameters())  # Adam moments untouched too


def test_finite_rewards_still_train_and_log_zero_skipped_steps():
    task = AdditionTask(1)
    policy = _policy(task)
    rewards = lambda prompts, responses: torch.arange(len(prompts), dtype=torch.float32)  # noqa: E731
    module = BGPO(policy, rewards, task.response_length, group_size=4, num_mc_samples=2, lr=1e-2)
    before = [p.detach().clone() for p in policy.parameters()]
    trainer = _trainer(1)
    trainer.fit(module, DataLoader(task.prompt_dataset(4), batch_size=1))
    assert trainer.callback_metrics["train/skipped_steps"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"lr": INF}, ValueError, "lr"),
        ({"lr": -1e-4}, ValueError, "lr"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"weight_decay": NAN}, ValueError, "weight_decay"),
        ({"group_size": 1}, ValueError, "group_size"),
        ({"group_size": 4.0}, TypeError, "group_size"),
        ({"num_mc_samples": 0}, ValueError, "num_mc_samples"),
        ({"response_length": 0}, ValueError, "response_length"),
        ({"objective": "grpo"}, ValueError, "objective"),
        ({"clip_eps": 0.0}, ValueError, "clip_eps"),
        ({"clip_eps": NAN}, ValueError, "clip_eps"),
        ({"dual_clip": 1.0}, ValueError, "dual_clip"),
        ({"updates_per_batch": 0}, ValueError, "updates_per_batch"),
        ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm"),
        ({"max_grad_norm": INF}, ValueError, "max_grad_norm"),
        ({"sampling_steps": 0}, ValueError, "sampling_steps"),
        ({"sampling_steps": 99}, ValueError, "sampling_steps"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": NAN}, ValueError, "temperature"),
        ({"prompt_mask_prob": 1.0}, ValueError, "prompt_mask_prob"),
        ({"prompt_mask_prob": -0.1}, ValueError, "prompt_mask_prob"),
        ({"suppress_token_ids": (1, 999)}, ValueError, "suppress_token_ids"),
        ({"suppress_token_ids": (1.5,)}, TypeError, "suppress_token_ids"),
        ({"suppress_token_ids": 3}, TypeError, "suppress_token_ids"),
        ({"reward_fn": 3}, TypeError, "reward_fn"),
        ({"policy": torch.nn.Linear(2, 2)}, TypeError, "policy"),
    ],
)
def test_bgpo_rejects_bad_options(kwargs, error, message):
    task = AdditionTask(1)
    arguments = {"policy": _policy(task), "reward_fn": task.reward, "response_length": task.response_length, **kwargs}
    with pytest.raises(error, match=message):
        BGPO(**arguments)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"lr": 0.0}, ValueError, "lr"),
        ({"lr": INF}, ValueError, "lr"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"policy": "bert"}, TypeError, "policy"),
    ],
)
def test_sft_rejects_bad_options(kwargs, error, message):
    arguments = {"policy": _policy(AdditionTask(1)), **kwargs}
    with pytest.raises(error, match=message):
        MaskedDiffusionSFT(**arguments)


def test_token_ids_outside_the_vocabulary_name_the_argument():
    task = AdditionTask(1)
    policy = _policy(task)
    prompts = task.prompt_dataset(2).tensors[0]
    with pytest.raises(ValueError, match="input_ids must be token ids"):
        policy(prompts + 1000)
    with pytest.raises(ValueError, match="prompt_ids must be token ids"):
        policy.generate(prompts - 100, 2)
    with pytest.raises(TypeError, match="prompt_ids must hold integer"):
        policy.generate(prompts.float(), 2)
    with pytest.raises(ValueError, match="steps"):
        policy.generate(prompts, 2, steps=3)
    with pytest.raises(ValueError, match="temperature"):
        policy.generate(prompts, 2, temperature=NAN)
    with pytest.raises(ValueError, match="response_length"):
        policy.generate(prompts, 0)


@pytest.mark.parametrize("loss", [bgpo_loss, elbo_ratio_loss])
@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((torch.zeros(3), torch.zeros(4), torch.zeros(3)), {}, ValueError, "elbo_old"),
        ((torch.zeros(3), torch.zeros(3), torch.zeros(4)), {}, ValueError, "advantages"),
        ((torch.zeros(()), torch.zeros(()), torch.zeros(())), {}, ValueError, "advantages"),
        ((torch.zeros(2, 2, 3), torch.zeros(2, 2, 3), torch.zeros(3)), {}, ValueError, "elbo_new"),
        (([0.0], torch.zeros(1), torch.zeros(1)), {}, TypeError, "elbo_new"),
        ((torch.zeros(3), torch.zeros(3), torch.zeros(3)), {"clip_eps": 1.5}, ValueError, "clip_eps"),
        ((torch.zeros(3), torch.zeros(3), torch.zeros(3)), {"dual_clip": 0.5}, ValueError, "dual_clip"),
        ((torch.zeros(3), torch.zeros(3), torch.zeros(3)), {"dual_clip": NAN}, ValueError, "dual_clip"),
    ],
)
def test_elbo_losses_reject_bad_arguments(loss, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        loss(*args, **kwargs)


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"logprobs_old": torch.zeros(2, 4)}, ValueError, "logprobs_old"),
        ({"advantages": torch.zeros(3)}, ValueError, "advantages"),
        ({"response_mask": torch.ones(2, 3)}, TypeError, "response_mask"),
        ({"logprobs_new": [[0.0]]}, TypeError, "logprobs_new"),
        ({"clip_eps": -0.2}, ValueError, "clip_eps"),
    ],
)
def test_diffu_grpo_loss_rejects_bad_arguments(change, error, message):
    arguments = {
        "logprobs_new": torch.zeros(2, 3),
        "logprobs_old": torch.zeros(2, 3),
        "advantages": torch.zeros(2),
        "response_mask": torch.ones(2, 3, dtype=torch.bool),
        **change,
    }
    with pytest.raises(error, match=message):
        diffu_grpo_loss(**arguments)


def test_loss_functions_propagate_non_finite_advantages():
    """The plain losses give NaN for NaN input (documented); the BGPO module is what skips such batches."""
    advantages = torch.tensor([1.0, NAN])
    assert torch.isnan(bgpo_loss(torch.zeros(2), torch.zeros(2), advantages))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_digits": 0}, ValueError, "num_digits"),
        ({"num_digits": 5}, ValueError, "num_digits"),
        ({"held_out_fraction": 1.0}, ValueError, "held_out_fraction"),
        ({"held_out_fraction": NAN}, ValueError, "held_out_fraction"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": "0"}, TypeError, "seed"),
    ],
)
def test_addition_task_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        AdditionTask(**kwargs)


def test_masked_lm_rejects_bad_mask_ids():
    task = AdditionTask(1)
    encoder = _policy(task).encoder
    with pytest.raises(ValueError, match="mask_token_id"):
        MaskedDiffusionLM(encoder, 10_000)
    with pytest.raises(TypeError, match="mask_token_id"):
        MaskedDiffusionLM(encoder, 1.0)
