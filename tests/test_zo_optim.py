import math

import pytest
import torch
from torch import nn

from lightning_bpfree.zo import ZOSGD, SeededNoise, mix_seed


def tiny_regression(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=generator)
    w_true = torch.randn(8, 1, generator=generator)
    y = x @ w_true
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model, x, y


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def test_noise_is_identical_whatever_threads_and_chunking_of_the_work():
    params = [torch.zeros(3000), torch.zeros(70, 50), torch.zeros(5)]
    reference = [SeededNoise(chunk_numel=512, num_threads=1).noise_like(p, seed=7, param_index=i) for i, p in enumerate(params)]
    threaded = SeededNoise(chunk_numel=512, num_threads=4)
    again = [threaded.noise_like(p, seed=7, param_index=i) for i, p in enumerate(params)]
    for a, b in zip(reference, again):
        assert torch.equal(a, b)
    other_seed = SeededNoise(chunk_numel=512).noise_like(params[0], seed=8, param_index=0)
    assert not torch.equal(reference[0], other_seed)


def test_noise_statistics():
    z = SeededNoise("gaussian").noise_like(torch.zeros(200_000), seed=1)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    r = SeededNoise("rademacher").noise_like(torch.zeros(200_000), seed=1)
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(r.mean().item()) < 0.01


def test_mix_seed_is_deterministic_and_spreads():
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3)
    assert len({mix_seed(0, step, 0) for step in range(1000)}) == 1000
    assert 0 <= mix_seed(2**70, -5) < 2**63


def test_perturbation_applies_the_regenerated_noise():
    param = torch.zeros(5000, requires_grad=True)
    opt = ZOSGD([param], lr=0.0, eps=0.5, chunk_numel=1000)
    seed = opt.query_seed(0, 0)
    with torch.no_grad():
        opt.perturb_(seed, +1.0)
    z = opt.noise.noise_like(param, seed, param_index=0)
    assert torch.equal(param.detach(), z * 0.5)


@pytest.mark.parametrize("exact_restore", [True, False])
def test_nan_loss_skips_and_restores(exact_restore):
    model, x, y = tiny_regression()
    before = snapshot(model)
    opt = ZOSGD(model.parameters(), lr=0.1, eps=1e-3, exact_restore=exact_restore)
    loss = opt.step(lambda: torch.tensor(float("nan")))
    assert math.isnan(loss.item())
    assert opt.zo_state["skipped_steps"] == 1 and opt.zo_state["step"] == 1
    for a, b in zip(before, model.parameters()):
        if exact_restore:
            assert torch.equal(a, b), "the kept copy must restore bitwise"
        else:
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-7)


def test_exact_restore_is_bitwise_in_fp32_and_arithmetic_restore_drift_is_rounding_only():
    model, x, y = tiny_regression()
    before = snapshot(model)
    exact = ZOSGD(model.parameters(), lr=1e-2, eps=1e-2, exact_restore=True)
    seen = []

    def closure():
        seen.append(snapshot(model))
        return ((model(x) - y) ** 2).mean()

    with torch.no_grad():
        exact.estimate(closure, use_backup=True) if exact._save_backup() is None else None
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    # the two evaluations really were at theta +- eps z
    z0 = exact.noise.noise_like(before[0], exact.query_seed(0, 0), 0)
    torch.testing.assert_close(seen[0][0] - before[0], 1e-2 * z0, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen[1][0] - before[0], -1e-2 * z0, rtol=0, atol=1e-6)

    arithmetic = ZOSGD(model.parameters(), lr=1e-2, eps=1e-2, exact_restore=False)
    with torch.no_grad():
        arithmetic.estimate(closure, use_backup=False)
    drift = max((a - b).abs().max().item() for a, b in zip(before, model.parameters()))
    assert drift < 1e-6


def test_zosgd_equals_hand_written_mezo_for_five_steps():
    model, x, y = tiny_regression()
    reference, _, _ = tiny_regression()
    lr, eps, wd = 0.05, 1e-3, 0.01
    opt = ZOSGD(model.parameters(), lr=lr, eps=eps, weight_decay=wd, seed=123)
    noise = SeededNoise()

    def loss_of(net):
        return ((net(x) - y) ** 2).mean()

    for step in range(5):
        opt.step(lambda: loss_of(model))
        # MeZO by hand: z rebuilt from the same seeds, theta kept aside.
        seed = mix_seed(123, step, 0)
        with torch.no_grad():
            theta = snapshot(reference)
            zs = [noise.noise_like(p, seed, i) for i, p in enumerate(reference.parameters())]
            for p, t, z in zip(reference.parameters(), theta, zs):
                p.copy_(torch.add(t, z, alpha=eps))
            loss_plus = loss_of(reference).item()
            for p, t, z in zip(reference.parameters(), theta, zs):
                p.copy_(torch.add(t, z, alpha=-eps))
            loss_minus = loss_of(reference).item()
            g = (loss_plus - loss_minus) / (2 * eps)
            for p, t, z in zip(reference.parameters(), theta, zs):
                p.copy_(torch.add(t * (1 - lr * wd), z, alpha=-lr * g))
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options", [{}, {"perturbation": "rademacher"}, {"one_sided": True}, {"num_queries": 3}])
def test_loss_falls_without_any_gradient(options):
    model, x, y = tiny_regression()
    opt = ZOSGD(model.parameters(), lr=0.03, eps=1e-3, seed=0, **options)

    def closure():
        return ((model(x) - y) ** 2).mean()

    with torch.no_grad():
        start = closure().item()
    for _ in range(150):
        opt.step(closure)
    with torch.no_grad():
        end = closure().item()
    assert end < 0.5 * start
    assert all(p.grad is None for p in model.parameters())


def test_frozen_parameters_are_never_touched():
    model, x, y = tiny_regression()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    trainable_before = model[2].weight.detach().clone()
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-3)
    for _ in range(5):
        opt.step(lambda: ((model(x) - y) ** 2).mean())
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[2].weight, trainable_before)


def test_state_dict_resume_is_bitwise_identical():
    def run(split: bool):
        model, x, y = tiny_regression()
        opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-3, seed=5)
        closure = lambda: ((model(x) - y) ** 2).mean()  # noqa: E731
        for _ in range(3):
            opt.step(closure)
        if split:
            state = opt.state_dict()
            opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-3, seed=999)
            opt.load_state_dict(state)
        for _ in range(3):
            opt.step(closure)
        return snapshot(model)

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"eps": 0.0}, "eps"),
        ({"eps": -1.0}, "eps"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"perturbation": "uniform"}, "perturbation"),
        ({"num_queries": 0}, "num_queries"),
        ({"exact_restore": "yes"}, "exact_restore"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, word):
    options = {"lr": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=word):
        ZOSGD([torch.zeros(2, requires_grad=True)], **options)


def test_closure_errors_are_clear():
    param = torch.zeros(2, requires_grad=True)
    opt = ZOSGD([param], lr=1e-3)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: torch.zeros(3))
    with pytest.raises(TypeError, match="scalar"):
        opt.step(lambda: "loss")


# ------------------------------------------------------------------ weight decay groups (issue 16, 1.2)
def tiny_transformers_models():
    """A 2-layer LLaMA (RMSNorm, no biases) and a 2-layer OPT (LayerNorm, biases), built offline from configs."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2,
    ))  # fmt: skip
    opt = OPTForCausalLM(OPTConfig(
        vocab_size=32, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, word_embed_proj_dim=16,
    ))  # fmt: skip
    return {"llama": llama, "opt": opt}


def test_default_no_decay_equals_the_hugging_face_trainer_rule_and_mezo_differs_only_on_llama_final_norm():
    from transformers import Trainer

    from lightning_bpfree.zo.weight_decay import mezo_no_decay, no_decay_names, weight_decay_groups

    models = tiny_transformers_models()
    for kind, model in models.items():
        names = [name for name, _ in model.named_parameters()]
        # the reference: transformers' own Trainer.get_decay_parameter_names (uses nothing of self)
        # (intersected with named_parameters: it also lists OPT's lm_head.weight, tied to embed_tokens)
        hf_decayed = set(Trainer.get_decay_parameter_names(None, model)) & set(names)
        exempt = set(no_decay_names(model))
        assert set(names) - exempt == hf_decayed, kind
        groups = weight_decay_groups(model, 0.5)
        by_id = {id(p): name for name, p in model.named_parameters()}
        assert [[by_id[id(p)] for p in g["params"]] for g in groups] == [
            [n for n in names if n in hf_decayed], [n for n in names if n not in hf_decayed]
        ]
        assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
        mezo_exempt = set(no_decay_names(model, mezo_no_decay))
        if kind == "opt":  # every OPT norm is named *layer_norm: the name rule and the type rule agree
            assert mezo_exempt == exempt and len(exempt) == 5 * 2 + 2 * 6  # 5 LayerNorms, 6 biased Linears per layer
        else:  # LLaMA's final RMSNorm is named "norm": MeZO's name rule decays it, the type rule does not
            assert exempt - mezo_exempt == {"model.norm.weight"} and len(mezo_exempt) == 4


def test_weight_decay_groups_single_group_when_nothing_is_exempt_and_bad_no_decay_is_a_type_error():
    from lightning_bpfree.zo.weight_decay import is_normalization, weight_decay_groups

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.GroupNorm(2, 4), nn.RMSNorm(4), nn.Linear(4, 1))
    params = list(model.parameters())
    for groups in (weight_decay_groups(model, 0.1, None), weight_decay_groups(model, 0.0)):
        assert len(groups) == 1 and groups[0]["params"] == params
    groups = weight_decay_groups(model, 0.1)  # only the two Linear weights are decayed
    assert groups[0]["params"] == [params[0], params[-2]] and len(groups[1]["params"]) == len(params) - 2
    assert all(is_normalization(m) for m in model[1:4]) and not is_normalization(model[0])
    custom = weight_decay_groups(model, 0.1, lambda name, p: p.ndim == 1)
    assert custom[0]["params"] == [params[0], params[-2]]
    for bad in ("bias", 0, ["bias"]):
        with pytest.raises(TypeError, match="no_decay"):
            weight_decay_groups(model, 0.1, bad)


@pytest.mark.parametrize("num_queries", [1, 3])
def test_one_sided_zosgd_equals_its_formula_written_out(num_queries):
    """``one_sided=True``: g_q = (L(theta + eps z_q) - L(theta)) / eps, theta -= lr * g_q / Q * z_q, query by query."""
    model, x, y = tiny_regression()
    reference, _, _ = tiny_regression()
    lr, eps = 0.05, 1e-3
    opt = ZOSGD(model.parameters(), lr=lr, eps=eps, seed=7, one_sided=True, num_queries=num_queries)
    noise = SeededNoise()

    def loss_of(net):
        return ((net(x) - y) ** 2).mean()

    for step in range(3):
        opt.step(lambda: loss_of(model))
        with torch.no_grad():
            theta = snapshot(reference)
            loss_at_theta = loss_of(reference).item()
            projected = []
            for query in range(num_queries):
                zs = [noise.noise_like(p, mix_seed(7, step, query), i) for i, p in enumerate(reference.parameters())]
                for p, t, z in zip(reference.parameters(), theta, zs):
                    p.copy_(torch.add(t, z, alpha=eps))
                projected.append(((loss_of(reference).item() - loss_at_theta) / eps, zs))
                for p, t in zip(reference.parameters(), theta):
                    p.copy_(t)
            for g, zs in projected:
                for p, z in zip(reference.parameters(), zs):
                    p.add_(z, alpha=-lr * g / num_queries)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert not torch.equal(model[0].weight, tiny_regression()[0][0].weight)  # it moved
