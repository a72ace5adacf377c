"""The ZO-Bench optimizers against hand-written references on a tiny model."""

import math
import weakref

import pytest
import torch
from torch import nn

from lightning_bpfree.zo import (
    OPTIMIZERS,
    ForwardGradient,
    SeededNoise,
    ZOAdam,
    ZOSGDConservative,
    ZOSGDMomentum,
    ZOSGDSign,
    make_optimizer,
    mix_seed,
)


def tiny_regression(seed: int = 0, dtype=torch.float64):
    """float64 by default: a float32 loss of ~10 has a rounding step of 1e-6, which a finite
    difference over eps = 1e-3 turns into gradient noise of 1e-3, so that two runs apart by one
    rounding of the weights would drift apart; in float64 they agree to 1e-12."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=generator, dtype=dtype)
    y = x @ torch.randn(6, 1, generator=generator, dtype=dtype)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=dtype) * 0.4)
    return model, x, y


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


def zo_gradient(reference, x, y, seed, step, num_queries, eps):
    """MeZO's two-sided estimate by hand: the list of (projected gradient, z per parameter) per query."""
    noise = SeededNoise()
    out = []
    with torch.no_grad():
        theta = snapshot(reference)
        for q in range(num_queries):
            zs = [noise.noise_like(p, mix_seed(seed, step, q), i) for i, p in enumerate(reference.parameters())]
            for p, t, z in zip(reference.parameters(), theta, zs):
                p.copy_(torch.add(t, z, alpha=eps))
            plus = loss_of(reference, x, y).float().item()  # as the optimizer reads a loss
            for p, t, z in zip(reference.parameters(), theta, zs):
                p.copy_(torch.add(t, z, alpha=-eps))
            minus = loss_of(reference, x, y).float().item()
            for p, t in zip(reference.parameters(), theta):
                p.copy_(t)
            out.append(((plus - minus) / (2 * eps), zs))
    return out


def averaged_gradient(estimates):
    """mean_q g_q z_q, accumulated in float32 (the noise's dtype) as the optimizers do, as float64."""
    q = len(estimates)
    out = []
    for i in range(len(estimates[0][1])):
        total = estimates[0][1][i] * (estimates[0][0] / q)
        for g, zs in estimates[1:]:
            total.add_(zs[i], alpha=g / q)
        out.append(total.double())
    return out


def close(a, b):
    for u, v in zip(a, b):
        torch.testing.assert_close(u.detach(), v.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sign_mode", ["elementwise", "projected"])
def test_sign_update_equals_its_formula(sign_mode):
    model, x, y = tiny_regression()
    reference, _, _ = tiny_regression()
    lr, eps, wd, q = 0.01, 1e-3, 0.1, 2
    opt = ZOSGDSign(model.parameters(), lr=lr, eps=eps, weight_decay=wd, num_queries=q, seed=3, sign_mode=sign_mode)
    for step in range(3):
        before = snapshot(model)
        opt.step(lambda: loss_of(model, x, y))
        if sign_mode == "elementwise":  # every coordinate moved by a multiple of lr / q (apart from the decay)
            for old, new in zip(before, model.parameters()):
                multiples = (new.detach() - old * (1 - lr * wd)) / (lr / q)
                # a sum of q signs: an integer in -q, -q + 2, ..., q (z is never exactly 0)
                torch.testing.assert_close(multiples, multiples.round(), rtol=0, atol=1e-9)
                assert set(multiples.round().flatten().tolist()) <= set(range(-q, q + 1, 2))
            # both agreeing (+-q) and cancelling (0) queries occur in 3 steps of 65 coordinates
            moves = torch.cat([(new.detach() - old * (1 - lr * wd)).flatten() for old, new in zip(before, model.parameters())])  # fmt: skip
            assert {-q, 0, q} <= set((moves / (lr / q)).round().tolist())
        estimates = zo_gradient(reference, x, y, 3, step, q, eps)
        with torch.no_grad():
            for i, p in enumerate(reference.parameters()):
                direction = sum(
                    (torch.sign(g * zs[i]) if sign_mode == "elementwise" else math.copysign(1.0, g) * zs[i])
                    for g, zs in estimates
                ) / q
                p.copy_(p * (1 - lr * wd) - lr * direction)
    close(model.parameters(), reference.parameters())
    assert opt.sign_mode == sign_mode


def test_momentum_equals_torch_sgd_fed_the_zo_gradient_and_its_decoupled_formula():
    model, x, y = tiny_regression()
    reference, _, _ = tiny_regression()
    mirror, _, _ = tiny_regression()
    lr, eps, beta, q = 0.02, 1e-3, 0.8, 3
    opt = ZOSGDMomentum(model.parameters(), lr=lr, eps=eps, momentum=beta, num_queries=q, seed=1)
    torch_sgd = torch.optim.SGD(mirror.parameters(), lr=lr, momentum=beta)
    buffers = [torch.zeros_like(p) for p in reference.parameters()]
    for step in range(4):
        opt.step(lambda: loss_of(model, x, y))
        grads = averaged_gradient(zo_gradient(reference, x, y, 1, step, q, eps))
        with torch.no_grad():
            for p, m, g in zip(reference.parameters(), buffers, grads):
                m.mul_(beta).add_(g)
                p.sub_(lr * m)
        for p, g in zip(mirror.parameters(), grads):
            p.grad = g.clone()
        torch_sgd.step()
    close(model.parameters(), reference.parameters())
    close(model.parameters(), mirror.parameters())
    state_numel = sum(s["momentum_buffer"].numel() for s in opt.state.values())
    assert state_numel == sum(p.numel() for p in model.parameters())  # +1x params, whatever q


def test_adam_equals_torch_adamw_fed_the_same_zo_gradient():
    model, x, y = tiny_regression()
    reference, _, _ = tiny_regression()
    lr, eps, wd, q = 0.01, 1e-3, 0.05, 2
    opt = ZOAdam(model.parameters(), lr=lr, eps=eps, weight_decay=wd, betas=(0.8, 0.99), num_queries=q, seed=9)
    torch_adam = torch.optim.AdamW(reference.parameters(), lr=lr, betas=(0.8, 0.99), weight_decay=wd, foreach=False)
    for step in range(5):
        opt.step(lambda: loss_of(model, x, y))
        grads = averaged_gradient(zo_gradient(reference, x, y, 9, step, q, eps))
        for p, g in zip(reference.parameters(), grads):
            p.grad = g.clone()
        torch_adam.step()
    close(model.parameters(), reference.parameters())
    for p_model, p_ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(opt.state[p_model]["exp_avg_sq"], torch_adam.state[p_ref]["exp_avg_sq"])
    assert all(p.grad is None for p in model.parameters())


def test_conservative_keeps_the_best_of_three_candidates_with_five_forwards():
    model, x, y = tiny_regression()
    reference, _, _ = tiny_regression()
    lr, eps = 0.5, 1e-3  # a large step, so that the candidates differ in loss
    opt = ZOSGDConservative(model.parameters(), lr=lr, eps=eps, seed=4)
    calls = []

    def closure():
        calls.append(1)
        return loss_of(model, x, y)

    choices = []
    for step in range(6):
        calls.clear()
        opt.step(closure)
        assert len(calls) == 5
        ((g, zs),) = zo_gradient(reference, x, y, 4, step, 1, eps)
        with torch.no_grad():
            theta = snapshot(reference)
            losses = {}
            for choice in (0, +1, -1):
                for p, t, z in zip(reference.parameters(), theta, zs):
                    p.copy_(t - choice * lr * g * z)
                losses[choice] = loss_of(reference, x, y).item()
            best = min(losses, key=lambda k: (losses[k], abs(k)))
            for p, t, z in zip(reference.parameters(), theta, zs):
                p.copy_(t - best * lr * g * z)
        assert opt.last_choice == best
        choices.append(best)
        close(model.parameters(), reference.parameters())
    assert len(set(choices)) > 1  # the test saw more than one kind of decision


def test_forward_gradient_derivative_equals_jvp_and_autograd_and_its_update():
    model, x, y = tiny_regression()
    lr = 0.05
    opt = ForwardGradient(model.parameters(), lr=lr, seed=2)
    names = [n for n, _ in model.named_parameters()]
    theta = snapshot(model)
    seed = opt.query_seed(0, 0)
    tangents = [opt.noise.noise_like(p, seed, i).double() for i, p in enumerate(model.parameters())]

    def functional(*params):
        return loss_of(lambda inp: torch.func.functional_call(model, dict(zip(names, params)), (inp,)), x, y)

    jvp_loss, jvp_derivative = torch.func.jvp(functional, tuple(theta), tuple(tangents))
    loss = loss_of(model, x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    autograd_derivative = sum((g * v).sum() for g, v in zip(grads, tangents))

    opt._param_at = dict(opt.trainable_parameters())
    with torch.no_grad():
        value, derivative = opt.directional_derivative(lambda: loss_of(model, x, y), seed)
    assert value == pytest.approx(jvp_loss.item(), rel=1e-6)
    assert derivative == pytest.approx(jvp_derivative.item(), rel=1e-5)
    assert derivative == pytest.approx(autograd_derivative.item(), rel=1e-5)
    for a, b in zip(theta, model.parameters()):
        assert torch.equal(a, b)  # the tangents leave the values alone

    opt.step(lambda: loss_of(model, x, y))
    expected = [t - lr * jvp_derivative.item() * v for t, v in zip(theta, tangents)]
    close(model.parameters(), expected)
    assert all(p.grad is None for p in model.parameters())
    assert all(fwad_free(p) for p in model.parameters())


def fwad_free(p):
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        return fwad.unpack_dual(p).tangent is None


class LiveNoise:
    """The most noise elements alive at once (the temporary memory of a step), seen at each draw."""

    def __init__(self, monkeypatch):
        self.alive: list[weakref.ref] = []
        self.peak = 0
        original = SeededNoise.draw

        def draw(noise, seed, numel, device, out=None):
            z = original(noise, seed, numel, device, out)
            self.alive = [r for r in self.alive if r() is not None] + [weakref.ref(z)]
            storages = {r().untyped_storage().data_ptr(): r().untyped_storage().nbytes() for r in self.alive if r() is not None}
            self.peak = max(self.peak, sum(storages.values()) // 4)  # float32 elements held by live noise
            return z

        monkeypatch.setattr(SeededNoise, "draw", draw)


@pytest.mark.parametrize("name", ["zo-sgd", "zo-sgd-mmt", "zo-adam"])
def test_temporary_memory_and_state_do_not_grow_with_queries(monkeypatch, name):
    peaks, states = {}, {}
    for q in (2, 8):
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
        tracker = LiveNoise(monkeypatch)
        opt = make_optimizer(name, model.parameters(), lr=1e-3, num_queries=q, chunk_numel=1000, num_threads=1,
                             exact_restore=False)  # fmt: skip
        x = torch.randn(4, 64)
        for _ in range(2):
            opt.step(lambda model=model, x=x: model(x).square().mean())
        peaks[q] = tracker.peak
        states[q] = sum(t.numel() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    assert peaks[2] == peaks[8] <= 2 * 1000  # at most two noise chunks alive (one per query would be 8)
    assert states[2] == states[8]


@pytest.mark.parametrize(
    "name, options",
    [
        ("zo-sgd", {"one_sided": True, "num_queries": 2}),
        ("zo-sgd-sign", {"perturbation": "rademacher"}),
        ("zo-sgd-sign", {"sign_mode": "projected", "one_sided": True}),
        ("zo-sgd-mmt", {"perturbation": "rademacher", "num_queries": 2}),
        ("zo-sgd-cons", {"one_sided": True}),
        ("zo-adam", {"perturbation": "rademacher"}),
        ("forward-grad", {"num_queries": 2}),
    ],
)
def test_every_optimizer_lowers_the_loss_without_backward(name, options):
    model, x, y = tiny_regression(dtype=torch.float32)
    lr = {"zo-sgd-sign": 0.03, "zo-sgd-mmt": 0.003, "zo-adam": 0.02, "forward-grad": 0.01}.get(name, 0.02)
    opt = make_optimizer(name, model.parameters(), lr=lr, eps=1e-3, seed=0, **options)
    with torch.no_grad():
        start = loss_of(model, x, y).item()
    for _ in range(40):
        opt.step(lambda: loss_of(model, x, y))
    with torch.no_grad():
        end = loss_of(model, x, y).item()
    assert end < 0.7 * start, (name, start, end)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_resume_is_exact(name):
    def run(split):
        model, x, y = tiny_regression()
        opt = make_optimizer(name, model.parameters(), lr=0.01, seed=5)
        for _ in range(2):
            opt.step(lambda: loss_of(model, x, y))
        if split:
            state = opt.state_dict()
            opt = make_optimizer(name, model.parameters(), lr=0.01, seed=77)
            opt.load_state_dict(state)
        for _ in range(2):
            opt.step(lambda: loss_of(model, x, y))
        return snapshot(model)

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "name, kwargs, word",
    [
        ("zo-sgd-sign", {"sign_mode": "sign"}, "sign_mode"),
        ("zo-sgd-mmt", {"momentum": 1.0}, "momentum"),
        ("zo-sgd-mmt", {"momentum": -0.1}, "momentum"),
        ("zo-adam", {"betas": (0.9, 1.5)}, "betas"),
        ("zo-adam", {"adam_eps": 0.0}, "adam_eps"),
        ("zo-sgd", {"blocks": []}, "blocks"),
        ("zo-sgd", {"blocks": [[]]}, "blocks"),
        ("forward-grad", {"num_queries": 0}, "num_queries"),
        ("adam", {}, "optimizer"),
    ],
)
def test_bad_arguments_name_the_argument(name, kwargs, word):
    with pytest.raises(ValueError, match=word):
        make_optimizer(name, [torch.zeros(2, requires_grad=True)], lr=1e-3, **kwargs)


def test_wrong_types_are_refused():
    param = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="sparsity"):
        make_optimizer("zo-sgd", [param], sparsity=0.5)
    with pytest.raises(TypeError, match="first_order"):
        make_optimizer("zo-sgd", [param], first_order=[param])
    with pytest.raises(TypeError, match="blocks"):
        make_optimizer("zo-sgd", [param], blocks=param)
