"""Block-wise ZO, hybrid ZO/FO, gradient sparsity and the peft schemes."""

import copy
import math

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
from lightning_bpfree.zo.sparsity import global_magnitude_masks


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


@pytest.mark.parametrize("group", ["layer", "global"])
def test_magnitude_masks_wait_for_resample_every_when_small_tensors_stay_dense(group):
    model, x, y = regression()
    sparsity = GradientSparsity(0.3, method="magnitude", resample_every=100, min_numel=9, group=group)
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-3, sparsity=sparsity, seed=1)
    draws = []
    original = sparsity.refresh

    def counting_refresh(optimizer):
        before = sparsity.masks
        original(optimizer)
        if sparsity.masks is not before:  # every draw builds a new dict
            draws.append(optimizer.zo_state["step"])

    sparsity.refresh = counting_refresh
    first = None
    for _ in range(6):
        opt.step(lambda: ((model(x) - y) ** 2).mean())
        first = first or {i: m.clone() for i, m in sparsity.masks.items()}
    assert any(p.numel() < 9 for p in model.parameters())  # the case that used to redraw every step
    assert draws == [0]
    assert all(torch.equal(first[i], m) for i, m in sparsity.masks.items())


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


def brute_force_global(tensors, fraction):
    """Reference global magnitude masks: a stable descending sort of every |theta| at once."""
    flat = torch.cat([t.detach().reshape(-1).abs().float() for t in tensors])
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[: round(fraction * flat.numel())]] = False
    return list(keep.split([t.numel() for t in tensors]))


def quantized_regression():
    """The regression model with weights on a 0.1 grid, so that many |theta| tie across tensors."""
    model, x, y = regression()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p * 10).round() / 10)
    return model, x, y


def test_global_magnitude_masks_exactly_the_largest_entries_over_all_tensors():
    model, x, y = quantized_regression()
    sparsity = GradientSparsity(0.3, method="magnitude", group="global", min_numel=8)
    params = list(model.parameters())
    eligible = [i for i, p in enumerate(params) if p.numel() >= 8]
    assert eligible == [0, 1, 2, 3, 4]  # the 1-element output bias stays dense and out of the total
    theta = [p.detach().clone() for p in params]
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-3, sparsity=sparsity, seed=1)
    opt.step(lambda: ((model(x) - y) ** 2).mean())
    total = sum(params[i].numel() for i in eligible)
    reference = brute_force_global([theta[i] for i in eligible], 0.3)
    assert sorted(sparsity.masks) == eligible
    assert sum(int((~m).sum()) for m in sparsity.masks.values()) == round(0.3 * total)
    for i, want in zip(eligible, reference):
        assert torch.equal(sparsity.masks[i].view(-1), want)  # same entries, ties included
        assert sparsity.counts[i] == int((~want).sum())
        assert torch.equal(params[i][~sparsity.masks[i]], theta[i][~sparsity.masks[i]])  # masked: never moves
    derived = [int((~want).sum()) / want.numel() for want in reference]
    assert max(derived) - min(derived) > 0.1  # the tensors really get different sparsities
    assert not torch.equal(params[5], theta[5])  # the dense bias is trained
    assert sparsity.measured_fraction() == round(0.3 * total) / total


def test_global_magnitude_breaks_ties_by_tensor_then_position():
    tensors = [torch.tensor([1.0, -2.0, 2.0]), torch.tensor([2.0, 0.5, -2.0])]
    masks = global_magnitude_masks(tensors, 0.5)  # 3 of 6 masked; four entries tie at |2|
    assert masks[0].tolist() == [True, False, False] and masks[1].tolist() == [False, True, True]
    bf16 = [torch.randn(50, 7, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(3)]
    got = global_magnitude_masks(bf16, 0.37, indices=[4, 8, 9])
    assert list(got) == [4, 8, 9]
    for mask, want in zip(got.values(), brute_force_global(bf16, 0.37)):
        assert torch.equal(mask.view(-1), want)


def test_global_random_masks_have_the_derived_counts_and_change_across_resamples():
    model, x, y = quantized_regression()
    sparsity = GradientSparsity(0.4, method="random", group="global", resample_every=2)
    params = list(model.parameters())
    pretrained = [p.detach().clone() for p in params]
    want = [int((~m).sum()) for m in brute_force_global(pretrained, 0.4)]
    assert len(set(c / p.numel() for c, p in zip(want, params))) > 2  # derived fractions differ per tensor
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-3, sparsity=sparsity, seed=2)
    draws = []
    for _ in range(6):
        opt.step(lambda: ((model(x) - y) ** 2).mean())
        draws.append({i: m.clone() for i, m in sparsity.masks.items()})
        # the counts come from the pretrained weights, whatever the weights are now
        assert [int((~draws[-1][i]).sum()) for i in range(len(params))] == want
        assert [opt.zo_state[f"sparsity_masked.{i}"] for i in range(len(params))] == want
    magnitude = global_magnitude_masks(pretrained, 0.4)
    assert any(not torch.equal(draws[0][i], magnitude[i]) for i in magnitude)  # random, not the threshold mask
    assert all(torch.equal(draws[0][i], draws[1][i]) for i in draws[0])  # steps 0-1 share the masks
    assert any(not torch.equal(draws[1][i], draws[2][i]) for i in draws[0])  # step 2 resamples
    assert any(not torch.equal(draws[3][i], draws[4][i]) for i in draws[0])


def test_global_random_resume_is_bitwise_identical():
    def closure(model, x, y):
        return lambda: ((model(x) - y) ** 2).mean()

    model, x, y = regression()
    opt = ZOSGD(model.parameters(), lr=0.2, eps=1e-3, seed=5,
                sparsity=GradientSparsity(0.5, group="global", resample_every=3))  # fmt: skip
    for _ in range(4):
        opt.step(closure(model, x, y))
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    stored = [state["zo_state"][f"sparsity_masked.{i}"] for i in range(6)]
    # derived afresh from the trained weights the counts would differ, so the stored state matters
    rederived = [int((~m).sum()) for m in brute_force_global(list(model.parameters()), 0.5)]
    assert rederived != stored
    for _ in range(4):
        opt.step(closure(model, x, y))

    resumed, _, _ = regression(seed=1)
    resumed.load_state_dict(weights)
    sparsity = GradientSparsity(0.5, group="global", resample_every=3)
    opt2 = ZOSGD(resumed.parameters(), lr=0.2, eps=1e-3, seed=0, sparsity=sparsity)
    opt2.load_state_dict(state)
    for _ in range(4):
        opt2.step(closure(resumed, x, y))
    assert [sparsity.counts[i] for i in range(6)] == stored
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_global_group_leaves_the_first_order_part_out_of_the_total():
    model, x, y = regression()
    sparsity = GradientSparsity(0.25, method="magnitude", group="global")
    part = FirstOrderPart(model[4].parameters(), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-3, first_order=part, sparsity=sparsity, seed=0)
    zo_params = list(model[0].parameters()) + list(model[2].parameters())
    for _ in range(2):
        opt.step(lambda: ((model(x) - y) ** 2).mean())
        assert sorted(sparsity.masks) == [0, 1, 2, 3]
        total = sum(p.numel() for p in zo_params)
        assert sum(int((~m).sum()) for m in sparsity.masks.values()) == round(0.25 * total)


@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_zo_training_with_global_sparsity_lowers_the_loss(method):
    model, x, y = regression()
    sparsity = GradientSparsity(0.5, method=method, group="global", resample_every=5)
    opt = ZOSGD(model.parameters(), lr=0.01, eps=1e-3, seed=0, sparsity=sparsity)
    losses = [float(opt.step(lambda: ((model(x) - y) ** 2).mean())) for _ in range(150)]
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])  # mean of the last 10 steps vs the first 10
    assert sparsity.measured_fraction() == round(0.5 * 137) / 137  # 137 trainable entries in all


def test_sparsity_bad_group():
    with pytest.raises(ValueError, match="group"):
        GradientSparsity(0.5, group="block")


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


def test_blocks_sparsity_and_first_order_compose_and_resume_exactly():
    """The three enhancements in one optimizer: a run resumed from ``state_dict`` after 3 steps
    ends bitwise where the uninterrupted run ends, and a NaN step leaves both parts bitwise
    as they were (a skipped step skips the first-order part too)."""

    def build(model):
        return ZOSGD(
            model.parameters(), lr=1e-2, seed=7, weight_decay=0.01,
            blocks=[list(model[0].parameters()), list(model[2].parameters())],
            sparsity=GradientSparsity(0.25, resample_every=2),
            first_order=FirstOrderPart(model[4].parameters(), lr=1e-2),
        )  # fmt: skip

    model, x, y = regression()
    resumed_model = copy.deepcopy(model)

    def closure_of(net):
        return lambda: ((net(x) - y) ** 2).mean()

    optimizer = build(model)
    for _ in range(6):
        optimizer.step(closure_of(model))
    first = build(resumed_model)
    for _ in range(3):
        first.step(closure_of(resumed_model))
    state = copy.deepcopy(first.state_dict())
    second = build(resumed_model)
    second.load_state_dict(state)
    for _ in range(3):
        second.step(closure_of(resumed_model))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))
    assert second.zo_state == optimizer.zo_state

    zo_before = [p.detach().clone() for m in (model[0], model[2]) for p in m.parameters()]
    head_before = [p.detach().clone() for p in model[4].parameters()]

    def nan_without_grad():  # the first-order pass (grad enabled) is finite, every ZO forward NaN
        return ((model(x) - y) ** 2).mean() * (1.0 if torch.is_grad_enabled() else float("nan"))

    loss = optimizer.step(nan_without_grad)
    zo_after = [p.detach() for m in (model[0], model[2]) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(zo_before, zo_after))
    assert optimizer.zo_state["skipped_steps"] == 2  # one per block
    assert torch.isfinite(loss)  # the first-order pass measured a finite loss at theta
    assert all(torch.equal(a, b) for a, b in zip(head_before, model[4].parameters()))
    assert optimizer.last_step_skipped and all(p.grad is None for p in model[4].parameters())


@pytest.mark.parametrize("poison", ["nan-loss", "nan-gradient-only"])
def test_a_non_finite_first_order_pass_skips_both_parts_bitwise(poison):
    model, x, y = regression()
    head = model[4]
    part = FirstOrderPart(head.parameters(), lr=1e-2)
    optimizer = ZOSGD(model.parameters(), lr=1e-2, eps=1e-3, seed=3, first_order=part)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        loss = ((model(x) - y) ** 2).mean()
        if poison == "nan-loss":
            return loss * float("nan")
        # a finite loss whose gradient is NaN: where() sends 0 * inf back to the head's weight
        hidden = head.weight * float("inf")
        return loss + torch.where(torch.zeros_like(hidden, dtype=torch.bool), hidden, 0.0).sum()

    loss = optimizer.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # neither part moved
    assert optimizer.zo_state["skipped_steps"] == 1 and optimizer.last_step_skipped
    assert all(p.grad is None for p in model.parameters())
    assert not part.optimizer.state  # the first-order optimizer never stepped (no AdamW moments)
    assert (not math.isfinite(float(loss))) == (poison == "nan-loss")
    # a finite step afterwards moves both parts again
    optimizer.step(lambda: ((model(x) - y) ** 2).mean())
    assert not optimizer.last_step_skipped
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
