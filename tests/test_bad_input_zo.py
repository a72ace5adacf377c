"""Bad input at every public entry point of the zeroth-order capability (docs/zo.md, "Bad input and
non-finite values"): a TypeError/ValueError naming the argument, or the documented non-finite behaviour."""

import math

import pytest
import torch
from torch import nn

from lightning_bpfree import ZerothOrder
from lightning_bpfree.zo import (
    OPTIMIZERS,
    ZOSGD,
    FirstOrderPart,
    GradientSparsity,
    SeededNoise,
    ZOAdam,
    ZOSGDMomentum,
    ZOSGDSign,
    apply_scheme,
    find_blocks,
    make_optimizer,
    mix_seed,
)
from lightning_bpfree.zo.module import CausalLMModule

NAN, INF = float("nan"), float("inf")


def params():
    return [torch.zeros(3, requires_grad=True)]


# ------------------------------------------------------------------------------ the optimizers
COMMON = [
    ({"lr": "1e-3"}, TypeError, "lr"),
    ({"lr": None}, TypeError, "lr"),
    ({"lr": True}, TypeError, "lr"),
    ({"lr": NAN}, ValueError, "lr"),
    ({"lr": INF}, ValueError, "lr"),
    ({"lr": -1e-3}, ValueError, "lr"),
    ({"eps": 0.0}, ValueError, "eps"),
    ({"eps": -1e-3}, ValueError, "eps"),
    ({"eps": NAN}, ValueError, "eps"),
    ({"eps": INF}, ValueError, "eps"),
    ({"eps": "1e-3"}, TypeError, "eps"),
    ({"weight_decay": NAN}, ValueError, "weight_decay"),
    ({"weight_decay": INF}, ValueError, "weight_decay"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay"),
    ({"seed": "abc"}, TypeError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"seed": -1}, ValueError, "seed"),
    ({"one_sided": "false"}, TypeError, "one_sided"),
    ({"num_queries": 0}, ValueError, "num_queries"),
    ({"num_queries": 2.0}, TypeError, "num_queries"),
    ({"perturbation": "uniform"}, ValueError, "perturbation"),
    ({"exact_restore": "yes"}, ValueError, "exact_restore"),
    ({"chunk_numel": 0}, ValueError, "chunk_numel"),
    ({"num_threads": -1}, ValueError, "num_threads"),
    ({"blocks": torch.zeros(3)}, TypeError, "blocks"),
    ({"blocks": []}, ValueError, "blocks"),
    ({"sparsity": 0.5}, TypeError, "sparsity"),
    ({"first_order": "head"}, TypeError, "first_order"),
    ({"num_querys": 4}, TypeError, r"'num_querys'.*valid options"),
]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("kwargs, error, word", COMMON)
def test_every_optimizer_names_the_bad_argument(name, kwargs, error, word):
    with pytest.raises(error, match=word):
        make_optimizer(name, params(), **kwargs)


@pytest.mark.parametrize(
    "build, error, word",
    [
        (lambda: ZOSGD(params(), momentum=0.9), TypeError, r"ZOSGD.*'momentum'.*valid options:.*num_queries"),
        (lambda: ZOSGD(params(), betas=(0.9, 0.99)), TypeError, "'betas'"),
        (lambda: ZOSGDMomentum(params(), momentum=1.0), ValueError, "momentum"),
        (lambda: ZOSGDMomentum(params(), momentum=NAN), ValueError, "momentum"),
        (lambda: ZOSGDMomentum(params(), momentum=-0.1), ValueError, "momentum"),
        (lambda: ZOSGDMomentum(params(), momentum="0.9"), TypeError, "momentum"),
        (lambda: ZOAdam(params(), betas=0.9), ValueError, "betas"),
        (lambda: ZOAdam(params(), betas=(0.9, NAN)), ValueError, "betas"),
        (lambda: ZOAdam(params(), betas=(0.9, 1.0)), ValueError, "betas"),
        (lambda: ZOAdam(params(), betas=("a", 0.9)), TypeError, "betas"),
        (lambda: ZOAdam(params(), adam_eps=0.0), ValueError, "adam_eps"),
        (lambda: ZOAdam(params(), adam_eps=INF), ValueError, "adam_eps"),
        (lambda: ZOSGDSign(params(), sign_mode="sign"), ValueError, "sign_mode"),
        (lambda: ZOSGD([{"params": params(), "lr": INF}]), ValueError, "lr"),
        (lambda: ZOSGD([{"params": params(), "weight_decay": -1.0}]), ValueError, "weight_decay"),
        (lambda: ZOSGD([]), ValueError, "parameter"),
        (lambda: ZOSGD([torch.zeros(3)]), ValueError, "no parameter to train.*requires_grad"),
        (lambda: ZOSGD(nn.Linear(2, 2).requires_grad_(False).parameters()), ValueError, "no parameter to train"),
    ],
)
def test_method_options_and_parameters_name_the_argument(build, error, word):
    with pytest.raises(error, match=word):
        build()


def test_only_first_order_parameters_leave_nothing_for_the_estimate():
    head = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="no parameter to train.*first-order"):
        ZOSGD(head.parameters(), first_order=FirstOrderPart(head.parameters()))


def test_freezing_every_parameter_after_construction_is_refused_at_the_step():
    model = nn.Linear(2, 1)
    optimizer = ZOSGD(model.parameters(), lr=1e-3)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter to train"):
        optimizer.step(lambda: model(torch.ones(1, 2)).sum())


def test_closure_results_that_are_not_one_number_are_refused():
    optimizer = ZOSGD(params(), lr=1e-3)
    with pytest.raises(ValueError, match="closure"):
        optimizer.step()
    with pytest.raises(ValueError, match="scalar"):
        optimizer.step(lambda: torch.zeros(3))
    with pytest.raises(ValueError, match="scalar"):
        optimizer.step(lambda: torch.zeros(0))  # empty
    with pytest.raises(TypeError, match="scalar"):
        optimizer.step(lambda: "loss")
    optimizer.step(lambda: torch.tensor(1.0))  # a 0-d tensor is the usual loss
    optimizer.step(lambda: 1.0)  # and a float (non-differentiable objectives)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_loss_skips_the_step_and_restores_bitwise(name, bad):
    weight = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    optimizer = make_optimizer(name, [weight], lr=1e-2, eps=1e-3, exact_restore=True)
    before = weight.detach().clone()
    optimizer.step(lambda: (weight**2).sum() * bad)
    assert torch.equal(weight, before)
    assert optimizer.zo_state["skipped_steps"] == 1 and optimizer.last_step_skipped


def test_zero_dimensional_and_reduced_precision_parameters_train():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        scalar = torch.tensor(2.0, dtype=dtype, requires_grad=True)
        optimizer = ZOSGD([scalar], lr=0.1, eps=1e-2, seed=0)
        for _ in range(20):
            optimizer.step(lambda scalar=scalar: (scalar.float() - 1.0) ** 2)
        assert abs(float(scalar.detach()) - 1.0) < 1.0, dtype


# ---------------------------------------------------------------------------- the parts
@pytest.mark.parametrize(
    "build, error, word",
    [
        (lambda: FirstOrderPart([]), ValueError, "params"),
        (lambda: FirstOrderPart(["w"]), ValueError, "params"),
        (lambda: FirstOrderPart(params(), lr=NAN), ValueError, "lr"),
        (lambda: FirstOrderPart(params(), lr=INF), ValueError, "lr"),
        (lambda: FirstOrderPart(params(), lr=-1.0), ValueError, "lr"),
        (lambda: FirstOrderPart(params(), lr="0.1"), TypeError, "lr"),
        (lambda: FirstOrderPart(params(), optimizer=5), TypeError, "optimizer"),
        (lambda: GradientSparsity(1.0), ValueError, "fraction"),
        (lambda: GradientSparsity(NAN), ValueError, "fraction"),
        (lambda: GradientSparsity(-0.1), ValueError, "fraction"),
        (lambda: GradientSparsity("0.5"), TypeError, "fraction"),
        (lambda: GradientSparsity(0.5, method="top"), ValueError, "method"),
        (lambda: GradientSparsity(0.5, resample_every=0), ValueError, "resample_every"),
        (lambda: GradientSparsity(0.5, min_numel=-1), ValueError, "min_numel"),
        (lambda: GradientSparsity(0.5, group="tensor"), ValueError, "group"),
        (lambda: find_blocks("model"), TypeError, "model"),
        (lambda: find_blocks(nn.Linear(2, 2), ""), ValueError, "level"),
        (lambda: find_blocks(nn.Linear(2, 2), "(a)(b)"), ValueError, "group"),
        (lambda: find_blocks(nn.Linear(2, 2), "layer"), ValueError, "layer"),
        (lambda: find_blocks(nn.Linear(2, 2), "module", trainable_only="no"), TypeError, "trainable_only"),
        (lambda: SeededNoise("uniform"), ValueError, "perturbation"),
        (lambda: SeededNoise(chunk_numel=0), ValueError, "chunk_numel"),
        (lambda: SeededNoise(chunk_numel=1.5), TypeError, "chunk_numel"),
        (lambda: mix_seed(1.5), TypeError, "integers"),
        (lambda: mix_seed("1"), TypeError, "integers"),
        (lambda: apply_scheme("model", "lora"), TypeError, "model"),
        (lambda: apply_scheme(nn.Linear(2, 2), "adapter"), ValueError, "scheme"),
        (lambda: apply_scheme(nn.Linear(2, 2), "full", r=4), ValueError, "takes no options"),
        (lambda: CausalLMModule("gpt2"), TypeError, "model"),
        (lambda: CausalLMModule(nn.Linear(2, 2), lr=NAN), ValueError, "lr"),
    ],
)
def test_parts_and_helpers_name_the_argument(build, error, word):
    with pytest.raises(error, match=word):
        build()


def test_a_failed_head_scheme_leaves_the_model_trainable():
    model = nn.Sequential(nn.Linear(2, 2))  # no output head to find
    with pytest.raises(ValueError, match="output head"):
        apply_scheme(model, "head")
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------- the callback
@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        ({"optimizer": "zo-magic"}, ValueError, "optimizer"),
        ({"optimizer": None}, ValueError, "optimizer"),
        ({"lr": "1e-3"}, TypeError, "lr"),
        ({"lr": NAN}, ValueError, "lr"),
        ({"lr": INF}, ValueError, "lr"),
        ({"lr": -1.0}, ValueError, "lr"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"eps": INF}, ValueError, "eps"),
        ({"scheduler": 5}, TypeError, "scheduler"),
        ({"disable_dropout": "false"}, TypeError, "disable_dropout"),
        ({"momentum": 0.9}, TypeError, r"ZerothOrder\('zo-sgd'\).*'momentum'.*valid options"),
        ({"num_querys": 4}, TypeError, "'num_querys'"),
        ({"seed": "abc"}, TypeError, "seed"),
        ({"weight_decay": NAN}, ValueError, "weight_decay"),
        ({"optimizer": "zo-adam", "betas": 0.9}, ValueError, "betas"),
        ({"optimizer": "zo-sgd-mmt", "momentum": INF}, ValueError, "momentum"),
    ],
)
def test_zeroth_order_checks_everything_at_construction(kwargs, error, word):
    with pytest.raises(error, match=word):
        ZerothOrder(**kwargs)


def test_the_documented_skip_counts_and_keeps_the_loss_nan():
    weight = torch.tensor([1.0], requires_grad=True)
    optimizer = ZOSGD([weight], lr=1e-2)
    loss = optimizer.step(lambda: weight.sum() * NAN)
    assert math.isnan(float(loss)) and optimizer.zo_state["step"] == 1
