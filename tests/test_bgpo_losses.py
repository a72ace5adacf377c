"""BGPO numerics: the surrogate loss against hand values and the exact ELBO-ratio objective, Monte
Carlo mask counts, group-relative advantages, the diffu-GRPO baseline loss."""

import math

import pytest
import torch

from lightning_bpfree.bgpo import bgpo_loss
from lightning_bpfree.bgpo.losses import (
    diffu_grpo_loss,
    elbo_ratio_loss,
    group_relative_advantages,
    stratified_mask_counts,
)

# (advantage, delta, expected per-element loss, expected d loss / d elbo_new) with clip 0.2, dual clip 3
HAND_CASES = [
    (1.0, 0.1, -1.1, -1.0),  # A > 0, ratio 1 + delta inside the clip range
    (1.0, 0.5, -1.2, 0.0),  # A > 0, ratio 1.5 clipped at 1.2: no gradient
    (1.0, -0.5, -0.5, -1.0),  # A > 0, ratio 0.5 below 0.8: PPO keeps the unclipped (larger) loss
    (-1.0, 0.1, math.exp(0.1), math.exp(0.1)),  # A < 0, ratio exp(delta) inside the range
    (-1.0, 0.5, math.exp(0.5), math.exp(0.5)),  # A < 0, ratio 1.65 > 1.2 kept (pessimistic side)
    (-1.0, 1.5, 3.0, 0.0),  # A < 0, ratio 4.48 > c = 3: dual clip caps the loss at -A * c
    (-1.0, -0.5, 0.8, 0.0),  # A < 0, ratio 0.61 clipped at 0.8
    (2.0, -1.5, 1.0, -2.0),  # A > 0 with 1 + delta = -0.5 <= 0: finite, linear, pushes delta up
    (0.0, 0.7, 0.0, 0.0),  # A = 0: nothing
    (-2.0, 1000.0, 6.0, 0.0),  # exp(1000) would overflow: capped by the dual clip, gradient 0 (not NaN)
    (3.0, 1000.0, -3.6, 0.0),  # A > 0 branch never evaluates exp(delta)
]


def test_bgpo_loss_matches_hand_values_and_gradients():
    advantages = torch.tensor([case[0] for case in HAND_CASES])
    deltas = torch.tensor([case[1] for case in HAND_CASES])
    old = torch.linspace(-3.0, -1.0, len(HAND_CASES))
    new = (old + deltas).requires_grad_(True)
    loss = bgpo_loss(new, old, advantages, clip_eps=0.2, dual_clip=3.0)
    loss.backward()
    n = len(HAND_CASES)
    expected_loss = sum(case[2] for case in HAND_CASES) / n
    expected_grad = torch.tensor([case[3] for case in HAND_CASES]) / n
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    torch.testing.assert_close(new.grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_one_sample_calls_accumulate_to_the_all_sample_call():
    torch.manual_seed(1)
    n_t, batch = 6, 10
    weights = torch.randn(3, requires_grad=True)
    features = torch.randn(n_t, batch, 3)
    old = (features @ weights).detach() + 0.3 * torch.randn(n_t, batch)  # theta != theta_old: clipping active
    advantages = torch.randn(batch)
    bgpo_loss(features @ weights, old, advantages).backward()
    all_at_once = weights.grad.clone()
    weights.grad = None
    accumulated_value = 0.0
    for j in range(n_t):
        loss_j = bgpo_loss(features[j] @ weights, old[j], advantages) / n_t
        loss_j.backward()
        accumulated_value += loss_j.item()
    torch.testing.assert_close(weights.grad, all_at_once, rtol=1e-5, atol=1e-7)
    assert accumulated_value == pytest.approx(bgpo_loss(features @ weights, old, advantages).item(), rel=1e-5)


@pytest.mark.parametrize("clip", [(0.2, 3.0), (None, None)])
def test_surrogate_equals_exact_objective_in_value_and_gradient_at_theta_old(clip):
    torch.manual_seed(2)
    n_t, batch = 8, 12
    weights = torch.randn(4, requires_grad=True)
    features = torch.randn(n_t, batch, 4)
    advantages = torch.randn(batch)
    elbo_old = (features @ weights).detach()
    surrogate = bgpo_loss(features @ weights, elbo_old, advantages, *clip)
    (grad_surrogate,) = torch.autograd.grad(surrogate, weights)
    exact = elbo_ratio_loss(features @ weights, elbo_old, advantages, *clip)
    (grad_exact,) = torch.autograd.grad(exact, weights)
    # closed form at theta_old: ratio 1, gradient -mean_b A_b * mean_j d l_j / d theta
    closed_form = -(advantages[None, :, None] * features).mean(dim=(0, 1))
    assert surrogate.item() == pytest.approx(exact.item(), abs=1e-6)
    assert surrogate.item() == pytest.approx(-advantages.mean().item(), abs=1e-6)
    torch.testing.assert_close(grad_surrogate, grad_exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_surrogate, closed_form, rtol=1e-5, atol=1e-6)


def test_surrogate_objective_is_a_lower_bound_of_the_exact_objective():
    torch.manual_seed(3)
    n_t, batch = 5, 400
    old = torch.randn(n_t, batch)
    new = old + 0.5 * torch.randn(n_t, batch)
    advantages = torch.randn(batch)
    for b in range(batch):  # per sequence, not only on average
        args = (new[:, b : b + 1], old[:, b : b + 1], advantages[b : b + 1])
        surrogate_loss = bgpo_loss(*args, clip_eps=None, dual_clip=None)
        exact_loss = elbo_ratio_loss(*args, clip_eps=None, dual_clip=None)
        assert surrogate_loss.item() >= exact_loss.item() - 1e-6
    gap = bgpo_loss(new, old, advantages, None, None) - elbo_ratio_loss(new, old, advantages, None, None)
    assert gap.item() > 1e-3  # strict where the draws disagree


def test_bgpo_loss_rejects_bad_input():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="same shape"):
        bgpo_loss(torch.zeros(3, 4), torch.zeros(2, 4), x)
    with pytest.raises(ValueError, match="advantages"):
        bgpo_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(5))
    with pytest.raises(ValueError, match="clip_eps"):
        bgpo_loss(x, x, x, clip_eps=1.5)
    with pytest.raises(ValueError, match="dual_clip"):
        bgpo_loss(x, x, x, dual_clip=0.5)
    with pytest.raises(TypeError, match="elbo_old"):
        bgpo_loss(x, [0.0] * 4, x)


def test_stratified_mask_counts_cover_the_ratios_evenly():
    lengths = torch.tensor([8, 8, 5, 1])
    counts = stratified_mask_counts(8, lengths, torch.Generator().manual_seed(0))
    assert counts.shape == (8, 4)
    assert bool((counts >= 1).all()) and bool((counts <= lengths).all())
    assert sorted(counts[:, 0].tolist()) == list(range(1, 9))  # n = L: a permutation of 1..L
    assert counts[:, 3].tolist() == [1] * 8
    quarter = stratified_mask_counts(4, torch.full((50,), 8), torch.Generator().manual_seed(1))
    gaps = (quarter.diff(dim=0) % 8).unique().tolist()
    assert gaps == [2]  # evenly spaced by L / n around the circle
    # every count is marginally uniform on 1..L (the ELBO estimate stays unbiased)
    first = stratified_mask_counts(3, torch.full((20000,), 5), torch.Generator().manual_seed(2))[1]
    frequencies = torch.bincount(first, minlength=6)[1:].float() / first.numel()
    torch.testing.assert_close(frequencies, torch.full((5,), 0.2), atol=0.015, rtol=0)
    with pytest.raises(ValueError, match="num_samples"):
        stratified_mask_counts(0, lengths)
    with pytest.raises(ValueError, match="length"):
        stratified_mask_counts(2, torch.tensor([3, 0]))


def test_group_relative_advantages_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    advantages = group_relative_advantages(rewards, group_size=4)
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=0)
    centred = group_relative_advantages(rewards, group_size=4, normalize_std=False)
    torch.testing.assert_close(centred, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="group_size"):
        group_relative_advantages(rewards, group_size=1)
    with pytest.raises(ValueError, match="divisible"):
        group_relative_advantages(rewards, group_size=3)


def test_diffu_grpo_loss_hand_value():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.2], [0.1, 0.4, 0.9]]))
    new = torch.log(torch.tensor([[0.55, 0.9, 0.3], [0.1, 0.2, 0.3]]))
    response = torch.tensor([[False, True, True], [False, True, True]])
    advantages = torch.tensor([1.0, -1.0])
    # row 0 (A=+1): ratios 1.8 -> clipped 1.2, 1.5 -> 1.2: losses -1.2, -1.2
    # row 1 (A=-1): ratios 0.5 -> max(0.5, 0.8) = 0.8, 1/3 -> 0.8: losses 0.8, 0.8
    loss = diffu_grpo_loss(new, old, advantages, response)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="same"):
        diffu_grpo_loss(new, old[:, :2], advantages, response)
