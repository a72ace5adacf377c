"""The shared argument checks: each message names the argument; wrong types are TypeErrors."""

import math

import numpy as np
import pytest
import torch

from lightning_bpfree.validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_nonnegative_float,
    check_options,
    check_positive_float,
    check_positive_int,
    check_probability,
    check_seed,
)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_alike(bad):
    with pytest.raises(ValueError, match="lr must be a finite number"):
        check_positive_float("lr", bad)


def test_inf_is_accepted_only_as_an_upper_cap_that_is_off():
    assert check_float("max_norm", math.inf, low=0.0, allow_inf=True) == math.inf
    with pytest.raises(ValueError, match="max_norm"):
        check_float("max_norm", -math.inf, low=0.0, allow_inf=True)
    with pytest.raises(ValueError, match="max_norm"):
        check_float("max_norm", math.nan, low=0.0, allow_inf=True)


@pytest.mark.parametrize("bad", ["1e-3", None, True, [1.0], torch.ones(2)])
def test_non_numbers_are_type_errors_naming_the_argument(bad):
    with pytest.raises(TypeError, match=r"^lr must be a real number"):
        check_positive_float("lr", bad)


def test_ranges_and_their_messages():
    assert check_positive_float("lr", 2) == 2.0 and isinstance(check_positive_float("lr", 2), float)
    assert check_positive_float("lr", np.float32(0.5)) == 0.5
    assert check_positive_float("lr", torch.tensor(0.25)) == 0.25
    with pytest.raises(ValueError, match=r"lr must be > 0, got 0"):
        check_positive_float("lr", 0.0)
    assert check_nonnegative_float("weight_decay", 0.0) == 0.0
    with pytest.raises(ValueError, match=r"weight_decay must be >= 0, got -1"):
        check_nonnegative_float("weight_decay", -1)
    assert check_probability("fraction", 1.0) == 1.0
    with pytest.raises(ValueError, match=r"fraction must be >= 0 and < 1, got 1"):
        check_probability("fraction", 1.0, include_one=False)
    with pytest.raises(ValueError, match=r"beta must be > 0 and < 1, got 1"):
        check_float("beta", 1.0, low=0.0, high=1.0, low_open=True, high_open=True)


def test_ints_refuse_floats_and_bools():
    assert check_positive_int("steps", 3) == 3
    assert check_int("steps", np.int64(4), low=0) == 4
    for bad in (2.0, True, "3"):
        with pytest.raises(TypeError, match=r"^steps must be an int"):
            check_positive_int("steps", bad)
    with pytest.raises(ValueError, match=r"steps must be an int >= 1, got 0"):
        check_positive_int("steps", 0)
    with pytest.raises(ValueError, match=r"seed must be an int >= 0"):
        check_seed("seed", -1)


def test_bools_must_be_real_bools():
    assert check_bool("stochastic_rounding", False) is False
    for bad in ("false", 0, 1, None):
        with pytest.raises(TypeError, match=r"^stochastic_rounding must be True or False"):
            check_bool("stochastic_rounding", bad)


def test_choices_and_unknown_options():
    assert check_choice("fmt", "nvfp4", ("nvfp4", "mxfp4")) == "nvfp4"
    with pytest.raises(ValueError, match=r"fmt must be one of \['mxfp4', 'nvfp4'\], got 'fp8'"):
        check_choice("fmt", "fp8", ("nvfp4", "mxfp4"))
    with pytest.raises(ValueError, match="fmt must be one of"):
        check_choice("fmt", ["unhashable"], {"nvfp4"})
    check_options("ZOSGD", {"lr": 1.0}, ["lr", "eps"])
    with pytest.raises(TypeError, match=r"ZOSGD got unknown option\(s\) 'num_querys'; valid options: eps, lr"):
        check_options("ZOSGD", {"num_querys": 4}, ["lr", "eps"])


def test_float_tensor_and_finite_tensor_checks():
    from lightning_bpfree.validation import check_finite_tensor, check_float_tensor

    x = torch.ones(3)
    assert check_float_tensor("x", x) is x
    for bad, kind in ((torch.ones(3, dtype=torch.long), "torch.int64 tensor"), ([1.0], "list")):
        with pytest.raises(TypeError, match=f"x must be a floating-point tensor, got a? ?{kind}"):
            check_float_tensor("x", bad)
    assert check_finite_tensor("x", x) is x
    with pytest.raises(ValueError, match=r"^images holds NaN or inf: 2 non-finite value\(s\); refused$"):
        check_finite_tensor("images", torch.tensor([1.0, math.nan, -math.inf]), consequence="refused")
    with pytest.raises(ValueError, match=r"rewards holds NaN or inf: 1 non-finite"):
        check_finite_tensor("rewards", np.array([0.0, np.inf]))


def test_generator_int_sequence_and_token_id_checks():
    from lightning_bpfree.validation import check_generator, check_int_sequence, check_token_ids

    generator = torch.Generator()
    assert check_generator("generator", generator) is generator and check_generator("generator", None) is None
    with pytest.raises(TypeError, match=r"^generator must be a torch.Generator or None, got int"):
        check_generator("generator", 0)
    assert check_int_sequence("hidden", [4, 8]) == (4, 8) and check_int_sequence("hidden", ()) == ()
    with pytest.raises(ValueError, match=r"hidden\[1\] must be an int >= 1, got 0"):
        check_int_sequence("hidden", [4, 0])
    with pytest.raises(TypeError, match=r"^hidden must be a sequence of ints"):
        check_int_sequence("hidden", "48")
    assert check_token_ids("ids", [1, 2], 5) == (1, 2)
    with pytest.raises(ValueError, match=r"ids must be token ids in \[0, 5\), got ids from 1 to 5"):
        check_token_ids("ids", torch.tensor([1, 5]), 5)
    with pytest.raises(ValueError, match=r"ids must be token ids in >= 0"):
        check_token_ids("ids", torch.tensor([-1]), None)
    with pytest.raises(TypeError, match=r"ids must hold integer token ids"):
        check_token_ids("ids", torch.tensor([1.0]), 5)
