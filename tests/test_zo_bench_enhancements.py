"""Block-wise ZO, hybrid ZO/FO, gradient sparsity and the peft schemes."""

import pytest
import torch
from torch import nn

from lightning_bpfree.models import tiny_causal_lm
from lightning_bpfree.zo import (
    ZOSGD,
    FirstOrderPart,
    GradientSparsity,
    apply_scheme,
    find_blocks,
    make_optimizer,
)


def regression(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=generator)
    y = x @ torch.randn(6, 1, generator=generator)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.4)
    return model, x, y


def test_find_blocks_splits_any_transformer_into_its_layers():
    for arch, layers in (("llama", "model.layers"), ("opt", "model.decoder.layers"), ("gpt2", "transformer.h")):
        model = tiny_causal_lm(arch, num_layers=3)
        blocks = find_blocks(model, "layer")
        assert list(blocks)[:3] == [f"{layers}.{i}" for i in range(3)] and list(blocks)[-1] == "<rest>"
        flat = [id(p) for block in blocks.values() for p in block]
        assert sorted(flat) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    opt = tiny_causal_lm("opt", num_layers=2)
    by_pattern = find_blocks(opt, r"layers\.(\d+)\.")
    assert set(by_pattern) == {"0", "1", "<rest>"}
    linears = find_blocks(opt, "linear")
    assert sum(isinstance(m, nn.Linear) for m in opt.modules()) == len(linears) - 1
    with pytest.raises(ValueError, match="level"):
        find_blocks(opt, "(unclosed")
    with pytest.raises(ValueError, match="layer"):
        find_blocks(nn.Linear(2, 2), "layer")


def test_blockwise_perturbs_only_the_active_block_and_updates_each_block():
    model, x, y = regression()
    blocks = [list(model[0].parameters()), list(model[2].parameters()), list(model[4].parameters())]
    theta = [p.detach().clone() for p in model.parameters()]
    moved = []

    def closure():
        moved.append(tuple(not torch.equal(p, t) for p, t in zip(model.parameters(), theta)))
        return ((model(x) - y) ** 2).mean()

    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-3, blocks=blocks, seed=0)
    opt.step(closure)
    assert len(moved) == 6  # two forwards per block
    # block b's forwards see block b perturbed, earlier blocks updated, later blocks untouched
    assert moved[0] == moved[1] == (True, True, False, False, False, False)
    assert moved[2] == moved[3] == (True, True, True, True, False, False)
    assert moved[4] == moved[5] == (True, True, True, True, True, True)
    assert opt.zo_state["step"] == 1
    with pytest.raises(ValueError, match="blocks"):
        ZOSGD(list(model.parameters())[:2], lr=0.1, blocks=blocks).step(closure)


def test_hybrid_gives_the_fo_part_real_gradients_and_the_zo_part_none():
    model, x, y = regression()
    twin, _, _ = regression()
    head = list(model[4].parameters())
    seen = {}
    part = FirstOrderPart(head, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    original_step = part.step

    def spy_step():
        seen["fo"] = [p.grad.clone() for p in head]
        seen["zo"] = [p.grad for p in list(model[0].parameters()) + list(model[2].parameters())]
        original_step()

    part.step = spy_step
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-3, first_order=part, seed=3)
    opt.step(lambda: ((model(x) - y) ** 2).mean())

    # the reference: autograd's gradient of the head at theta, and ZO-SGD of the rest with the head frozen
    loss = ((twin(x) - y) ** 2).mean()
    expected = torch.autograd.grad(loss, list(twin[4].parameters()))
    for got, want in zip(seen["fo"], expected):
        torch.testing.assert_close(got, want)
    assert all(g is None for g in seen["zo"])
    twin.zero_grad(set_to_none=True)
    with torch.no_grad():
        head_after = [p - 0.1 * g for p, g in zip(twin[4].parameters(), expected)]
    twin[4].requires_grad_(False)
    ZOSGD(twin.parameters(), lr=0.05, eps=1e-3, seed=3).step(lambda: ((twin(x) - y) ** 2).mean())
    for a, b in zip(list(model[0].parameters()) + list(model[2].parameters()),
                    list(twin[0].parameters()) + list(twin[2].parameters())):  # fmt: skip
        assert torch.equal(a, b)
    for a, b in zip(model[4].parameters(), head_after):
        torch.testing.assert_close(a.detach(), b)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_sparsity_fraction_is_exact_and_masked_entries_never_move(method):
    model, x, y = regression()
    sparsity = GradientSparsity(0.3, method=method, resample_every=3)
    theta = [p.detach().clone() for p in model.parameters()]
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-3, sparsity=sparsity, seed=1)
    opt.step(lambda: ((model(x) - y) ** 2).mean())
    for (index, p), t in zip(enumerate(model.parameters()), theta):
        mask = sparsity.masks[index]
        assert int((~mask).sum()) == round(0.3 * p.numel())
        assert torch.equal(p[~mask], t[~mask])  # masked: not perturbed, not updated
        assert not torch.equal(p[mask], t[mask])
        if method == "magnitude" and (~mask).any():
            assert t[~mask].abs().min() >= t[mask].abs().max()
    assert sparsity.measured_fraction() == pytest.approx(0.3, abs=0.02)
    first = {i: m.clone() for i, m in sparsity.masks.items()}
    opt.step(lambda: ((model(x) - y) ** 2).mean())
    opt.step(lambda: ((model(x) - y) ** 2).mean())
    assert all(torch.equal(first[i], m) for i, m in sparsity.masks.items())  # steps 0-2 share the masks
    opt.step(lambda: ((model(x) - y) ** 2).mean())
    if method == "random":
        assert any(not torch.equal(first[i], m) for i, m in sparsity.masks.items())


def test_large_tensor_fraction_is_what_it_says():
    sparsity = GradientSparsity(0.1)
    mask = sparsity.mask_for(torch.zeros(1000, 100), seed=0)
    assert int((~mask).sum()) == 10_000


@pytest.mark.parametrize(
    "kwargs, word",
    [({"fraction": 1.0}, "fraction"), ({"fraction": -0.1}, "fraction"), ({"fraction": 0.5, "method": "l1"}, "method"),
     ({"fraction": 0.5, "resample_every": 0}, "resample_every")],
)  # fmt: skip
def test_sparsity_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        GradientSparsity(**kwargs)


def test_schemes_through_peft_train_only_their_parameters():
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    counts = {}
    for scheme in ("full", "lora", "prefix", "prompt", "head"):
        model = apply_scheme(tiny_causal_lm("llama"), scheme)
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        counts[scheme] = sum(p.numel() for p in trainable.values())
        opt = make_optimizer("zo-sgd", model.parameters(), lr=1e-2, eps=1e-2, seed=0)
        for _ in range(2):
            loss = opt.step(lambda model=model: model(input_ids=ids, labels=ids).loss)
        assert torch.isfinite(loss)
        params = dict(model.named_parameters())
        assert all(torch.equal(params[n], t) for n, t in frozen.items()), scheme
        assert any(not torch.equal(params[n], t) for n, t in trainable.items()), scheme
        assert not any(("lora_" in n or "prompt_encoder" in n) for n in frozen), scheme
    hidden, vocab, layers = 32, 128, 2
    assert counts["lora"] == layers * 2 * (8 * hidden * 2)  # r=8 on q_proj and v_proj
    assert counts["prompt"] == 10 * hidden and counts["prefix"] == 5 * layers * 2 * hidden
    assert counts["head"] == vocab * hidden
    assert counts["full"] == sum(p.numel() for p in tiny_causal_lm("llama").parameters())
    with pytest.raises(ValueError, match="scheme"):
        apply_scheme(tiny_causal_lm("llama"), "adapter")
