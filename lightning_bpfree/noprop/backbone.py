"""The networks NoProp trains, and the backprop baseline that shares their image encoder. Plain PyTorch.

Two layouts follow the paper's Fig. 6:

- ``label_as_image=False``: the noisy label ``z`` (``[B, d]``) goes through its own MLP and is fused with
  the image features.
- ``label_as_image=True`` (``d`` equals the image size ``C*H*W``): ``z`` is reshaped to an image and
  stacked with the input as extra channels, so the convolutions see both ("processed like an image").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_bpfree.validation import (
    check_choice,
    check_finite_tensor,
    check_int,
    check_int_sequence,
    check_positive_int,
)

EMBEDDINGS = ("one-hot", "learned", "prototype")


def check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    """Validate ``(C, H, W)`` and return it as a tuple of ints."""
    shape = tuple(image_shape) if isinstance(image_shape, Sequence) and not isinstance(image_shape, str) else ()
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"image_shape must be three positive ints (C, H, W), got {image_shape!r}")
    return shape


def check_widths(hidden: int, channels: Sequence[int]) -> None:
    """Refuse a hidden width or conv widths that are not positive ints, naming the argument."""
    check_positive_int("hidden", hidden)
    check_int_sequence("channels", channels)


def check_images(images: Tensor, image_shape: tuple[int, int, int]) -> None:
    """Refuse a batch that is not a floating-point ``[B, C, H, W]`` tensor of the configured shape
    (``B >= 1``) or that holds NaN / inf: a non-finite pixel would make the block losses, and after
    one step the weights, NaN, so it is a ValueError naming ``images`` rather than a silent skip."""
    if not isinstance(images, Tensor) or not images.is_floating_point():
        kind = f"dtype {images.dtype}" if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(f"images must be a floating-point tensor [B, C, H, W], got {kind}")
    if images.dim() != 4 or tuple(images.shape[1:]) != image_shape or images.shape[0] == 0:
        raise ValueError(
            f"images must have shape [B, {image_shape[0]}, {image_shape[1]}, {image_shape[2]}] with B >= 1 "
            f"(image_shape={image_shape}), got {tuple(images.shape)}"
        )
    check_finite_tensor("images", images, consequence="NoProp refuses the batch rather than train on it")


class ImageEncoder(nn.Module):
    """Two 3x3 conv + ReLU + 2x2 max-pool stages and a linear layer: ``[B, C, H, W] -> [B, hidden]``."""

    def __init__(self, in_channels: int, height: int, width: int, channels: Sequence[int], hidden: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for out_channels in channels:
            layers += [nn.Conv2d(previous, out_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            previous = out_channels
            height, width = height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(f"image too small for {len(channels)} pooling stages")
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(previous * height * width, hidden), nn.ReLU())

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)


def time_features(t: Tensor, size: int = 16) -> Tensor:
    """Sinusoidal features of ``t`` in [0, 1]: ``[B] -> [B, size]`` (frequencies 1 .. 2^(size/2 - 1) pi)."""
    frequencies = math.pi * 2.0 ** torch.arange(size // 2, dtype=t.dtype, device=t.device)
    angles = t.unsqueeze(-1) * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class DenoiserBlock(nn.Module):
    """One NoProp block: ``(images [B, C, H, W], z [B, d], t [B] or None) -> [B, out_features]``.

    For DT and CT ``out_features`` is the number of classes (logits whose softmax weights the class
    embeddings); for FM it is ``d`` (a velocity).

    Args:
        image_shape: ``(C, H, W)``.
        embedding_dim: ``d``, the size of ``z``.
        out_features: output width.
        hidden: width of every hidden layer.
        channels: conv widths of the image encoder.
        label_as_image: stack ``z`` (reshaped to ``(C, H, W)``) with the image instead of an MLP branch;
            requires ``d == C * H * W``.
        time_conditioned: add sinusoidal features of ``t`` (continuous-time variants).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        embedding_dim: int,
        out_features: int,
        hidden: int = 128,
        channels: Sequence[int] = (16, 32),
        label_as_image: bool = False,
        time_conditioned: bool = False,
    ) -> None:
        super().__init__()
        self.image_shape = check_image_shape(image_shape)
        c, h, w = self.image_shape
        if label_as_image and embedding_dim != c * h * w:
            raise ValueError(
                f"label_as_image needs embedding_dim == C*H*W = {c * h * w}, got embedding_dim={embedding_dim}"
            )
        self.label_as_image = label_as_image
        self.time_conditioned = time_conditioned
        self.encoder = ImageEncoder(2 * c if label_as_image else c, h, w, channels, hidden)
        fused = hidden
        if not label_as_image:
            self.label_branch = nn.Sequential(
                nn.Linear(embedding_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
            )
            fused += hidden
        if time_conditioned:
            self.time_branch = nn.Sequential(nn.Linear(16, hidden), nn.ReLU())
            fused += hidden
        self.head = nn.Sequential(nn.Linear(fused, hidden), nn.ReLU(), nn.Linear(hidden, out_features))

    def forward(self, images: Tensor, z: Tensor, t: Tensor | None = None) -> Tensor:
        if self.label_as_image:
            parts = [self.encoder(torch.cat([images, z.view(-1, *self.image_shape)], dim=1))]
        else:
            parts = [self.encoder(images), self.label_branch(z)]
        if self.time_conditioned:
            if t is None:
                raise ValueError("this block is time-conditioned: pass t of shape [B]")
            parts.append(self.time_branch(time_features(t.to(images.dtype))))
        return self.head(torch.cat(parts, dim=-1))


class BackpropClassifier(nn.Module):
    """The backprop baseline: the blocks' image encoder and head shape, ``[B, C, H, W] -> [B, K]`` logits."""

    def __init__(
        self,
        num_classes: int,
        image_shape: Sequence[int],
        hidden: int = 128,
        channels: Sequence[int] = (16, 32),
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, low=2)
        check_widths(hidden, channels)
        self.image_shape = check_image_shape(image_shape)
        c, h, w = self.image_shape
        self.encoder = ImageEncoder(c, h, w, channels, hidden)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        check_images(images, self.image_shape)
        return self.head(self.encoder(images))


def class_prototypes(images: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per-class mean image, each scaled to unit L2 norm: ``[N, C, H, W], [N] -> [K, C*H*W]``.

    Used to initialise ``embedding="prototype"``; raises when a class has no example.
    """
    flat = images.reshape(images.shape[0], -1).to(torch.float32)
    counts = torch.bincount(labels, minlength=num_classes)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"class_prototypes: classes {missing} have no example in the given images")
    sums = torch.zeros(num_classes, flat.shape[1]).index_add_(0, labels, flat)
    return F.normalize(sums / counts.unsqueeze(-1), dim=-1)


class ClassEmbedding(nn.Module):
    """The class embedding matrix ``W`` (``[K, d]``); ``u_y = W[y]``.

    Args:
        num_classes: ``K``.
        embedding_dim: ``d``; must equal ``K`` for ``"one-hot"``.
        kind: ``"one-hot"`` (identity, fixed), ``"learned"`` (orthogonal init, trained) or ``"prototype"``
            (initialised from ``prototypes``, trained).
        prototypes: ``[K, d]`` or ``[K, C, H, W]`` initial embeddings for ``"prototype"`` (see
            :func:`class_prototypes`).
        trainable: override whether ``W`` is trained (default: all kinds but one-hot).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        kind: str = "learned",
        prototypes: Tensor | None = None,
        trainable: bool | None = None,
    ) -> None:
        super().__init__()
        check_choice("embedding", kind, EMBEDDINGS)
        if kind == "one-hot":
            if embedding_dim != num_classes:
                raise ValueError(
                    f"embedding='one-hot' needs embedding_dim == num_classes ({num_classes}), got {embedding_dim}"
                )
            weight = torch.eye(num_classes)
        elif kind == "learned":
            weight = nn.init.orthogonal_(torch.empty(num_classes, embedding_dim))
        else:
            if prototypes is None:
                raise ValueError("embedding='prototype' needs prototypes= (e.g. class_prototypes(images, labels, K))")
            weight = prototypes.detach().reshape(prototypes.shape[0], -1).to(torch.float32).clone()
            if tuple(weight.shape) != (num_classes, embedding_dim):
                raise ValueError(
                    f"prototypes must flatten to [num_classes, embedding_dim] = "
                    f"[{num_classes}, {embedding_dim}], "
                    f"got {tuple(prototypes.shape)}"
                )
        self.kind = kind
        self.weight = nn.Parameter(weight, requires_grad=kind != "one-hot" if trainable is None else trainable)

    def forward(self, labels: Tensor) -> Tensor:
        return self.weight[labels]
