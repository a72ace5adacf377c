"""AdjointSampler: DDIM equivalence, adjoint gradients vs direct backprop, frozen weights, bad inputs."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel, UNet2DModel

from lightning_bpfree.diffusion import AdjointSampler


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    ).eval()


def tiny_cond_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def ddim_sample(unet, scheduler, x, num_steps, cond=None, negative=None, guidance_scale=1.0):
    scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps:
        if cond is None:
            eps = unet(x, t).sample
        elif guidance_scale == 1.0:
            eps = unet(x, t, encoder_hidden_states=cond).sample
        else:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([negative, cond])).sample
            uncond, conditional = out.chunk(2)
            eps = uncond + guidance_scale * (conditional - uncond)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_euler_on_scheduler_timesteps_equals_ddim_eta0(prediction_type, set_alpha_to_one):
    unet = tiny_unet()
    scheduler = DDIMScheduler(clip_sample=False, prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one)
    x_T = torch.randn(3, 1, 8, 8)
    sampler = AdjointSampler(unet, scheduler, num_steps=8, method="euler")
    with torch.no_grad():
        ours = sampler(x_T)
        reference = ddim_sample(unet, scheduler, x_T, 8)
    assert sampler.counter["evaluations"] == (8 if set_alpha_to_one else 7)  # last DDIM step is t=0 -> 0
    assert (reference - ours).abs().max() < 1e-4 * reference.abs().max()
    assert ours.abs().max() > 0.1  # not a degenerate all-zero comparison


SPACING_STEPS = [
    pytest.param(spacing, steps, marks=[pytest.mark.slow] if steps >= 30 else [])
    for spacing in ("leading", "trailing", "linspace")
    for steps in (7, 10, 30, 50)
]


@pytest.mark.parametrize(("spacing", "num_steps"), SPACING_STEPS)
def test_euler_equals_diffusers_ddim_loop_for_every_spacing(spacing, num_steps):
    """DDIMScheduler.step goes t -> t - T // n, which for trailing / linspace is not the next listed timestep."""
    unet = tiny_unet()
    scheduler = DDIMScheduler(clip_sample=False, timestep_spacing=spacing)
    x_T = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(num_steps))
    sampler = AdjointSampler(unet, scheduler, num_steps=num_steps, method="euler")
    with torch.no_grad():
        ours = sampler(x_T)
        reference = ddim_sample(unet, scheduler, x_T, num_steps)
    # measured 2e-7 to 4e-7 (float32 rounding); before the pairs, trailing / linspace were 2.7e-2 to 0.9 off
    assert float((ours - reference).norm() / reference.norm()) < 1e-5
    assert ours.abs().max() > 0.1


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_stable_diffusion_settings_equal_the_ddim_loop(spacing):
    """steps_offset=1, set_alpha_to_one=False (Stable Diffusion's DDIM config) with the other spacings."""
    unet = tiny_unet()
    scheduler = DDIMScheduler(
        clip_sample=False,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        set_alpha_to_one=False,
        timestep_spacing=spacing,
    )
    x_T = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = AdjointSampler(unet, scheduler, num_steps=10)(x_T)
        reference = ddim_sample(unet, scheduler, x_T, 10)
    assert float((ours - reference).norm() / reference.norm()) < 1e-5


def test_step_pairs_are_diffusers_t_minus_stride():
    """Hand-derived from DDIMScheduler: linspace(0, 999, 10) rounded, trailing round(arange(1000, 0, -1000/7)) - 1."""
    unet = tiny_unet()
    linspace = AdjointSampler(unet, DDIMScheduler(clip_sample=False, timestep_spacing="linspace"), num_steps=10)
    assert linspace.timestep_pairs == [(999 - 111 * i, 899 - 111 * i) for i in range(10)]  # ends at (0, -100)
    trailing = AdjointSampler(unet, DDIMScheduler(clip_sample=False, timestep_spacing="trailing"), num_steps=7)
    starts = [999, 856, 713, 570, 428, 285, 142]
    assert trailing.timestep_pairs == [(t, t - 142) for t in starts]
    # the last step lands on t=0, not on final_alpha_cumprod: the grid ends at rho(alphas_cumprod[0])
    abar0 = float(DDIMScheduler().alphas_cumprod[0])
    assert float(trailing.rho_grid[-1]) == pytest.approx(((1 - abar0) / abar0) ** 0.5, rel=1e-12)
    leading = AdjointSampler(unet, DDIMScheduler(clip_sample=False), num_steps=10)
    assert leading.step_pairs is None  # every step lands on the next listed timestep: the plain ODE


def test_guided_conditional_sampling_equals_ddim_with_cfg():
    unet = tiny_cond_unet()
    scheduler = DDIMScheduler(clip_sample=False)
    x_T, cond, negative = torch.randn(2, 2, 8, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    sampler = AdjointSampler(unet, scheduler, num_steps=6, guidance_scale=3.0)
    with torch.no_grad():
        ours = sampler(x_T, cond, negative)
        reference = ddim_sample(unet, scheduler, x_T, 6, cond, negative, 3.0)
        unguided = ddim_sample(unet, scheduler, x_T, 6, cond)
    assert (reference - ours).abs().max() < 1e-4 * reference.abs().max()
    assert (unguided - ours).abs().max() > 1e-2  # guidance changed the result


def test_schedulers_without_final_alpha_end_noise_free_and_do_not_change_the_scheduler():
    unet = tiny_unet()
    for scheduler in (DDPMScheduler(), DPMSolverMultistepScheduler()):
        before = None if scheduler.num_inference_steps is None else scheduler.timesteps.clone()
        sampler = AdjointSampler(unet, scheduler, num_steps=5)
        assert float(sampler.rho_grid[-1]) == 0.0
        assert scheduler.num_inference_steps is None and before is None
    dpm = AdjointSampler(unet, DPMSolverMultistepScheduler(), num_steps=10)
    assert dpm.timesteps.tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    # rho grid matches the DPM-Solver scheduler's own sigmas (sigma/alpha)
    reference = DPMSolverMultistepScheduler()
    reference.set_timesteps(10)
    assert torch.allclose(dpm.rho_grid.float(), reference.sigmas.float(), rtol=1e-4)


def _loss_and_grads(unet, x_T, cond, num_steps, method, adjoint):
    sampler = AdjointSampler(
        unet, DDIMScheduler(clip_sample=False), num_steps=num_steps, method=method, adjoint=adjoint
    )
    x_T = x_T.clone().requires_grad_(True)
    cond = cond.clone().requires_grad_(True)
    unet.zero_grad(set_to_none=True)
    x_0 = sampler(x_T, cond)
    # a loss that depends on where samples land, not only on their scale
    loss = (x_0 * torch.linspace(-1.0, 1.0, x_0.numel()).view_as(x_0)).sum() + (x_0**2).mean()
    loss.backward()
    weights = torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])
    return x_0.detach(), {"x_T": x_T.grad, "conditioning": cond.grad, "weights": weights}


def _relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_euler_adjoint_gradients_approach_direct_backprop_as_steps_grow():
    """Euler: the adjoint is the continuous gradient, backprop the discrete one; the gap is O(1/N)."""
    unet = tiny_cond_unet()
    x_T, cond = torch.randn(1, 2, 8, 8), torch.randn(1, 5, 8)
    errors = {}
    for num_steps in (16, 48):
        x_adj, adjoint = _loss_and_grads(unet, x_T, cond, num_steps, "euler", adjoint=True)
        x_dir, direct = _loss_and_grads(unet, x_T, cond, num_steps, "euler", adjoint=False)
        assert torch.allclose(x_adj, x_dir, atol=1e-5)  # same forward solve
        errors[num_steps] = {name: _relative_error(adjoint[name], direct[name]) for name in direct}
    for name in ("x_T", "conditioning", "weights"):
        # 3x the steps: O(1/N) predicts a third of the gap; allow 1.5x that
        assert errors[48][name] < 0.5 * errors[16][name], (name, errors)
        assert 1e-4 < errors[48][name] < 0.5, (name, errors)  # computed differently, same direction
    # Measured at 48 steps: x_T 0.045, conditioning 0.42, weights 0.13 (16 steps: 0.12, 1.0, 0.36).
    # torchdiffeq's odeint_adjoint discretises the continuous adjoint (optimise-then-discretise): it
    # rebuilds y backwards by Euler and evaluates the UNet's VJP at the other end of each step, so it
    # is not the transpose of the forward Euler map. The first steps are huge (rho from 88 to 73 at
    # 48 steps), so the constant of the O(1/N) gap is large; conditioning gradients, small and built
    # up near the noise end, carry most of it. Bounds: 1.5x the measured gaps.
    for name, bound in (("x_T", 0.07), ("conditioning", 0.63), ("weights", 0.2)):
        assert errors[48][name] < bound, (name, errors)


def test_rk4_adjoint_gradients_match_direct_backprop_closely():
    """With a 4th-order solver the discretisation gap nearly vanishes: the adjoint wiring is exact."""
    unet = tiny_cond_unet()
    x_T, cond = torch.randn(1, 2, 8, 8), torch.randn(1, 5, 8)
    _, adjoint = _loss_and_grads(unet, x_T, cond, 8, "rk4", adjoint=True)
    _, direct = _loss_and_grads(unet, x_T, cond, 8, "rk4", adjoint=False)
    for name in ("x_T", "conditioning", "weights"):
        assert _relative_error(adjoint[name], direct[name]) < 0.02, name


def _paired_loss_and_grads(unet, x_T, cond, adjoint):
    scheduler = DDIMScheduler(clip_sample=False, timestep_spacing="linspace")
    sampler = AdjointSampler(unet, scheduler, num_steps=8, method="rk4", adjoint=adjoint)
    x_T, cond = x_T.clone().requires_grad_(True), cond.clone().requires_grad_(True)
    unet.zero_grad(set_to_none=True)
    x_0 = sampler(x_T, cond)
    ((x_0 * torch.linspace(-1.0, 1.0, x_0.numel()).view_as(x_0)).sum() + (x_0**2).mean()).backward()
    weights = torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])
    return {"x_T": x_T.grad, "conditioning": cond.grad, "weights": weights}


def test_adjoint_matches_backprop_through_the_paired_ddim_steps():
    """linspace spacing: every step is a paired map; rk4's adjoint still matches its backprop."""
    unet = tiny_cond_unet()
    x_T, cond = torch.randn(1, 2, 8, 8), torch.randn(1, 5, 8)
    adjoint = _paired_loss_and_grads(unet, x_T, cond, adjoint=True)
    direct = _paired_loss_and_grads(unet, x_T, cond, adjoint=False)
    # measured 1.3e-3 / 2.3e-2 / 4.8e-3; 16 % for conditioning if step maps leaked across grid points
    for name, bound in (("x_T", 0.005), ("conditioning", 0.05), ("weights", 0.01)):
        assert _relative_error(adjoint[name], direct[name]) < bound, name


def test_frozen_parameters_get_no_gradient_and_trainable_ones_do():
    unet = tiny_cond_unet()
    for name, param in unet.named_parameters():
        param.requires_grad_("attn" in name)
    sampler = AdjointSampler(unet, DDIMScheduler(clip_sample=False), num_steps=4)
    x_T = torch.randn(1, 2, 8, 8)
    sampler(x_T, torch.randn(1, 5, 8)).square().mean().backward()
    assert x_T.grad is None
    trainable = [p for n, p in unet.named_parameters() if "attn" in n]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for n, p in unet.named_parameters() if "attn" not in n)


def test_memory_saved_for_backward_is_independent_of_num_steps():
    """Bytes autograd keeps for backward: flat for the adjoint, growing with steps for direct backprop."""
    unet = tiny_unet()

    def saved_bytes(num_steps, adjoint):
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        sampler = AdjointSampler(unet, DDIMScheduler(clip_sample=False), num_steps=num_steps, adjoint=adjoint)
        x_T = torch.randn(1, 1, 8, 8, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            x_0 = sampler(x_T)
        x_0.sum().backward()
        return total

    adjoint = [saved_bytes(n, True) for n in (2, 8)]
    direct = [saved_bytes(n, False) for n in (2, 8)]
    assert adjoint[1] == adjoint[0]
    assert direct[1] > 3 * direct[0]
    assert adjoint[1] < direct[0]


class NoAlphas:
    def set_timesteps(self, n):
        pass


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheduler": NoAlphas()}, "alphas_cumprod"),
        ({"method": "dopri5"}, "method"),
        ({"num_steps": 0}, "num_steps"),
    ],
)
def test_bad_inputs_raise_value_error_naming_them(kwargs, message):
    arguments = {"unet": tiny_unet(), "scheduler": DDIMScheduler(), **kwargs}
    with pytest.raises(ValueError, match=message):
        AdjointSampler(**arguments)


def test_a_fractional_step_count_is_a_type_error_naming_it():
    # validation.py's rule everywhere: a value of the wrong type is a TypeError
    with pytest.raises(TypeError, match="num_steps must be an int"):
        AdjointSampler(tiny_unet(), DDIMScheduler(), num_steps=2.5)


def test_guidance_without_negative_conditioning_is_rejected():
    sampler = AdjointSampler(tiny_cond_unet(), DDIMScheduler(), num_steps=2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="negative_encoder_hidden_states"):
        sampler(torch.randn(1, 2, 8, 8), torch.randn(1, 5, 8))


@pytest.mark.parametrize("method", ["midpoint", "explicit_adams"])
def test_other_solvers_give_adjoint_gradients_close_to_their_backprop(method):
    unet = tiny_cond_unet()
    x_T, cond = torch.randn(1, 2, 8, 8), torch.randn(1, 5, 8)
    _, adjoint = _loss_and_grads(unet, x_T, cond, 8, method, adjoint=True)
    _, direct = _loss_and_grads(unet, x_T, cond, 8, method, adjoint=False)
    _, euler_adjoint = _loss_and_grads(unet, x_T, cond, 8, "euler", adjoint=True)
    _, euler_direct = _loss_and_grads(unet, x_T, cond, 8, "euler", adjoint=False)
    for name in ("x_T", "weights"):
        gap = _relative_error(adjoint[name], direct[name])
        assert gap < 0.75 * _relative_error(euler_adjoint[name], euler_direct[name]), (method, name, gap)
