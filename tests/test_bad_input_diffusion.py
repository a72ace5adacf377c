"""Bad input to AdjointDPM (AdjointSampler, AdjointDPMCustomization): errors that name the argument,
a caller's UNet left untouched by a failed construction, and warnings for what is not reproduced."""

import warnings

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
)
from test_diffusion_sampler import tiny_unet

from lightning_bpfree.diffusion import AdjointDPMCustomization, AdjointSampler

NAN, INF = float("nan"), float("inf")


def ddim() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=100, clip_sample=False)


def mean_value(x_0: torch.Tensor) -> torch.Tensor:
    return x_0.mean()


@pytest.mark.parametrize(
    "scheduler",
    [
        LMSDiscreteScheduler(num_train_timesteps=100),
        DPMSolverMultistepScheduler(num_train_timesteps=100),
        DPMSolverMultistepScheduler(num_train_timesteps=100, use_karras_sigmas=True),
        DDPMScheduler(num_train_timesteps=100, clip_sample=False),
        EulerDiscreteScheduler(num_train_timesteps=100),
    ],
    ids=["lms", "dpm-solver", "dpm-solver-karras", "ddpm", "euler"],
)
def test_other_schedulers_warn_that_the_probability_flow_ode_is_integrated_instead(scheduler):
    name = type(scheduler).__name__
    with pytest.warns(UserWarning, match=rf"{name}.*probability-flow ODE.*DDIM with eta=0"):
        AdjointSampler(tiny_unet(), scheduler, num_steps=2)


@pytest.mark.parametrize("option", ["clip_sample", "thresholding"])
def test_clip_sample_and_thresholding_warn_that_they_are_not_applied(option):
    options = {"clip_sample": False, option: True}
    with pytest.warns(UserWarning, match=rf"{option}=True\) is not applied"):
        AdjointSampler(tiny_unet(), DDIMScheduler(num_train_timesteps=100, **options), num_steps=2)
    with pytest.warns(UserWarning, match=r"clip_sample=True\) is not applied"):
        AdjointSampler(tiny_unet(), DDIMScheduler(), num_steps=2)  # the diffusers default


def test_ddim_without_clipping_is_integrated_exactly_and_says_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdjointSampler(tiny_unet(), ddim(), num_steps=2)


@pytest.mark.parametrize(
    "x_T, error, message",
    [
        (torch.randn(2, 3, 8, 8), ValueError, "x_T has 3 channels but the unet takes in_channels=1"),
        (torch.randn(2, 8, 8), ValueError, r"x_T must be \[B, C, H, W\]"),
        (torch.randn(2, 1, 1, 8, 8), ValueError, r"x_T must be \[B, C, H, W\]"),
        (torch.randn(0, 1, 8, 8), ValueError, "x_T must be .* B >= 1"),
        (torch.randn(()), ValueError, "x_T must be"),
        (torch.randn(2, 1, 7, 7), ValueError, "x_T's height and width"),
        (torch.randn(2, 1, 8, 8, dtype=torch.float64), TypeError, "x_T has dtype torch.float64"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.long), TypeError, "x_T must be a floating-point"),
        ([[0.0]], TypeError, "x_T must be a floating-point"),
    ],
    ids=["channels", "rank-3", "rank-5", "empty", "0-d", "size", "float64", "int", "list"],
)
def test_sampler_checks_x_T_against_the_unet_before_calling_it(x_T, error, message):
    sampler = AdjointSampler(tiny_unet(), ddim(), num_steps=2)
    with pytest.raises(error, match=message):
        sampler(x_T)
    assert sampler.counter["evaluations"] == 0


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_steps": 0}, ValueError, "num_steps"),
        ({"num_steps": -3}, ValueError, "num_steps"),
        ({"num_steps": 2.5}, TypeError, "num_steps must be an int"),
        ({"method": "dopri5"}, ValueError, "method"),
        ({"guidance_scale": NAN}, ValueError, "guidance_scale"),
        ({"guidance_scale": INF}, ValueError, "guidance_scale"),
        ({"guidance_scale": "2"}, TypeError, "guidance_scale"),
        ({"unet": torch.zeros(3)}, TypeError, "unet"),
        ({"scheduler": object()}, ValueError, "scheduler"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs, error, message):
    arguments = {"unet": tiny_unet(), "scheduler": ddim(), **kwargs}
    with pytest.raises(error, match=message):
        AdjointSampler(**arguments)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"lr": INF}, ValueError, "lr"),
        ({"lr": NAN}, ValueError, "lr"),
        ({"lr": -1e-3}, ValueError, "lr"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"lr": "1e-3"}, TypeError, "lr"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"steps_per_epoch": -1}, ValueError, "steps_per_epoch"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"target": "latents"}, ValueError, "target"),
        ({"objective": 3}, TypeError, "objective"),
        ({"parameter_filter": "no_such_weight"}, ValueError, "parameter_filter"),
        ({"parameter_filter": 3}, TypeError, "parameter_filter"),
        ({"num_steps": 0}, ValueError, "num_steps"),
        ({"sample_shape": (1, 8)}, ValueError, "sample_shape"),
        ({"sample_shape": (1, 0, 8)}, ValueError, r"sample_shape\[1\]"),
        ({"target": "noise", "noise": torch.full((1, 1, 8, 8), NAN)}, ValueError, "noise"),
        ({"target": "noise", "noise": torch.zeros(1, 1, 8, 8, dtype=torch.long)}, TypeError, "noise"),
        ({"target": "noise", "noise": torch.randn(8, 8)}, ValueError, "noise"),
        ({"target": "conditioning", "conditioning": torch.randn(1, 4)}, ValueError, "conditioning"),
        ({"target": "conditioning", "conditioning": torch.full((1, 2, 4), INF)}, ValueError, "conditioning"),
        (
            {"target": "conditioning", "conditioning": torch.randn(1, 2, 4), "trainable_tokens": [5]},
            ValueError,
            "trainable_tokens",
        ),
        ({"negative_conditioning": torch.full((1, 2, 4), NAN)}, ValueError, "negative_conditioning"),
    ],
)
def test_customization_rejects_bad_arguments_and_leaves_the_unet_as_it_was(kwargs, error, message):
    unet = tiny_unet()
    unet.conv_in.requires_grad_(False)  # the caller's own choice of trainable weights
    before = {name: p.requires_grad for name, p in unet.named_parameters()}
    arguments = {"unet": unet, "scheduler": ddim(), "objective": mean_value, **kwargs}
    with pytest.raises(error, match=message):
        AdjointDPMCustomization(**arguments)
    assert {name: p.requires_grad for name, p in unet.named_parameters()} == before


def test_a_filter_that_matches_nothing_leaves_every_weight_trainable():
    """Issue 15, section 2 item 10: the UNet was left with 0 of N parameters trainable."""
    unet = tiny_unet()
    with pytest.raises(ValueError, match="matches no parameter"):
        AdjointDPMCustomization(unet, ddim(), mean_value, parameter_filter="lora_")
    assert all(p.requires_grad for p in unet.parameters())
