"""ODICE numerics in plain PyTorch: the orthogonal projection, f-divergences, residuals and networks.

ODICE (Mao et al., "ODICE: Revealing the Mystery of Distribution Correction Estimation via
Orthogonal-gradient Update", ICLR 2024) learns a state value V by minimising

    (1 - lam) * E_{s ~ D}[V(s)] + lam * E_{(s, a, r, s') ~ D}[f*(r + gamma (1 - d) V(s') - V(s))]

where f* is the convex conjugate of an f-divergence. The gradient of the second term has a *forward*
part (through V(s)) and a *backward* part (through V(s')). Keeping only the forward part is the usual
semi-gradient; keeping both is the true gradient, whose two parts often cancel. ODICE keeps the forward
part and adds only the component of the backward part orthogonal to it (:func:`orthogonal_project`).
The policy is then extracted by weighted behaviour cloning with weights (f')^{-1}(forward residual).

This file has no Lightning import; :mod:`lightning_bpfree.odice.module` wraps it in a LightningModule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_bpfree.validation import (
    check_choice,
    check_finite_tensor,
    check_int_sequence,
    check_nonnegative_float,
    check_positive_int,
)

F_DIVERGENCES = ("pearson_chi2", "reverse_kl")
GRADIENTS = ("orthogonal", "semi", "true")
PROJECTION_MODES = ("odice", "pcgrad", "none")
GRANULARITIES = ("global", "per_tensor")

Gradients = TypeVar("Gradients", Tensor, Sequence[Tensor])


# --------------------------------------------------------------------------------------------------
# The projection


def _as_list(grads: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
    if isinstance(grads, Tensor):
        return [grads]
    if isinstance(grads, (list, tuple)) and all(isinstance(g, Tensor) for g in grads) and len(grads) > 0:
        return list(grads)
    raise TypeError(f"{name} must be a Tensor or a non-empty list/tuple of Tensors, got {type(grads).__name__}")


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x.reshape(-1) * y.reshape(-1)).sum() for x, y in zip(a, b))


def orthogonal_project(
    g_forward: Gradients,
    g_backward: Gradients,
    eta: float = 1.0,
    *,
    mode: str = "odice",
    granularity: str = "global",
    eps: float = 1e-10,
) -> Gradients:
    """Combine a primary gradient with the part of a secondary gradient that does not fight it.

    ``mode="odice"`` (the paper's rule, applied whatever the sign of the inner product)::

        g_forward + eta * (g_backward - <g_forward, g_backward> / max(||g_forward||^2, eps) * g_forward)

    ``mode="pcgrad"`` removes the parallel component only when the two conflict
    (``<g_forward, g_backward> < 0``), as PCGrad does for multi-task losses; ``mode="none"`` returns
    ``g_forward + eta * g_backward`` (the unprojected sum, for ablations).

    Args:
        g_forward: the primary gradient: one tensor, or a list of tensors (one per parameter).
        g_backward: the secondary gradient, same structure and shapes as ``g_forward``.
        eta: weight of the (projected) secondary gradient, ``>= 0``; ``eta=0`` returns ``g_forward``.
        mode: ``"odice"``, ``"pcgrad"`` or ``"none"``.
        granularity: ``"global"`` flattens every tensor of a list into one vector before projecting
            (the paper's choice); ``"per_tensor"`` projects each tensor on its own.
        eps: floor of ``||g_forward||^2`` so a zero forward gradient does not divide by zero.

    Returns:
        The combined gradient with the structure of ``g_forward``: a tensor for a tensor, a list of
        tensors of the same shapes for a list.
    """
    check_choice("mode", mode, PROJECTION_MODES)
    check_choice("granularity", granularity, GRANULARITIES)
    check_nonnegative_float("eta", eta)
    forward, backward = _as_list(g_forward, "g_forward"), _as_list(g_backward, "g_backward")
    if len(forward) != len(backward):
        raise ValueError(f"g_forward has {len(forward)} tensors but g_backward has {len(backward)}")
    for i, (f, b) in enumerate(zip(forward, backward)):
        if f.shape != b.shape:
            raise ValueError(f"tensor {i}: g_forward has shape {tuple(f.shape)}, g_backward {tuple(b.shape)}")
    groups = [[i] for i in range(len(forward))] if granularity == "per_tensor" else [list(range(len(forward)))]
    out: list[Tensor] = [f.clone() for f in forward]
    for group in groups:
        f_group, b_group = [forward[i] for i in group], [backward[i] for i in group]
        if mode == "none":
            coefficient = torch.zeros((), dtype=forward[0].dtype, device=forward[0].device)
        else:
            coefficient = _dot(f_group, b_group) / _dot(f_group, f_group).clamp_min(eps)
            if mode == "pcgrad":
                coefficient = coefficient.clamp_max(0.0)
        for i in group:
            out[i] = forward[i] + eta * (backward[i] - coefficient * forward[i])
    return out[0] if isinstance(g_forward, Tensor) else type(g_forward)(out) if isinstance(g_forward, tuple) else out


def gradient_cosine(g_a: Tensor | Sequence[Tensor], g_b: Tensor | Sequence[Tensor], eps: float = 1e-20) -> float:
    """Cosine similarity of two gradients, each flattened over all its tensors (0 if either is zero)."""
    a, b = _as_list(g_a, "g_a"), _as_list(g_b, "g_b")
    norm = (_dot(a, a) * _dot(b, b)).sqrt()
    return float(_dot(a, b) / norm) if float(norm) > eps else 0.0


# --------------------------------------------------------------------------------------------------
# f-divergences


def f_star(residual: Tensor, divergence: str = "pearson_chi2") -> Tensor:
    """Convex conjugate f*(y) of the f-divergence, elementwise.

    ``pearson_chi2`` (f(x) = (x - 1)^2): with w = max(y / 2 + 1, 0), f*(y) = y w - (w - 1)^2
    (equal to y + y^2 / 4 for y >= -2 and to -1 below). ``reverse_kl`` (f(x) = x log x): f*(y) = exp(y - 1).
    """
    if divergence == "pearson_chi2":
        weight = (residual / 2 + 1).clamp_min(0.0)
        return residual * weight - (weight - 1) ** 2
    if divergence == "reverse_kl":
        return torch.exp(residual - 1)
    raise ValueError(f"divergence must be one of {F_DIVERGENCES}, got {divergence!r}")


def f_prime_inverse(residual: Tensor, divergence: str = "pearson_chi2") -> Tensor:
    """(f')^{-1}(y), elementwise: the optimal density ratio d*(s, a) / d_D(s, a) for a residual y.

    ``pearson_chi2``: max(y, 0), as the paper's code uses for its policy weights (the analytic inverse of
    f'(x) = 2 (x - 1) would be max(y / 2 + 1, 0)). ``reverse_kl``: exp(y - 1).
    """
    if divergence == "pearson_chi2":
        return residual.clamp_min(0.0)
    if divergence == "reverse_kl":
        return torch.exp(residual - 1)
    raise ValueError(f"divergence must be one of {F_DIVERGENCES}, got {divergence!r}")


# --------------------------------------------------------------------------------------------------
# Networks


def mlp(sizes: Sequence[int], layer_norm: bool = False) -> nn.Sequential:
    """Linear layers of ``sizes`` with ReLU between them (and LayerNorm before each ReLU if asked)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            if layer_norm:
                layers.append(nn.LayerNorm(sizes[i + 1]))
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class TwinValue(nn.Module):
    """Two independent value MLPs. ``heads(s)`` is ``[2, B]``; ``forward(s)`` their minimum, ``[B]``."""

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (256, 256), layer_norm: bool = True, num_heads: int = 2):
        super().__init__()
        check_int_sequence("value_hidden", hidden)
        check_positive_int("num_heads", num_heads)
        self.nets = nn.ModuleList(mlp([obs_dim, *hidden, 1], layer_norm) for _ in range(num_heads))

    def heads(self, observations: Tensor) -> Tensor:
        return torch.stack([net(observations).squeeze(-1) for net in self.nets])

    def forward(self, observations: Tensor) -> Tensor:
        return self.heads(observations).min(dim=0).values


class GaussianPolicy(nn.Module):
    """Gaussian policy on actions in [-1, 1]: mean ``tanh(mlp(s))``, state-independent log std."""

    log_std_range = (-5.0, 2.0)

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (1024, 1024)):
        super().__init__()
        check_int_sequence("policy_hidden", hidden)
        self.net = mlp([obs_dim, *hidden, act_dim])
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, observations: Tensor) -> torch.distributions.Normal:
        mean = torch.tanh(self.net(observations))
        std = self.log_std.clamp(*self.log_std_range).exp()
        return torch.distributions.Normal(mean, std.expand_as(mean))

    def log_prob(self, observations: Tensor, actions: Tensor) -> Tensor:
        """log pi(a | s), ``[B]``, for actions ``[B, act_dim]`` (clipped to [-1, 1] first)."""
        return self(observations).log_prob(actions.clamp(-1.0, 1.0)).sum(-1)

    @torch.no_grad()
    def act(self, observations: Tensor, deterministic: bool = True) -> Tensor:
        dist = self(observations)
        action = dist.mean if deterministic else dist.sample()
        return action.clamp(-1.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Residuals and losses

BATCH_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals")
VALUE_KEYS = ("observations", "rewards", "next_observations", "terminals")  # what value_losses reads


def check_batch(batch: Mapping[str, Tensor], keys: Sequence[str] = BATCH_KEYS) -> None:
    """Refuse an ODICE batch that lacks ``keys``, has inconsistent shapes or holds NaN / inf.

    Shapes: ``observations`` and ``next_observations`` ``[B, obs_dim]``, ``actions`` ``[B, act_dim]``,
    ``rewards`` and ``terminals`` ``[B]``. Non-finite data is refused (a ValueError naming the key)
    rather than trained on: one NaN reward would make every value weight NaN after one step.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict of tensors with the keys {list(keys)}, got {type(batch).__name__}")
    missing = [key for key in keys if key not in batch]
    if missing:
        raise ValueError(f"batch lacks the key(s) {missing}; an ODICE batch needs {list(keys)}")
    for key in keys:
        if not isinstance(batch[key], Tensor):
            raise TypeError(f"batch[{key!r}] must be a torch.Tensor, got {type(batch[key]).__name__}")
    for key in keys:
        value = batch[key]
        rank = 2 if key in ("observations", "next_observations", "actions") else 1
        if value.dim() != rank or value.shape[0] == 0:
            expected = "[B, dim]" if rank == 2 else "[B]"
            raise ValueError(f"batch[{key!r}] must be {expected} with B >= 1, got shape {tuple(value.shape)}")
        if value.shape[0] != batch[keys[0]].shape[0]:
            raise ValueError(f"batch[{key!r}] has {value.shape[0]} rows, batch[{keys[0]!r}] {batch[keys[0]].shape[0]}")
        if value.is_floating_point():
            check_finite_tensor(f"batch[{key!r}]", value, consequence="ODICE refuses the batch rather than train on it")
    if "next_observations" in keys and batch["next_observations"].shape != batch["observations"].shape:
        raise ValueError(
            f"batch['next_observations'] has shape {tuple(batch['next_observations'].shape)}, "
            f"batch['observations'] {tuple(batch['observations'].shape)}"
        )


def value_losses(
    value: TwinValue,
    target_value: nn.Module,
    batch: dict[str, Tensor],
    *,
    gradient: str,
    lam: float,
    eta: float,
    discount: float,
    divergence: str,
) -> dict[str, Tensor]:
    """The pieces of the ODICE value objective whose gradients :func:`orthogonal_project` combines.

    Returns scalar losses ``linear`` ((1 - lam) E[V(s)]), ``forward`` and ``backward`` (whose
    gradients are g_f and g_b) and ``residual`` ``[heads, B]`` (detached, for the policy weights).

    - ``"orthogonal"`` / ``"semi"``: forward residual r + gamma (1 - d) Vbar(s') - V(s) with the EMA target
      Vbar, so its gradient flows through s only; backward residual r + gamma (1 - d) V(s') - Vbar(s),
      gradient through s' only, scaled by ``eta``.
    - ``"true"``: one residual r + gamma (1 - d) V(s') - V(s) with both sides live. Its gradient is
      split exactly into the part through V(s) (``forward``) and the part through V(s')
      (``backward``, not scaled by eta) by evaluating f* at the same residual with the other side
      detached, so ``forward + backward`` has the true gradient.
    """
    check_batch(batch, VALUE_KEYS)
    obs, next_obs = batch["observations"], batch["next_observations"]
    reward = batch["rewards"]
    not_done = 1.0 - batch["terminals"].to(reward.dtype)
    v = value.heads(obs)
    v_next = value.heads(next_obs)
    if gradient == "true":
        residual = reward + discount * not_done * v_next - v
        forward_residual = reward + discount * not_done * v_next.detach() - v
        backward_residual = reward + discount * not_done * v_next - v.detach()
        backward_scale = 1.0
    else:
        with torch.no_grad():
            target_v, target_v_next = target_value(obs), target_value(next_obs)
        forward_residual = reward + discount * not_done * target_v_next - v
        backward_residual = reward + discount * not_done * v_next - target_v
        residual = forward_residual
        backward_scale = eta
    return {
        "linear": (1.0 - lam) * v.mean(),
        "forward": lam * f_star(forward_residual, divergence).mean(),
        "backward": lam * backward_scale * f_star(backward_residual, divergence).mean(),
        "residual": residual.detach(),
    }


def policy_weights(residual: Tensor, divergence: str = "pearson_chi2", max_weight: float = 100.0) -> Tensor:
    """Behaviour-cloning weights min((f')^{-1}(residual), max_weight), averaged over value heads: ``[B]``."""
    weight = f_prime_inverse(residual, divergence).clamp_max(max_weight)
    return weight.mean(0) if weight.dim() > 1 else weight


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, rate: float) -> None:
    """target <- (1 - rate) target + rate source, parameter by parameter."""
    for p_target, p in zip(target.parameters(), source.parameters()):
        p_target.lerp_(p, rate)


# --------------------------------------------------------------------------------------------------
# One training step's gradients


def _flat_norm(grads: Sequence[Tensor]) -> float:
    return float(torch.cat([g.reshape(-1) for g in grads]).norm())


def _plain_backward(loss: Tensor, retain_graph: bool = False) -> None:
    loss.backward(retain_graph=retain_graph)


def _grads_of(params: Sequence[Tensor], loss: Tensor, backward: Callable[..., Any]) -> list[Tensor]:
    # through ``backward`` (not torch.autograd.grad) so that a Lightning strategy or precision plugin
    # sees every backward; the graph is kept for the next part of the same objective
    for p in params:
        p.grad = None
    backward(loss, retain_graph=True)
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]


def compute_odice_gradients(
    value: TwinValue,
    target_value: nn.Module,
    policy: GaussianPolicy,
    batch: dict[str, Tensor],
    *,
    max_weight: float,
    track_cosine: bool,
    backward: Callable[..., Any] | None = None,
    **objective: Any,
) -> dict[str, float]:
    """Fill ``.grad`` of every value and policy parameter for one ODICE step; return diagnostics.

    Value parameters get g_linear + combine(g_f, g_b) where combine is :func:`orthogonal_project`
    (``"orthogonal"``), g_f (``"semi"``) or g_f + g_b (``"true"``); policy parameters get the
    gradient of the weighted behaviour-cloning loss ``-mean(w * log pi(a | s))`` with
    ``w = policy_weights(residual)``. Nothing is stepped.

    Args:
        value, target_value, policy: the twin value net, its EMA target and the Gaussian policy.
        batch: ``observations [B, obs_dim]``, ``actions [B, act_dim]`` (already in [-1, 1]),
            ``rewards [B]``, ``next_observations [B, obs_dim]``, ``terminals [B]``.
        max_weight: cap of the behaviour-cloning weights.
        track_cosine: also compute g_b in ``"semi"`` mode (one more backward) for the cosine.
        backward: ``backward(loss, retain_graph=...)`` runs a backward (default ``loss.backward``;
            the LightningModule passes ``manual_backward``).
        **objective: the keyword arguments of :func:`value_losses` (``gradient``, ``lam``, ``eta``,
            ``discount``, ``divergence``), all required; the paper's defaults live in one place,
            :class:`~lightning_bpfree.odice.ODICE`.

    Returns:
        ``value_loss``, ``policy_loss``, ``residual_mean``, ``weight_mean``, ``grad_forward_norm`` and,
        when g_b was computed, ``cos_forward_backward`` and ``grad_backward_norm`` (Python floats).
    """
    check_batch(batch)
    backward = backward or _plain_backward
    losses = value_losses(value, target_value, batch, **objective)
    gradient, divergence = objective["gradient"], objective["divergence"]
    value_params = list(value.parameters())
    g_forward = _grads_of(value_params, losses["forward"], backward)
    g_backward = _grads_of(value_params, losses["backward"], backward) if gradient != "semi" or track_cosine else None
    if gradient == "orthogonal":
        combined = orthogonal_project(g_forward, g_backward, eta=1.0)  # eta is already inside g_backward
    elif gradient == "true":
        combined = [f + b for f, b in zip(g_forward, g_backward)]
    else:
        combined = g_forward

    weights = policy_weights(losses["residual"], divergence, max_weight)
    policy_loss = -(weights * policy.log_prob(batch["observations"], batch["actions"])).mean()
    for p in [*value_params, *policy.parameters()]:
        p.grad = None
    backward(losses["linear"] + policy_loss)
    for p, g in zip(value_params, combined):
        p.grad = g if p.grad is None else p.grad + g

    diagnostics = {
        "value_loss": float((losses["linear"] + losses["forward"]).detach()),
        "policy_loss": float(policy_loss.detach()),
        "residual_mean": float(losses["residual"].mean()),
        "weight_mean": float(weights.mean()),
        "grad_forward_norm": _flat_norm(g_forward),
    }
    if g_backward is not None:
        diagnostics["cos_forward_backward"] = gradient_cosine(g_forward, g_backward)
        diagnostics["grad_backward_norm"] = _flat_norm(g_backward)
    return diagnostics
