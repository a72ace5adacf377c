"""Masked-diffusion LM wrapper, gradient accumulation of the three objectives, the BGPO and warm-up
LightningModules, and the addition task."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree.bgpo import BGPO, bgpo_loss
from lightning_bpfree.bgpo.losses import accumulate_policy_gradient, elbo_ratio_loss, prepare_policy_batch
from lightning_bpfree.bgpo.masked_lm import MaskedDiffusionLM, tiny_diffusion_lm
from lightning_bpfree.bgpo.module import MaskedDiffusionSFT
from lightning_bpfree.bgpo.tasks import AdditionTask


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


def _rollouts(task: AdditionTask, num: int, seed: int = 0):
    ids, response_mask = task.supervised_dataset(num, torch.Generator().manual_seed(seed)).tensors
    ids = ids.clone()
    ids[::3, -1] = (ids[::3, -1] + 1) % 10  # some wrong answers so that the advantages differ
    return ids, response_mask, torch.randn(num, generator=torch.Generator().manual_seed(seed + 1))


def _grads(policy: nn.Module) -> torch.Tensor:
    grads = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
    policy.zero_grad(set_to_none=True)
    return grads


def test_forward_mask_masks_exactly_k_response_tokens():
    task = AdditionTask(2)
    policy = task.make_policy(hidden_size=16, num_layers=1)
    ids, response_mask, _ = _rollouts(task, 64)
    counts = torch.randint(0, task.response_length + 1, (64,))
    masked = policy.forward_mask(ids, response_mask, counts, torch.Generator().manual_seed(0))
    assert masked.sum(dim=1).tolist() == counts.tolist()
    assert not bool((masked & ~response_mask).any())
    again = policy.forward_mask(ids, response_mask, counts, torch.Generator().manual_seed(0))
    assert torch.equal(masked, again)
    with pytest.raises(ValueError, match="mask_counts"):
        policy.forward_mask(ids, response_mask, torch.full((64,), task.response_length + 1))


def test_elbo_is_the_reweighted_masked_cross_entropy():
    task = AdditionTask(2)
    policy = task.make_policy(hidden_size=16, num_layers=1)
    ids, response_mask, _ = _rollouts(task, 8)
    counts = torch.tensor([1, 2, 3, 1, 2, 3, 3, 1])
    masked = policy.forward_mask(ids, response_mask, counts)
    logits = policy(ids.masked_fill(masked, task.MASK))
    nll = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    length = task.response_length
    expected = -(nll * masked).sum(1) * (length / counts) / length
    torch.testing.assert_close(policy.elbo(ids, response_mask, masked), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        policy.elbo(ids, response_mask, masked, per_token=False), expected * length, rtol=1e-5, atol=1e-5
    )


class _ScriptedEncoder(nn.Module):
    """Logits that favour token ``position + 1`` with confidence growing with the position; records inputs."""

    def __init__(self, vocab_size: int = 8) -> None:
        super().__init__()
        self.config = SimpleNamespace(is_decoder=False, vocab_size=vocab_size)
        self.calls: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        self.calls.append(input_ids.clone())
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.config.vocab_size)
        for position in range(length):
            logits[:, position, (position + 1) % 7] = float(position)
        return SimpleNamespace(logits=logits)


def test_sampler_commits_the_most_confident_positions_first():
    encoder = _ScriptedEncoder()
    policy = MaskedDiffusionLM(encoder, mask_token_id=7)
    prompt = torch.zeros(2, 2, dtype=torch.long)
    responses = policy.generate(prompt, response_length=4, steps=2, temperature=0.0)
    assert responses.tolist() == [[3, 4, 5, 6]] * 2
    # step 1 sees a fully masked response; step 2 sees the two most confident (last) positions committed
    assert encoder.calls[0][:, 2:].tolist() == [[7, 7, 7, 7]] * 2
    assert encoder.calls[1][:, 2:].tolist() == [[7, 7, 5, 6]] * 2
    sampled = policy.generate(prompt, 4, temperature=1.0, suppress_token_ids=(3,))
    assert not bool((sampled == 7).any()) and not bool((sampled == 3).any())
    with pytest.raises(ValueError, match="steps"):
        policy.generate(prompt, 4, steps=5)


def test_wrapper_rejects_decoders_and_bad_mask_ids():
    decoder = SimpleNamespace(is_decoder=True, vocab_size=10)
    with pytest.raises(ValueError, match="bidirectional"):
        _decoder_wrapper(decoder)
    with pytest.raises(ValueError, match="vocabulary"):
        tiny_diffusion_lm(10, mask_token_id=12, pad_token_id=9)


def _decoder_wrapper(config):
    module = nn.Linear(1, 1)
    module.config = config
    return MaskedDiffusionLM(module, mask_token_id=3)


@pytest.mark.parametrize("clip", [(0.2, 3.0), (None, None)])
def test_bgpo_accumulation_equals_one_backward_and_the_exact_gradient_at_theta_old(clip):
    task = AdditionTask(2)
    policy = task.make_policy(hidden_size=16, num_layers=1)
    ids, response_mask, advantages = _rollouts(task, 24)
    batch = prepare_policy_batch(policy, ids, response_mask, advantages, "bgpo", num_mc_samples=4)
    accumulate_policy_gradient(policy, batch, *clip)
    accumulated = _grads(policy)
    elbos = torch.stack([policy.elbo(ids, response_mask, m) for m in batch.masked])
    bgpo_loss(elbos, batch.old_values, advantages, *clip).backward()
    all_at_once = _grads(policy)
    batch.objective = "naive"
    accumulate_policy_gradient(policy, batch, *clip)
    exact = _grads(policy)
    torch.testing.assert_close(accumulated, all_at_once, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(accumulated, exact, rtol=1e-4, atol=1e-7)
    assert accumulated.abs().max() > 0


def test_accumulation_away_from_theta_old_still_matches_one_backward():
    task = AdditionTask(2)
    policy = task.make_policy(hidden_size=16, num_layers=1)
    ids, response_mask, advantages = _rollouts(task, 24)
    batch = prepare_policy_batch(policy, ids, response_mask, advantages, "bgpo", num_mc_samples=3)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stats = accumulate_policy_gradient(policy, batch)
    accumulated = _grads(policy)
    elbos = torch.stack([policy.elbo(ids, response_mask, m) for m in batch.masked])
    loss = bgpo_loss(elbos, batch.old_values, advantages)
    loss.backward()
    torch.testing.assert_close(accumulated, _grads(policy), rtol=1e-4, atol=1e-7)
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert stats["loss"] != pytest.approx(elbo_ratio_loss(elbos, batch.old_values, advantages).item(), rel=1e-6)


def test_diffu_grpo_batch_gives_a_gradient_and_unit_ratio_at_theta_old():
    task = AdditionTask(2)
    policy = task.make_policy(hidden_size=16, num_layers=1)
    ids, response_mask, advantages = _rollouts(task, 16)
    batch = prepare_policy_batch(policy, ids, response_mask, advantages, "diffu-grpo", prompt_mask_prob=0.5)
    assert not bool((batch.masked[0] & response_mask).any())
    stats = accumulate_policy_gradient(policy, batch)
    assert stats["log_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert stats["loss"] == pytest.approx(-advantages.mean().item(), abs=1e-5)
    assert _grads(policy).abs().max() > 0


def test_bgpo_module_raises_the_reward_of_a_simple_preference():
    """Reward 1 when the first answer digit is 7: from a random policy (p ~ 0.1) BGPO must learn it."""
    L.seed_everything(0)
    task = AdditionTask(1)
    policy = task.make_policy(hidden_size=32, num_layers=1)
    module = BGPO(
        policy,
        lambda prompts, responses: (responses[:, 0] == 7).float(),
        response_length=task.response_length,
        group_size=8,
        num_mc_samples=2,
        lr=3e-3,
        suppress_token_ids=task.special_tokens,
    )
    prompts = task.prompt_dataset(256, generator=torch.Generator().manual_seed(0))
    _trainer(25).fit(module, DataLoader(prompts, batch_size=8, shuffle=True))
    rewards = [h["reward"] for h in module.history]
    assert len(rewards) == 25
    assert sum(rewards[:5]) / 5 < 0.3
    assert sum(rewards[-5:]) / 5 > 0.6


def test_bgpo_module_rejects_bad_options():
    task = AdditionTask(1)
    policy = task.make_policy(hidden_size=16, num_layers=1)
    with pytest.raises(ValueError, match="objective"):
        BGPO(policy, task.reward, task.response_length, objective="ppo")
    with pytest.raises(ValueError, match="group_size"):
        BGPO(policy, task.reward, task.response_length, group_size=1)
    with pytest.raises(ValueError, match="clip_eps"):
        BGPO(policy, task.reward, task.response_length, clip_eps=2.0)
    with pytest.raises(TypeError, match="MaskedDiffusionLM"):
        BGPO(nn.Linear(2, 2), task.reward, task.response_length)


def test_supervised_warmup_lowers_the_masked_diffusion_loss():
    L.seed_everything(0)
    task = AdditionTask(1)
    policy = task.make_policy(hidden_size=32, num_layers=1)
    data = task.supervised_dataset(2048, torch.Generator().manual_seed(0))
    ids, response_mask = data.tensors[0][:256], data.tensors[1][:256]
    masked = torch.ones_like(response_mask) & response_mask

    def full_mask_loss() -> float:
        with torch.no_grad():
            return -policy.elbo(ids, response_mask, masked).mean().item()

    before = full_mask_loss()
    _trainer(60).fit(MaskedDiffusionSFT(policy, lr=3e-3), DataLoader(data, batch_size=64, shuffle=True))
    after = full_mask_loss()
    assert after < 0.6 * before


def test_addition_task_encodes_and_scores_exact_answers():
    task = AdditionTask(2, seed=0)
    prompts = task.encode_prompts(torch.tensor([37, 99]), torch.tensor([5, 99]))
    assert prompts.tolist() == [[3, 7, 10, 0, 5, 11], [9, 9, 10, 9, 9, 11]]
    a, b = task.decode_operands(prompts)
    assert a.tolist() == [37, 99] and b.tolist() == [5, 99]
    responses = torch.tensor([[0, 4, 2], [1, 9, 7]])
    assert task.reward(prompts, responses).tolist() == [1.0, 0.0]
    train = set((task._pairs["train"]).tolist())
    assert train.isdisjoint(task._pairs["held_out"].tolist())
    with pytest.raises(ValueError, match="num_digits"):
        AdditionTask(0)
    with pytest.raises(ValueError, match="responses"):
        task.reward(prompts, responses[:, :2])


def test_bgpo_module_accepts_plain_tensor_batches_only():
    task = AdditionTask(1)
    module = BGPO(task.make_policy(hidden_size=16, num_layers=1), task.reward, task.response_length)
    with pytest.raises(TypeError, match="prompt ids"):
        module.training_step(TensorDataset(torch.zeros(3)), 0)
