"""Noise schedules and update coefficients of NoProp (Li, Teh, Pascanu, arXiv 2503.24322), plain PyTorch.

Time runs the opposite way to DDPM: ``z_0`` is pure noise and ``z_T`` (or ``z_1`` in continuous time)
is the class embedding ``u_y``. The marginal of every latent is

    q(z_t | y) = N(sqrt(alpha_bar_t) * u_y, (1 - alpha_bar_t) * I),

with ``alpha_bar`` increasing in ``t``. Discrete time defines ``alpha_{t-1} = alpha_bar_{t-1} / alpha_bar_t``
so that ``z_{t-1} = sqrt(alpha_{t-1}) z_t + sqrt(1 - alpha_{t-1}) eps`` (the forward, noising direction).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_bpfree.validation import check_float, check_positive_float, check_positive_int


def cosine_alpha_bar(num_steps: int, offset: float = 0.008, max_alpha_bar: float = 0.999) -> Tensor:
    """The cosine schedule read from the label end: signal fraction of ``z_0 .. z_T``.

    ``alpha_bar_t = f(1 - t/T) / f(0)`` with ``f(s) = cos^2((s + offset) / (1 + offset) * pi / 2)``
    (Nichol and Dhariwal's schedule with time reversed), clipped above at ``max_alpha_bar`` so that the
    last latent keeps some noise and its signal-to-noise ratio stays finite.

    Args:
        num_steps: ``T``, the number of blocks (>= 1).
        offset: the small offset ``s`` of the cosine schedule (> 0).
        max_alpha_bar: upper clip of ``alpha_bar``, in (0, 1).

    Returns:
        float64 ``[T + 1]``, non-decreasing, ``alpha_bar_0`` ~ 0 (noise) and ``alpha_bar_T = max_alpha_bar``.
    """
    check_positive_int("num_steps", num_steps)
    check_positive_float("offset", offset)
    check_float("max_alpha_bar", max_alpha_bar, low=0.0, high=1.0, low_open=True, high_open=True)
    remaining = 1.0 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((remaining + offset) / (1.0 + offset) * math.pi / 2) ** 2
    return (f / f[-1]).clamp(0.0, max_alpha_bar)


def signal_to_noise(alpha_bar: Tensor) -> Tensor:
    """``SNR = alpha_bar / (1 - alpha_bar)``, elementwise."""
    return alpha_bar / (1.0 - alpha_bar)


def dt_loss_weights(alpha_bar: Tensor, eta: float = 0.1) -> Tensor:
    """Weights of the per-block denoising losses of NoProp-DT.

    Block ``t`` (1-based) is trained with ``(T * eta / 2) * (SNR(t) - SNR(t-1)) * ||u_hat_t - u_y||^2``.

    Args:
        alpha_bar: ``[T + 1]`` schedule from :func:`cosine_alpha_bar`.
        eta: the loss scale (the paper uses 0.1 for DT).

    Returns:
        ``[T]``; entry ``t - 1`` is block ``t``'s weight.
    """
    num_steps = alpha_bar.numel() - 1
    snr = signal_to_noise(alpha_bar)
    return num_steps * eta / 2 * (snr[1:] - snr[:-1])


def dt_inference_coefficients(alpha_bar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Coefficients of the NoProp-DT inference update ``z_t = a_t u_hat_t + b_t z_{t-1} + sqrt(c_t) eps``.

    They are the mean and variance of the Gaussian posterior ``q(z_t | z_{t-1}, y)`` with ``u_y``
    replaced by the block's prediction:

        a_t = sqrt(alpha_bar_t) (1 - alpha_{t-1}) / (1 - alpha_bar_{t-1})
        b_t = sqrt(alpha_{t-1}) (1 - alpha_bar_t) / (1 - alpha_bar_{t-1})
        c_t = (1 - alpha_bar_t) (1 - alpha_{t-1}) / (1 - alpha_bar_{t-1})

    Args:
        alpha_bar: ``[T + 1]``, non-decreasing, ``alpha_bar < 1``.

    Returns:
        ``(a, b, c)``, each ``[T]``; entry ``t - 1`` belongs to block ``t``.
    """
    if alpha_bar.dim() != 1 or alpha_bar.numel() < 2:
        raise ValueError(f"alpha_bar must be 1-D with >= 2 entries, got shape {tuple(alpha_bar.shape)}")
    if bool((alpha_bar >= 1).any()) or bool((alpha_bar < 0).any()):
        raise ValueError("alpha_bar must lie in [0, 1)")
    previous, current = alpha_bar[:-1], alpha_bar[1:]
    alpha_previous = previous / current
    a = current.sqrt() * (1 - alpha_previous) / (1 - previous)
    b = alpha_previous.sqrt() * (1 - current) / (1 - previous)
    c = (1 - current) * (1 - alpha_previous) / (1 - previous)
    return a, b, c


def kl_to_standard_normal(class_embeddings: Tensor, alpha_bar_0: Tensor | float) -> Tensor:
    """``KL(q(z_0 | y) || N(0, I))`` for ``q(z_0 | y) = N(sqrt(alpha_bar_0) u_y, (1 - alpha_bar_0) I)``.

    Args:
        class_embeddings: ``u_y``, ``[B, d]``.
        alpha_bar_0: signal fraction of ``z_0`` (scalar, or ``[]`` tensor carrying gradients).

    Returns:
        ``[B]`` in nats.
    """
    alpha_bar_0 = torch.as_tensor(alpha_bar_0, dtype=class_embeddings.dtype, device=class_embeddings.device)
    dim = class_embeddings.shape[-1]
    squared_norm = class_embeddings.pow(2).sum(-1)
    return 0.5 * (alpha_bar_0 * squared_norm - dim * alpha_bar_0 - dim * torch.log1p(-alpha_bar_0))


def sample_marginal(class_embeddings: Tensor, alpha_bar: Tensor) -> Tensor:
    """A reparameterised draw of ``z ~ N(sqrt(alpha_bar) u, (1 - alpha_bar) I)``.

    Args:
        class_embeddings: ``u``, ``[B, d]``.
        alpha_bar: a scalar or ``[B]`` (one signal fraction per example).

    Returns:
        ``[B, d]``; differentiable in both ``class_embeddings`` and ``alpha_bar``.
    """
    alpha_bar = torch.as_tensor(alpha_bar, dtype=class_embeddings.dtype, device=class_embeddings.device)
    if alpha_bar.dim() == 1:
        alpha_bar = alpha_bar.unsqueeze(-1)
    noise = torch.randn_like(class_embeddings)
    return alpha_bar.sqrt() * class_embeddings + (1 - alpha_bar).sqrt() * noise


class LearnableNoiseSchedule(nn.Module):
    """NoProp-CT's learnable schedule ``alpha_bar(t) = sigmoid(-gamma(t))`` on ``t`` in [0, 1].

    ``gamma(t) = gamma_max + (gamma_min - gamma_max) * gamma_bar(t)`` where ``gamma_bar`` is a monotone
    network normalised to ``gamma_bar(0) = 0`` and ``gamma_bar(1) = 1`` (positive weights, as in
    Kingma et al.'s variational diffusion models). So ``alpha_bar(0) = sigmoid(-gamma_max)`` (mostly noise)
    and ``alpha_bar(1) = sigmoid(-gamma_min)`` (mostly label) whatever the learned shape, and
    ``SNR(t) = exp(-gamma(t))``.

    Args:
        gamma_min: ``gamma(1)``; ``-4`` puts ``alpha_bar(1)`` at 0.982.
        gamma_max: ``gamma(0)``; ``4`` puts ``alpha_bar(0)`` at 0.018.
        hidden: width of the monotone network.
    """

    def __init__(self, gamma_min: float = -4.0, gamma_max: float = 4.0, hidden: int = 64) -> None:
        super().__init__()
        check_float("gamma_min", gamma_min)
        check_float("gamma_max", gamma_max)
        if not gamma_min < gamma_max:
            raise ValueError(f"gamma_min must be < gamma_max, got {gamma_min} and {gamma_max}")
        check_positive_int("hidden", hidden)
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        # Raw weights pass through softplus, which keeps every layer increasing in t.
        self.linear_weight = nn.Parameter(torch.tensor(1.0))
        self.linear_bias = nn.Parameter(torch.tensor(0.0))
        self.hidden_weight = nn.Parameter(torch.randn(hidden) * 0.5)
        self.hidden_bias = nn.Parameter(torch.randn(hidden) * 0.5)
        self.out_weight = nn.Parameter(torch.full((hidden,), -3.0))

    def _unnormalised(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``gamma_tilde(t)`` and its derivative in ``t``, both shaped like ``t``."""
        w1, w2, w3 = (
            F.softplus(self.linear_weight),
            F.softplus(self.hidden_weight),
            F.softplus(self.out_weight),
        )
        inner = w1 * t + self.linear_bias
        hidden = torch.sigmoid(inner.unsqueeze(-1) * w2 + self.hidden_bias)
        value = inner + (hidden * w3).sum(-1)
        slope = w1 + (hidden * (1 - hidden) * w2 * w3).sum(-1) * w1
        return value, slope

    def gamma_bar(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Monotone ``gamma_bar(t)`` in [0, 1] and ``d gamma_bar / dt`` (> 0), both shaped like ``t``."""
        value, slope = self._unnormalised(t)
        ends, _ = self._unnormalised(torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device))
        span = ends[1] - ends[0]
        return (value - ends[0]) / span, slope / span

    def gamma(self, t: Tensor) -> Tensor:
        """``gamma(t)``, decreasing from ``gamma_max`` at 0 to ``gamma_min`` at 1."""
        return self.gamma_max + (self.gamma_min - self.gamma_max) * self.gamma_bar(t)[0]

    def alpha_bar(self, t: Tensor) -> Tensor:
        """Signal fraction ``sigmoid(-gamma(t))``, shaped like ``t``."""
        return torch.sigmoid(-self.gamma(t))

    def snr_and_derivative(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``SNR(t) = exp(-gamma(t))`` and ``SNR'(t) = (gamma_max - gamma_min) gamma_bar'(t) SNR(t)``."""
        gamma_bar, slope = self.gamma_bar(t)
        snr = torch.exp(-(self.gamma_max + (self.gamma_min - self.gamma_max) * gamma_bar))
        return snr, (self.gamma_max - self.gamma_min) * slope * snr

    def forward(self, t: Tensor) -> Tensor:
        return self.alpha_bar(t)


def ddim_update(z: Tensor, predicted_embedding: Tensor, alpha_bar_now: Tensor, alpha_bar_next: Tensor) -> Tensor:
    """One deterministic step of the probability-flow ODE of ``q(z_t | y)`` with the label held at ``u_hat``.

    The noise implied by ``z`` is kept and the signal moves to the next signal fraction:
    ``z' = sqrt(ab') u_hat + sqrt(1 - ab') (z - sqrt(ab) u_hat) / sqrt(1 - ab)``. This integrates the
    ODE exactly when ``u_hat`` is constant over the step (the exponential-integrator form of Euler).

    Args:
        z: ``[B, d]`` latent at the current time.
        predicted_embedding: ``u_hat``, ``[B, d]``.
        alpha_bar_now: signal fraction at the current time, a scalar or ``[B]``, in [0, 1).
        alpha_bar_next: signal fraction at the next time, a scalar or ``[B]``, in [0, 1).

    Returns:
        ``[B, d]``, the latent at the next time.
    """
    if alpha_bar_now.dim() == 1:
        alpha_bar_now, alpha_bar_next = alpha_bar_now.unsqueeze(-1), alpha_bar_next.unsqueeze(-1)
    implied_noise = (z - alpha_bar_now.sqrt() * predicted_embedding) / (1 - alpha_bar_now).sqrt()
    return alpha_bar_next.sqrt() * predicted_embedding + (1 - alpha_bar_next).sqrt() * implied_noise
