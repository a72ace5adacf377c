"""What an AdjointDPM customization optimizes, set up in plain PyTorch.

:class:`~lightning_bpfree.diffusion.module.AdjointDPMCustomization` (the Lightning layer) trains one of
three targets through :class:`~lightning_bpfree.diffusion.adjoint.AdjointSampler`:

- ``"weights"``: the UNet parameters a filter selects (:func:`select_trainable_weights` freezes the rest);
- ``"conditioning"``: the ``encoder_hidden_states`` embedding, or some of its token rows
  (:func:`token_positions`);
- ``"noise"``: the initial ``x_T`` (:func:`seeded_noise`).

The other helpers say what shape the samples have (:func:`sample_shape_of`), broadcast a conditioning
over a batch (:func:`expand_to_batch`) and turn an objective's output into the scalar loss
(:func:`objective_loss`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lightning_bpfree.validation import check_positive_int

TARGETS = ("weights", "conditioning", "noise")

ParameterFilter = str | Callable[[str], bool] | None
"""``None`` (every weight), a regular expression searched in parameter names, or a callable ``name -> bool``."""


def parameter_selector(parameter_filter: ParameterFilter) -> Callable[[str], bool]:
    """The predicate ``name -> bool`` that ``parameter_filter`` describes (see :data:`ParameterFilter`)."""
    if parameter_filter is None:
        return lambda name: True
    if isinstance(parameter_filter, str):
        pattern = re.compile(parameter_filter)
        return lambda name: pattern.search(name) is not None
    if callable(parameter_filter):
        return parameter_filter
    raise TypeError(
        "parameter_filter must be None (all weights), a regular expression searched in parameter names "
        f"(e.g. 'attn' or 'lora_'), or a callable name -> bool; got {type(parameter_filter).__name__}"
    )


def select_trainable_weights(unet: nn.Module, parameter_filter: ParameterFilter, *, train: bool) -> int:
    """Set ``requires_grad`` on every parameter of ``unet``: True where ``train`` and the filter selects it.

    With ``train=False`` the whole UNet is frozen (the conditioning or the noise is optimized instead).

    Returns:
        The number of parameter tensors left trainable.

    Raises:
        ValueError: ``train`` is True and the filter selects no parameter.
    """
    select = parameter_selector(parameter_filter)
    # decide every flag first: a filter that matches nothing must leave the caller's UNet untouched
    chosen = [(param, train and bool(select(name))) for name, param in unet.named_parameters()]
    trainable = sum(train_it for _, train_it in chosen)
    if train and trainable == 0:
        raise ValueError(f"parameter_filter={parameter_filter!r} matches no parameter of the unet")
    for param, train_it in chosen:
        param.requires_grad_(train_it)
    return trainable


def sample_shape_of(
    unet: nn.Module, sample_shape: Sequence[int] | None = None, noise: torch.Tensor | None = None
) -> tuple[int, ...]:
    """The ``(C, H, W)`` of one sample: from ``noise [B, C, H, W]``, else ``sample_shape``, else ``unet.config``."""
    if noise is not None:
        if noise.ndim != 4:
            raise ValueError(f"noise must be [B, C, H, W], got shape {tuple(noise.shape)}")
        return tuple(noise.shape[1:])
    if sample_shape is not None:
        if isinstance(sample_shape, (str, bytes)) or not isinstance(sample_shape, Sequence) or len(sample_shape) != 3:
            raise ValueError(f"sample_shape must be (C, H, W), got {sample_shape!r}")
        return tuple(check_positive_int(f"sample_shape[{i}]", s) for i, s in enumerate(sample_shape))
    config = getattr(unet, "config", None)
    size = getattr(config, "sample_size", None)
    channels = getattr(config, "in_channels", None)
    if size is None or channels is None:
        raise ValueError("sample_shape=(C, H, W) is required when the unet has no config.sample_size")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (int(channels), int(height), int(width))


def seeded_noise(batch_size: int, sample_shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard-normal ``x_T`` ``[batch_size, *sample_shape]`` on the CPU, the same for the same ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, *sample_shape, generator=generator)


def token_positions(trainable_tokens: Sequence[int], length: int) -> torch.Tensor:
    """``trainable_tokens`` as int64 positions ``[K]``, checked to be non-empty and inside ``[0, length)``."""
    index = torch.as_tensor(list(trainable_tokens), dtype=torch.long)
    if index.numel() == 0 or bool((index < 0).any() | (index >= length).any()):
        raise ValueError(f"trainable_tokens must be non-empty positions in [0, {length}), got {trainable_tokens}")
    return index


def expand_to_batch(tensor: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """A conditioning ``[1 or batch, L, D]`` broadcast to ``[batch, L, D]`` (None stays None)."""
    if tensor is None or tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] != 1:
        raise ValueError(f"conditioning batch {tensor.shape[0]} does not match the {batch} samples")
    return tensor.expand(batch, *tensor.shape[1:])


def objective_loss(loss: torch.Tensor) -> torch.Tensor:
    """The scalar an objective's output stands for: itself, or the mean of one value per sample."""
    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
        raise TypeError("objective must return a floating-point tensor (a scalar or one value per sample)")
    return loss.mean() if loss.ndim > 0 else loss
