"""AdjointDPMCustomization: a LightningModule that optimizes a diffusion model's output through its sampler.

The gradient of ``objective(x_0)`` reaches the chosen ``target`` through :class:`AdjointSampler`, so memory
stays that of one UNet call whatever the number of sampling steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bpfree.diffusion.adjoint import AdjointSampler
from lightning_bpfree.diffusion.targets import (
    TARGETS,
    ParameterFilter,
    expand_to_batch,
    objective_loss,
    parameter_selector,
    sample_shape_of,
    seeded_noise,
    select_trainable_weights,
    token_positions,
)
from lightning_bpfree.validation import (
    check_choice,
    check_finite_tensor,
    check_float_tensor,
    check_int,
    check_positive_float,
    check_positive_int,
)


class AdjointDPMCustomization(pl.LightningModule):
    """Optimize UNet weights, the conditioning, or the initial noise of a diffusion model against an objective.

    Each training step samples ``x_0 = sampler(x_T, c)`` with :class:`AdjointSampler` and minimises
    ``objective(x_0)`` (a scalar, or one value per sample that is averaged; return the negative of a
    score you want to raise). Gradients come from the adjoint ODE, so ``num_steps`` costs time, not memory.

    Targets:
        - ``"weights"``: the UNet parameters whose names match ``parameter_filter`` (all by default; a
          regex such as ``"attn"`` or ``"lora_"``, or a callable ``name -> bool``). Fresh noise every step
          (``batch_size`` samples, seeded by ``seed`` and the step). Non-matching parameters are frozen.
        - ``"conditioning"``: the ``conditioning`` embedding ``[B or 1, L, D]`` (embedding inversion), or
          only the token positions in ``trainable_tokens`` (a new token's embedding). The UNet is frozen.
        - ``"noise"``: ``x_T`` itself (``noise`` ``[B, C, H, W]``, or ``batch_size`` standard-normal samples),
          e.g. to audit which inputs drive a model to a given output. The UNet is frozen.

    Freezing sets ``requires_grad=False`` on the UNet parameters that are not optimized. The UNet is kept in
    eval mode throughout: dropout would make the adjoint pass see a different network than the forward pass.

    Args:
        unet: ``UNet2DModel`` / ``UNet2DConditionModel`` (or a module with their call signature).
        scheduler: a diffusers scheduler with ``alphas_cumprod`` (see :class:`AdjointSampler`).
        objective: differentiable ``x_0 [B, C, H, W] -> loss``; a ``nn.Module`` is registered as a submodule
            (so it moves with the LightningModule) but never optimized.
        target: ``"weights"``, ``"conditioning"`` or ``"noise"``.
        num_steps: sampling steps (see :class:`AdjointSampler`).
        method: fixed-grid solver (see :class:`AdjointSampler`).
        adjoint: adjoint ODE (True) or direct backprop (False) through the sampler.
        guidance_scale: classifier-free guidance weight; needs ``negative_conditioning`` when not 1.
        lr: Adam learning rate.
        batch_size: samples per step for ``"weights"`` and default ``"noise"``.
        sample_shape: ``(C, H, W)``; default from ``unet.config`` (``in_channels``, ``sample_size``).
        noise: initial ``x_T`` for ``target="noise"``.
        conditioning: ``encoder_hidden_states`` ``[B or 1, L, D]``; required for ``"conditioning"``.
        negative_conditioning: unconditional embedding for classifier-free guidance.
        parameter_filter: which weights to train for ``target="weights"``.
        trainable_tokens: token positions of ``conditioning`` to train for ``target="conditioning"``.
        steps_per_epoch: length of the built-in step loader (``trainer.fit(module)`` needs no data).
        seed: seeds the noise of ``target="weights"`` and the default ``noise``.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler: Any,
        objective: Callable[[torch.Tensor], torch.Tensor],
        target: str = "weights",
        *,
        num_steps: int = 20,
        method: str = "euler",
        adjoint: bool = True,
        guidance_scale: float = 1.0,
        lr: float = 1e-3,
        batch_size: int = 4,
        sample_shape: Sequence[int] | None = None,
        noise: torch.Tensor | None = None,
        conditioning: torch.Tensor | None = None,
        negative_conditioning: torch.Tensor | None = None,
        parameter_filter: ParameterFilter = None,
        trainable_tokens: Sequence[int] | None = None,
        steps_per_epoch: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.target = check_choice("target", target, TARGETS)
        if not callable(objective):
            raise TypeError(f"objective must be callable x_0 -> loss, got {type(objective).__name__}")
        self.lr = check_positive_float("lr", lr)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.steps_per_epoch = check_positive_int("steps_per_epoch", steps_per_epoch)
        if target == "conditioning" and conditioning is None:
            raise ValueError("target='conditioning' needs the initial `conditioning` embedding [B or 1, L, D]")
        if trainable_tokens is not None and target != "conditioning":
            raise ValueError("trainable_tokens only applies to target='conditioning'")
        if parameter_filter is not None and target != "weights":
            raise ValueError("parameter_filter only applies to target='weights'")
        if noise is not None and target != "noise":
            raise ValueError("noise only applies to target='noise'; target='weights' draws fresh noise each step")
        # seed * 1_000_003 + step must stay a valid torch seed (< 2**64)
        check_int("seed", seed, low=0, high=2**32 - 1)
        for name, tensor in (
            ("noise", noise),
            ("conditioning", conditioning),
            ("negative_conditioning", negative_conditioning),
        ):
            if tensor is not None:
                check_finite_tensor(name, check_float_tensor(name, tensor))
        if target == "conditioning" and conditioning.ndim != 3:
            raise ValueError(f"conditioning must be [B, L, D], got shape {tuple(conditioning.shape)}")
        if trainable_tokens is not None:
            token_positions(trainable_tokens, conditioning.shape[1])
        parameter_selector(parameter_filter)
        self.save_hyperparameters(
            ignore=["unet", "scheduler", "objective", "noise", "conditioning", "negative_conditioning"]
        )
        self.sampler = AdjointSampler(unet, scheduler, num_steps, method, adjoint, guidance_scale)
        if isinstance(objective, nn.Module):
            self.objective = objective
        else:
            self._objective_fn = objective
        self.seed = seed
        self.sample_shape = sample_shape_of(unet, sample_shape, noise)
        # the only change to the caller's UNet, made once everything else has been checked
        select_trainable_weights(unet, parameter_filter, train=target == "weights")

        self.register_buffer("negative_conditioning", negative_conditioning, persistent=False)
        self.register_buffer("token_index", None, persistent=False)
        if target == "conditioning":
            self._init_conditioning(conditioning, trainable_tokens)
        else:
            self.register_buffer("conditioning", conditioning, persistent=False)
        if target == "noise":
            if noise is None:
                noise = seeded_noise(batch_size, self.sample_shape, seed)
            self.noise = nn.Parameter(noise.detach().clone())

    def _init_conditioning(self, conditioning: torch.Tensor, trainable_tokens: Sequence[int] | None) -> None:
        if trainable_tokens is None:
            self.register_buffer("conditioning", None, persistent=False)
            self.token_embeddings = nn.Parameter(conditioning.detach().clone())
            return
        index = token_positions(trainable_tokens, conditioning.shape[1])
        self.register_buffer("conditioning", conditioning.detach().clone(), persistent=True)
        self.token_index = index
        self.token_embeddings = nn.Parameter(conditioning[:, index].detach().clone())

    # ------------------------------------------------------------------ sampling pieces
    def current_conditioning(self) -> torch.Tensor | None:
        """The conditioning the sampler sees: ``[B or 1, L, D]`` with trainable rows put in place."""
        if self.target != "conditioning":
            return self.conditioning
        if self.token_index is None:
            return self.token_embeddings
        return self.conditioning.index_copy(1, self.token_index, self.token_embeddings)

    def draw_noise(self, batch_size: int | None = None, step: int | None = None) -> torch.Tensor:
        """Standard-normal ``x_T`` ``[batch_size, C, H, W]``, seeded by ``seed`` and ``step``."""
        step = self.global_step if step is None else step
        # one stream per (seed, step): a resumed run draws the noise it would have drawn
        noise = seeded_noise(batch_size or self.batch_size, self.sample_shape, self.seed * 1_000_003 + step)
        return noise.to(self.device)

    def forward(self, x_T: torch.Tensor | None = None) -> torch.Tensor:
        """Samples ``x_0`` ``[B, C, H, W]`` from ``x_T`` (default: the optimized noise, or fresh noise)."""
        if x_T is None:
            x_T = self.noise if self.target == "noise" else self.draw_noise()
        batch = x_T.shape[0]
        conditioning = expand_to_batch(self.current_conditioning(), batch)
        negative = expand_to_batch(self.negative_conditioning, batch)
        return self.sampler(x_T, conditioning, negative)

    @torch.no_grad()
    def generate(self, x_T: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` without gradients (e.g. for before/after sample grids)."""
        return self(x_T)

    def evaluate_objective(self, x_T: torch.Tensor | None = None) -> float:
        """The objective of samples from ``x_T`` (default as in ``forward``), without gradients."""
        return float(objective_loss(self._call_objective(self.generate(x_T))))

    def _call_objective(self, x_0: torch.Tensor) -> torch.Tensor:
        objective = self.objective if "objective" in self._modules else self._objective_fn
        return objective(x_0)

    # ------------------------------------------------------------------ Lightning hooks
    def train(self, mode: bool = True) -> AdjointDPMCustomization:
        super().train(mode)
        self.sampler.unet.eval()
        return self

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x_0 = self()
        loss = objective_loss(self._call_objective(x_0))
        self.log("objective", loss, prog_bar=True, batch_size=x_0.shape[0])
        if self.target == "noise":
            self.log("noise_rms", self.noise.detach().pow(2).mean().sqrt(), batch_size=x_0.shape[0])
        return loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The tensors the optimizer updates."""
        if self.target == "noise":
            return [self.noise]
        if self.target == "conditioning":
            return [self.token_embeddings]
        return [p for p in self.sampler.unet.parameters() if p.requires_grad]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.trainable_parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        """Step indices only: every training step samples its own noise."""
        return DataLoader(TensorDataset(torch.arange(self.steps_per_epoch)), batch_size=1)
