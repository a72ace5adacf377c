"""AdjointDPMCustomization: each target improves the objective and touches only what it should."""

import lightning.pytorch as pl
import pytest
import torch
from diffusers import DDIMScheduler
from test_diffusion_sampler import tiny_cond_unet, tiny_unet

from lightning_bpfree.diffusion import AdjointDPMCustomization


def bright_top_half(x_0: torch.Tensor) -> torch.Tensor:
    """A per-sample loss: top half of the image towards +1, bottom half towards -1."""
    height = x_0.shape[-2]
    target = torch.ones_like(x_0)
    target[..., height // 2 :, :] = -1.0
    return (x_0 - target).square().flatten(1).mean(1)


def mean_value(x_0: torch.Tensor) -> torch.Tensor:
    return x_0.mean()


def fit(module, steps):
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    return trainer


def test_noise_target_improves_objective_and_leaves_weights_untouched():
    unet = tiny_unet()
    before_weights = {k: v.clone() for k, v in unet.state_dict().items()}
    module = AdjointDPMCustomization(
        unet, DDIMScheduler(clip_sample=False), bright_top_half, "noise", num_steps=3, lr=0.05, batch_size=2
    )
    start = module.evaluate_objective()
    trainer = fit(module, 15)
    assert trainer.global_step == 15
    assert module.evaluate_objective() < 0.8 * start
    assert all(torch.equal(before_weights[k], v) for k, v in unet.state_dict().items())
    assert "objective" in trainer.callback_metrics and "noise_rms" in trainer.callback_metrics


def test_conditioning_target_trains_only_the_chosen_token():
    unet = tiny_cond_unet()
    conditioning = torch.randn(1, 5, 8)
    module = AdjointDPMCustomization(
        unet,
        DDIMScheduler(clip_sample=False),
        mean_value,
        "conditioning",
        num_steps=3,
        lr=0.5,
        batch_size=2,
        conditioning=conditioning,
        trainable_tokens=[2],
    )
    fixed_noise = torch.randn(2, 2, 8, 8)
    start = module.evaluate_objective(fixed_noise)
    fit(module, 15)
    assert module.evaluate_objective(fixed_noise) < start - 0.2  # x_0 has std ~10: one token moves its mean
    final = module.current_conditioning()
    assert torch.equal(final[:, [0, 1, 3, 4]], conditioning[:, [0, 1, 3, 4]])
    assert not torch.allclose(final[:, 2], conditioning[:, 2])
    assert all(not p.requires_grad for p in unet.parameters())


def test_weights_target_with_filter_improves_and_changes_only_matching_weights():
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.named_parameters()}
    module = AdjointDPMCustomization(
        unet,
        DDIMScheduler(clip_sample=False),
        bright_top_half,
        "weights",
        num_steps=3,
        lr=3e-3,
        batch_size=2,
        parameter_filter="conv_out|up_blocks",
    )
    held_out = torch.randn(4, 1, 8, 8)
    start = module.evaluate_objective(held_out)
    fit(module, 15)
    assert module.evaluate_objective(held_out) < 0.8 * start
    for name, param in unet.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == ("conv_out" in name or "up_blocks" in name), name
    assert not unet.training  # kept in eval mode through fit


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"target": "latents"}, ValueError, "target"),
        ({"target": "conditioning"}, ValueError, "conditioning"),
        ({"parameter_filter": "no-such-layer"}, ValueError, "parameter_filter"),
        ({"parameter_filter": 3}, TypeError, "parameter_filter"),
        ({"lr": 0}, ValueError, "lr"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"target": "noise", "noise": torch.randn(3, 8)}, ValueError, "noise"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        AdjointDPMCustomization(tiny_unet(), DDIMScheduler(), bright_top_half, **kwargs)


def test_target_helpers_work_without_lightning():
    from lightning_bpfree.diffusion.targets import objective_loss, sample_shape_of, select_trainable_weights

    unet = tiny_unet()
    names = [name for name, _ in unet.named_parameters()]
    trainable = select_trainable_weights(unet, "conv_out", train=True)
    assert trainable == sum("conv_out" in name for name in names) > 0
    assert all(p.requires_grad == ("conv_out" in n) for n, p in unet.named_parameters())
    assert select_trainable_weights(unet, None, train=False) == 0
    assert not any(p.requires_grad for p in unet.parameters())
    assert sample_shape_of(unet) == (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    assert sample_shape_of(unet, noise=torch.zeros(2, 3, 4, 5)) == (3, 4, 5)
    assert objective_loss(torch.tensor([1.0, 3.0])).item() == 2.0
    with pytest.raises(TypeError, match="floating-point"):
        objective_loss(torch.tensor([1, 3]))
