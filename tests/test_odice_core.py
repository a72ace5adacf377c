"""ODICE numerics: the projection against its closed form, f-divergences, gradient composition vs autograd."""

import math

import pytest
import torch

from lightning_bpfree.odice import ODICE, orthogonal_project
from lightning_bpfree.odice.core import f_prime_inverse, f_star, gradient_cosine
from lightning_bpfree.odice.datasets import single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: intra-op threads only add contention (and on a shared machine, a lot of it)."""
    with single_thread():
        yield


def _pair(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype), torch.randn(*shape, generator=g, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# orthogonal_project


@pytest.mark.parametrize("eta", [1.0, 0.3, 2.5])
def test_projection_equals_closed_form_and_is_orthogonal(eta):
    g_f, g_b = _pair(37)
    out = orthogonal_project(g_f, g_b, eta=eta)
    expected = g_f + eta * (g_b - (g_f @ g_b) / (g_f @ g_f) * g_f)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # what was added to g_f has no component along g_f
    assert abs(float((out - g_f) @ g_f)) < 1e-10 * float(g_f.norm() * g_b.norm())
    # and the added part is the backward gradient minus its projection: same norm as the rejection
    rejection = g_b - (g_f @ g_b) / (g_f @ g_f) * g_f
    assert math.isclose(float((out - g_f).norm()), eta * float(rejection.norm()), rel_tol=1e-10)


def test_eta_zero_is_the_semi_gradient():
    g_f, g_b = _pair(4, 5)
    assert torch.equal(orthogonal_project(g_f, g_b, eta=0.0), g_f)


def test_list_is_projected_globally_and_keeps_shapes():
    shapes = [(3, 4), (4,), (2, 2, 2)]
    g_f = [_pair(*s, seed=i)[0] for i, s in enumerate(shapes)]
    g_b = [_pair(*s, seed=i)[1] for i, s in enumerate(shapes)]
    out = orthogonal_project(g_f, g_b, eta=0.7)
    assert isinstance(out, list) and [tuple(o.shape) for o in out] == shapes
    flat_f = torch.cat([g.reshape(-1) for g in g_f])
    flat_b = torch.cat([g.reshape(-1) for g in g_b])
    flat_out = torch.cat([o.reshape(-1) for o in out])
    torch.testing.assert_close(flat_out, orthogonal_project(flat_f, flat_b, eta=0.7), rtol=1e-12, atol=1e-12)
    # the global projection is not the per-tensor one
    per_tensor = orthogonal_project(g_f, g_b, eta=0.7, granularity="per_tensor")
    assert not torch.allclose(torch.cat([o.reshape(-1) for o in per_tensor]), flat_out)
    tuple_out = orthogonal_project(tuple(g_f), tuple(g_b), eta=0.7)
    assert isinstance(tuple_out, tuple)


def test_per_tensor_projects_each_tensor_on_its_own():
    g_f = [_pair(6, seed=1)[0], _pair(3, 2, seed=2)[0]]
    g_b = [_pair(6, seed=1)[1], _pair(3, 2, seed=2)[1]]
    out = orthogonal_project(g_f, g_b, granularity="per_tensor")
    for o, f, b in zip(out, g_f, g_b):
        torch.testing.assert_close(o, orthogonal_project(f, b), rtol=1e-12, atol=1e-12)
        assert abs(float(((o - f) * f).sum())) < 1e-10


def test_pcgrad_projects_only_on_conflict():
    g_f = torch.tensor([1.0, 0.0], dtype=torch.float64)
    agreeing = torch.tensor([1.0, 2.0], dtype=torch.float64)
    conflicting = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(orthogonal_project(g_f, agreeing, mode="pcgrad"), g_f + agreeing)
    torch.testing.assert_close(orthogonal_project(g_f, conflicting, mode="pcgrad"), torch.tensor([1.0, 2.0]).double())
    # the ODICE rule removes the parallel part whatever its sign
    torch.testing.assert_close(orthogonal_project(g_f, agreeing, mode="odice"), torch.tensor([1.0, 2.0]).double())
    torch.testing.assert_close(orthogonal_project(g_f, conflicting, mode="none", eta=0.5), g_f + 0.5 * conflicting)


def test_zero_forward_gradient_does_not_divide_by_zero():
    g_b = torch.tensor([0.5, -2.0])
    out = orthogonal_project(torch.zeros(2), g_b, eta=2.0)
    torch.testing.assert_close(out, 2.0 * g_b)


def test_projection_rejects_bad_input():
    g = torch.ones(3)
    with pytest.raises(ValueError, match="mode"):
        orthogonal_project(g, g, mode="orthogonal")
    with pytest.raises(ValueError, match="granularity"):
        orthogonal_project(g, g, granularity="layer")
    with pytest.raises(ValueError, match="eta"):
        orthogonal_project(g, g, eta=-1.0)
    with pytest.raises(ValueError, match="eta"):
        orthogonal_project(g, g, eta=float("nan"))
    with pytest.raises(ValueError, match="shape"):
        orthogonal_project(g, torch.ones(4))
    with pytest.raises(ValueError, match="tensors"):
        orthogonal_project([g, g], [g])
    with pytest.raises(TypeError, match="g_backward"):
        orthogonal_project(g, [1.0, 2.0, 3.0])


def test_gradient_cosine():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0]])]
    b = [torch.tensor([1.0, 1.0]), torch.tensor([[0.0]])]
    assert math.isclose(gradient_cosine(a, b), 1 / math.sqrt(2), rel_tol=1e-6)
    assert gradient_cosine(torch.zeros(3), torch.ones(3)) == 0.0


# --------------------------------------------------------------------------------------------------
# f-divergences


def test_pearson_chi2_conjugate_closed_form_and_definition():
    y = torch.linspace(-6, 6, 241, dtype=torch.float64)
    closed = torch.where(y >= -2, y + y**2 / 4, torch.full_like(y, -1.0))
    torch.testing.assert_close(f_star(y, "pearson_chi2"), closed)
    # f*(y) = sup_{x >= 0} x y - (x - 1)^2, by brute force over x
    x = torch.linspace(0, 10, 20001, dtype=torch.float64)
    brute = (x[None] * y[:, None] - (x[None] - 1) ** 2).max(dim=1).values
    torch.testing.assert_close(f_star(y, "pearson_chi2"), brute, atol=1e-6, rtol=0)
    torch.testing.assert_close(f_prime_inverse(y, "pearson_chi2"), y.clamp_min(0))


def test_reverse_kl_conjugate_closed_form_and_definition():
    y = torch.linspace(-3, 2, 51, dtype=torch.float64)
    torch.testing.assert_close(f_star(y, "reverse_kl"), torch.exp(y - 1))
    x = torch.linspace(1e-9, 10, 200001, dtype=torch.float64)
    brute = (x[None] * y[:, None] - x[None] * torch.log(x[None])).max(dim=1).values
    torch.testing.assert_close(f_star(y, "reverse_kl"), brute, atol=1e-6, rtol=0)
    torch.testing.assert_close(f_prime_inverse(y, "reverse_kl"), torch.exp(y - 1))


def test_unknown_divergence_raises():
    with pytest.raises(ValueError, match="pearson_chi2"):
        f_star(torch.zeros(2), "kl")
    with pytest.raises(ValueError, match="divergence"):
        ODICE(3, 1, divergence="chi2")


# --------------------------------------------------------------------------------------------------
# Gradient composition of the LightningModule against autograd


def _tiny(gradient, **options):
    torch.manual_seed(0)
    model = ODICE(3, 2, gradient=gradient, value_hidden=(8, 8), policy_hidden=(8,), **options).double()
    with torch.no_grad():  # make the target differ from the online value net
        for p in model.value.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    batch = {
        "observations": torch.randn(16, 3, generator=g, dtype=torch.float64),
        "actions": torch.rand(16, 2, generator=g, dtype=torch.float64) * 2 - 1,
        "rewards": torch.randn(16, generator=g, dtype=torch.float64),
        "next_observations": torch.randn(16, 3, generator=g, dtype=torch.float64),
        "terminals": (torch.rand(16, generator=g) < 0.25).double(),
    }
    return model, batch


def _reference_gradients(model, batch, gradient):
    """Independent autograd computation of the ODICE update, written from the paper's equations."""
    hp = model.hparams
    params = list(model.value.parameters())
    s, s2, r = batch["observations"], batch["next_observations"], batch["rewards"]
    not_done = 1 - batch["terminals"]
    v = torch.stack([net(s).squeeze(-1) for net in model.value.nets])
    v2 = torch.stack([net(s2).squeeze(-1) for net in model.value.nets])
    with torch.no_grad():
        vbar = torch.stack([net(s).squeeze(-1) for net in model.target_value.nets]).min(0).values
        vbar2 = torch.stack([net(s2).squeeze(-1) for net in model.target_value.nets]).min(0).values

    def conj(y):
        w = (y / 2 + 1).clamp_min(0)
        return y * w - (w - 1) ** 2

    def grad(loss):
        return torch.autograd.grad(loss, params, retain_graph=True)

    g_lin = grad((1 - hp.lam) * v.mean())
    forward_residual = r + hp.discount * not_done * vbar2 - v
    cosine = None
    if gradient == "true":
        residual = r + hp.discount * not_done * v2 - v
        g_td = grad(hp.lam * conj(residual).mean())
        value_grads = [a + b for a, b in zip(g_lin, g_td)]
        policy_residual = residual.detach()
    else:
        g_f = torch.cat([g.reshape(-1) for g in grad(hp.lam * conj(forward_residual).mean())])
        g_b = torch.cat(
            [g.reshape(-1) for g in grad(hp.lam * hp.eta * conj(r + hp.discount * not_done * v2 - vbar).mean())]
        )
        cosine = float((g_f @ g_b) / (g_f.norm() * g_b.norm()))
        if gradient == "orthogonal":
            g_td = g_f + g_b - (g_f @ g_b) / (g_f @ g_f) * g_f
        else:
            g_td = g_f
        value_grads, offset = [], 0
        for p, gl in zip(params, g_lin):
            value_grads.append(gl + g_td[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        policy_residual = forward_residual.detach()
    weight = policy_residual.clamp(0, 100).mean(0)
    mean = torch.tanh(model.policy.net(s))
    log_prob = torch.distributions.Normal(mean, model.policy.log_std.exp()).log_prob(batch["actions"]).sum(-1)
    policy_grads = torch.autograd.grad(-(weight * log_prob).mean(), list(model.policy.parameters()))
    return value_grads, policy_grads, cosine


@pytest.mark.parametrize("gradient", ["orthogonal", "semi", "true"])
def test_module_gradients_match_autograd(gradient):
    model, batch = _tiny(gradient, eta=0.8)
    expected_value, expected_policy, expected_cosine = _reference_gradients(model, batch, gradient)
    diagnostics = model.compute_gradients(batch)
    for p, g in zip(model.value.parameters(), expected_value):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
    for p, g in zip(model.policy.parameters(), expected_policy):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
    if expected_cosine is not None:  # cos(g_f, g_b) from the reference's own forward and backward gradients
        assert diagnostics["cos_forward_backward"] == pytest.approx(expected_cosine, rel=1e-9, abs=1e-12)


def test_true_gradient_split_sums_to_the_full_gradient():
    # the "true" mode computes forward and backward parts separately; their sum is the full gradient
    model, batch = _tiny("true")
    expected_value, _, _ = _reference_gradients(model, batch, "true")
    model.compute_gradients(batch)
    total = torch.cat([p.grad.reshape(-1) for p in model.value.parameters()])
    torch.testing.assert_close(total, torch.cat([g.reshape(-1) for g in expected_value]), rtol=1e-9, atol=1e-12)


def test_orthogonal_with_eta_zero_equals_semi_gradient():
    orthogonal, batch = _tiny("orthogonal", eta=0.0)
    semi, _ = _tiny("semi")
    orthogonal.compute_gradients(batch)
    semi.compute_gradients(batch)
    for a, b in zip(orthogonal.parameters(), semi.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def test_module_rejects_bad_options():
    with pytest.raises(ValueError, match="gradient"):
        ODICE(3, 1, gradient="residual")
    with pytest.raises(ValueError, match="lam"):
        ODICE(3, 1, lam=1.5)
    with pytest.raises(ValueError, match="eta"):
        ODICE(3, 1, eta=-0.1)
    with pytest.raises(ValueError, match="obs_dim"):
        ODICE(0, 1)
    with pytest.raises(ValueError, match="action_low"):
        ODICE(3, 1, action_low=[1.0], action_high=[-1.0])


def test_act_maps_to_environment_units():
    model = ODICE(3, 1, policy_hidden=(8,), value_hidden=(8,), action_low=[-2.0], action_high=[2.0])
    with torch.no_grad():
        model.policy.net[-1].bias.fill_(50.0)  # tanh saturates at +1
    action = model.act(torch.zeros(4, 3).numpy())
    assert action.shape == (4, 1)
    assert abs(float(action.min()) - 2.0) < 1e-5
