"""NoProp schedules and update coefficients against their closed forms."""

import math

import pytest
import torch

from lightning_bpfree.noprop.schedules import (
    LearnableNoiseSchedule,
    cosine_alpha_bar,
    ddim_update,
    dt_inference_coefficients,
    dt_loss_weights,
    kl_to_standard_normal,
    signal_to_noise,
)


def test_cosine_schedule_matches_closed_form():
    steps, offset, clip = 10, 0.008, 0.999
    alpha_bar = cosine_alpha_bar(steps, offset, clip)

    def f(s: float) -> float:
        return math.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2

    expected = [min(f(1 - t / steps) / f(0), clip) for t in range(steps + 1)]
    torch.testing.assert_close(alpha_bar, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert alpha_bar[0] < 1e-20 and alpha_bar[-1] == clip
    assert bool((alpha_bar[1:] > alpha_bar[:-1]).all())


def test_dt_loss_weights_are_scaled_snr_differences():
    alpha_bar = cosine_alpha_bar(6)
    weights = dt_loss_weights(alpha_bar, eta=0.1)
    snr = alpha_bar / (1 - alpha_bar)
    for t in range(1, 7):
        assert weights[t - 1].item() == pytest.approx(6 * 0.1 / 2 * (snr[t] - snr[t - 1]).item(), rel=1e-12)
    # The weights telescope to T * eta / 2 * (SNR(T) - SNR(0)).
    assert weights.sum().item() == pytest.approx(0.3 * (snr[-1] - snr[0]).item(), rel=1e-12)


def test_dt_inference_coefficients_equal_closed_form_and_gaussian_posterior():
    alpha_bar = cosine_alpha_bar(10)
    a, b, c = dt_inference_coefficients(alpha_bar)
    for t in range(1, 11):
        ab_t, ab_prev = alpha_bar[t].item(), alpha_bar[t - 1].item()
        alpha_prev = ab_prev / ab_t
        assert a[t - 1].item() == pytest.approx(math.sqrt(ab_t) * (1 - alpha_prev) / (1 - ab_prev), rel=1e-12)
        assert b[t - 1].item() == pytest.approx(math.sqrt(alpha_prev) * (1 - ab_t) / (1 - ab_prev), rel=1e-12)
        assert c[t - 1].item() == pytest.approx((1 - ab_t) * (1 - alpha_prev) / (1 - ab_prev), rel=1e-12)
        # Gaussian conditioning of the joint (z_t, z_{t-1}) with z_{t-1} = sqrt(alpha_prev) z_t + noise:
        covariance = math.sqrt(alpha_prev) * (1 - ab_t)
        slope = covariance / (1 - ab_prev)
        assert b[t - 1].item() == pytest.approx(slope, rel=1e-12)
        assert a[t - 1].item() == pytest.approx(math.sqrt(ab_t) - slope * math.sqrt(ab_prev), abs=1e-12)
        assert c[t - 1].item() == pytest.approx((1 - ab_t) - slope * covariance, abs=1e-12)


def test_dt_update_with_true_label_keeps_the_marginals_monte_carlo():
    generator = torch.Generator().manual_seed(0)
    alpha_bar = cosine_alpha_bar(10)
    a, b, c = dt_inference_coefficients(alpha_bar.float())
    label = torch.tensor([1.5, -0.5])
    z = torch.randn(200_000, 2, generator=generator)  # z_0 ~ N(0, I)
    for t in range(10):
        z = a[t] * label + b[t] * z + c[t].sqrt() * torch.randn(z.shape, generator=generator)
    torch.testing.assert_close(z.mean(0), alpha_bar[-1].sqrt().float() * label, atol=0.01, rtol=0)
    torch.testing.assert_close(z.var(0), (1 - alpha_bar[-1]).float().expand(2), atol=2e-4, rtol=0.05)


def test_kl_matches_torch_distributions():
    embeddings = torch.randn(5, 7, dtype=torch.float64)
    alpha_bar_0 = 0.03
    ours = kl_to_standard_normal(embeddings, alpha_bar_0)
    q = torch.distributions.Normal(math.sqrt(alpha_bar_0) * embeddings, math.sqrt(1 - alpha_bar_0))
    p = torch.distributions.Normal(torch.zeros_like(embeddings), torch.ones_like(embeddings))
    torch.testing.assert_close(ours, torch.distributions.kl_divergence(q, p).sum(-1))


def test_learnable_schedule_endpoints_monotone_and_derivative():
    schedule = LearnableNoiseSchedule(gamma_min=-4.0, gamma_max=4.0).double()
    ends = schedule.alpha_bar(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.sigmoid(torch.tensor([-4.0, 4.0], dtype=torch.float64)))
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    alpha_bar = schedule.alpha_bar(grid)
    assert bool((alpha_bar[1:] > alpha_bar[:-1]).all())
    snr, slope = schedule.snr_and_derivative(grid)
    torch.testing.assert_close(snr, signal_to_noise(alpha_bar))
    t = grid.clone().requires_grad_(True)
    autograd_slope = torch.autograd.grad(schedule.snr_and_derivative(t)[0].sum(), t)[0]
    torch.testing.assert_close(slope, autograd_slope)
    # The integral of SNR' over [0, 1] is SNR(1) - SNR(0) (trapezoid rule on a fine grid).
    integral = torch.trapezoid(slope, grid).item()
    assert integral == pytest.approx(math.exp(4.0) - math.exp(-4.0), rel=1e-3)


def test_learnable_schedule_linear_case_closed_form():
    schedule = LearnableNoiseSchedule(gamma_min=-3.0, gamma_max=5.0)
    with torch.no_grad():
        schedule.out_weight.fill_(-60.0)  # softplus(-60) ~ 0: the network reduces to its linear part
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    gamma = 5.0 - 8.0 * t
    torch.testing.assert_close(schedule.gamma(t), gamma)
    snr, slope = schedule.snr_and_derivative(t)
    torch.testing.assert_close(slope, 8.0 * torch.exp(-gamma))


def test_ddim_update_is_exact_on_the_noise_path_and_composes():
    label, noise = torch.randn(4, 3), torch.randn(4, 3)
    alpha_bars = torch.tensor([0.05, 0.4, 0.9])

    def path(alpha_bar):
        return alpha_bar.sqrt() * label + (1 - alpha_bar).sqrt() * noise

    one_step = ddim_update(path(alpha_bars[0]), label, alpha_bars[0], alpha_bars[2])
    torch.testing.assert_close(one_step, path(alpha_bars[2]))
    guess = torch.randn(4, 3)
    two_steps = ddim_update(ddim_update(path(alpha_bars[0]), guess, alpha_bars[0], alpha_bars[1]), guess,
                            alpha_bars[1], alpha_bars[2])  # fmt: skip
    torch.testing.assert_close(two_steps, ddim_update(path(alpha_bars[0]), guess, alpha_bars[0], alpha_bars[2]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=4, max_alpha_bar=1.0), "max_alpha_bar"),
        (dict(num_steps=4, offset=0.0), "offset"),
    ],
)
def test_cosine_schedule_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cosine_alpha_bar(**kwargs)


def test_learnable_schedule_rejects_inverted_range():
    with pytest.raises(ValueError, match="gamma_min"):
        LearnableNoiseSchedule(gamma_min=2.0, gamma_max=1.0)
