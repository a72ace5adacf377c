"""NoProp-DT, -CT and -FM as plain PyTorch modules: their losses, their inference, and the DT training step.

No gradient ever flows through the inference chain. NoProp-DT goes further: each of its ``T`` blocks is
trained only on its own denoising loss, with an input ``z_{t-1}`` drawn directly from ``q(z_{t-1} | y)``,
so the blocks never see each other's outputs or gradients during training. CT and FM train one
time-conditioned network on a random time per example.

Shapes: images ``[B, C, H, W]``, labels ``[B]`` int64, latents ``z`` ``[B, d]`` (``d`` = embedding size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_bpfree.noprop.backbone import (
    ClassEmbedding,
    DenoiserBlock,
    check_image_shape,
    check_images,
    check_widths,
)
from lightning_bpfree.noprop.schedules import (
    LearnableNoiseSchedule,
    cosine_alpha_bar,
    ddim_update,
    dt_inference_coefficients,
    dt_loss_weights,
    kl_to_standard_normal,
    sample_marginal,
)
from lightning_bpfree.validation import (
    check_bool,
    check_choice,
    check_finite_tensor,
    check_int,
    check_nonnegative_float,
    check_optional,
    check_positive_float,
    check_positive_int,
)

SOLVERS = ("euler", "heun")


class _NoPropNet(nn.Module):
    """What the three variants share: the class embedding ``W``, the output layer on the final latent,
    the choice of layout (``z`` stacked with the image when ``d == C*H*W``) and the shape of the
    denoising networks. Its keyword arguments, every variant's ``**options``, are listed in
    :class:`NoPropDTNet`."""

    def __init__(
        self,
        num_classes: int,
        image_shape: Sequence[int],
        *,
        embedding: str = "learned",
        embedding_dim: int | None = None,
        prototypes: Tensor | None = None,
        train_embedding: bool | None = None,
        hidden: int = 128,
        channels: Sequence[int] = (16, 32),
    ) -> None:
        super().__init__()
        check_widths(hidden, channels)
        check_optional(check_bool, "train_embedding", train_embedding)
        if prototypes is not None:
            check_finite_tensor("prototypes", torch.as_tensor(prototypes))
        self.hidden, self.channels = hidden, channels
        self.num_classes = check_int("num_classes", num_classes, low=2)
        self.image_shape = check_image_shape(image_shape)
        image_size = self.image_shape[0] * self.image_shape[1] * self.image_shape[2]
        if embedding_dim is None:
            embedding_dim = image_size if embedding == "prototype" else num_classes
        self.embedding_dim = check_positive_int("embedding_dim", embedding_dim)
        self.label_as_image = embedding_dim == image_size
        self.embedding = ClassEmbedding(num_classes, embedding_dim, embedding, prototypes, train_embedding)
        self.output_layer = nn.Linear(embedding_dim, num_classes)

    def _denoiser(self, out_features: int, time_conditioned: bool) -> DenoiserBlock:
        """A denoising network of this model's shape: ``(images, z [B, d], t) -> [B, out_features]``."""
        return DenoiserBlock(
            self.image_shape, self.embedding_dim, out_features, self.hidden, self.channels, self.label_as_image,
            time_conditioned,
        )  # fmt: skip

    def _check_batch(self, images: Tensor, labels: Tensor | None = None) -> None:
        check_images(images, self.image_shape)
        if labels is not None:
            if labels.shape != images.shape[:1] or labels.dtype != torch.int64:
                raise ValueError(
                    f"labels must be int64 of shape [{images.shape[0]}], got {labels.dtype} {tuple(labels.shape)}"
                )
            if bool(((labels < 0) | (labels >= self.num_classes)).any()):
                raise ValueError(
                    f"labels must lie in [0, {self.num_classes}), got min {labels.min()} max {labels.max()}"
                )

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The output layer and, when trained, the class embeddings."""
        yield from self.output_layer.parameters()
        if self.embedding.weight.requires_grad:
            yield self.embedding.weight

    def embed_probabilities(self, logits: Tensor) -> Tensor:
        """``softmax(logits) @ W``: a convex combination of class embeddings, ``[B, K] -> [B, d]``."""
        return logits.softmax(-1) @ self.embedding.weight

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``[B, K]`` from running inference (see ``sample``)."""
        return self.output_layer(self.sample(images))

    def sample(self, images: Tensor) -> Tensor:  # pragma: no cover - every variant overrides it
        raise NotImplementedError


class NoPropDTNet(_NoPropNet):
    """NoProp in discrete time: ``T`` independent blocks on the fixed cosine schedule.

    Args:
        num_classes: ``K``.
        image_shape: ``(C, H, W)``.
        num_blocks: ``T``.
        eta: scale of the denoising losses (paper: 0.1).
        max_alpha_bar: signal fraction of ``z_T`` (clip of the cosine schedule).
        inference_noise: add the ``sqrt(c_t) eps`` term during inference (the paper does).
        inference_samples: independent inference chains whose class probabilities ``forward`` averages
            (1: one chain, plain logits). Averaging Monte Carlo estimates ``p(y | x)`` under the
            stochastic update; it only matters with ``inference_noise=True``.
        **options: keyword arguments every variant (DT, CT, FM) shares:

            - ``embedding``: ``"one-hot"``, ``"learned"`` (orthogonal init, the default) or ``"prototype"``;
            - ``embedding_dim``: ``d``; default ``K`` (``C*H*W`` for prototypes); ``d == C*H*W`` selects
              the image layout;
            - ``prototypes``: initial ``[K, d]`` (or ``[K, C, H, W]``) embeddings for ``"prototype"``, e.g.
              :func:`lightning_bpfree.noprop.class_prototypes`;
            - ``train_embedding``: override whether ``W`` is trained (default: all kinds but one-hot);
            - ``hidden``: width of the hidden layers (default 128);
            - ``channels``: conv widths of the image encoder (default ``(16, 32)``).
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: Sequence[int],
        num_blocks: int = 10,
        *,
        eta: float = 0.1,
        max_alpha_bar: float = 0.999,
        inference_noise: bool = True,
        inference_samples: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(num_classes, image_shape, **options)
        check_positive_int("num_blocks", num_blocks)
        check_bool("inference_noise", inference_noise)
        self.inference_samples = check_positive_int("inference_samples", inference_samples)
        check_positive_float("eta", eta)
        alpha_bar = cosine_alpha_bar(num_blocks, max_alpha_bar=max_alpha_bar)
        a, b, c = dt_inference_coefficients(alpha_bar)
        self.register_buffer("alpha_bar", alpha_bar.float())
        self.register_buffer("loss_weights", dt_loss_weights(alpha_bar, eta).float())
        self.register_buffer("coef_a", a.float())
        self.register_buffer("coef_b", b.float())
        self.register_buffer("coef_c", c.float())
        self.inference_noise = inference_noise
        self.blocks = nn.ModuleList(self._denoiser(num_classes, time_conditioned=False) for _ in range(num_blocks))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def forward(self, images: Tensor) -> Tensor:
        """Class scores ``[B, K]``: the output layer's logits on ``z_T`` for one chain, or, with
        ``inference_samples > 1``, the log of the class probabilities averaged over that many chains."""
        single_chain = super().forward
        if self.inference_samples == 1:
            return single_chain(images)
        probabilities = sum(single_chain(images).softmax(-1) for _ in range(self.inference_samples))
        return (probabilities / self.inference_samples).log()

    def _check_block(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block must be in [0, {self.num_blocks}), got {block}")

    def predict_embedding(self, block: int, images: Tensor, z: Tensor) -> Tensor:
        """Block ``block + 1``'s estimate ``u_hat`` of the label embedding from ``z_block``: ``[B, d]``."""
        return self.embed_probabilities(self.blocks[block](images, z))

    def block_loss(self, block: int, images: Tensor, labels: Tensor) -> Tensor:
        """Block ``t = block + 1``'s loss ``(T eta / 2)(SNR(t) - SNR(t-1)) E||u_hat_t(z_{t-1}, x) - u_y||^2``.

        ``z_{t-1}`` is drawn from ``q(z_{t-1} | y)``; the loss touches only this block's parameters
        and the shared class embeddings.
        """
        self._check_block(block)
        self._check_batch(images, labels)
        target = self.embedding(labels)
        z_previous = sample_marginal(target, self.alpha_bar[block])
        squared_error = (self.predict_embedding(block, images, z_previous) - target).pow(2).sum(-1)
        return self.loss_weights[block] * squared_error.mean()

    def head_loss(self, labels: Tensor) -> Tensor:
        """Cross-entropy of the output layer on ``z_T ~ q(z_T | y)`` plus ``KL(q(z_0 | y) || N(0, I))``."""
        target = self.embedding(labels)
        z_final = sample_marginal(target, self.alpha_bar[-1])
        prior = kl_to_standard_normal(target, self.alpha_bar[0])
        return F.cross_entropy(self.output_layer(z_final), labels) + prior.mean()

    @torch.no_grad()
    def sample(self, images: Tensor) -> Tensor:
        """Blocks in order from ``z_0 ~ N(0, I)``, ``z_t = a_t u_hat_t + b_t z_{t-1} + sqrt(c_t) eps``.

        Returns ``z_T``, ``[B, d]``.
        """
        self._check_batch(images)
        z = torch.randn(images.shape[0], self.embedding_dim, dtype=images.dtype, device=images.device)
        for block in range(self.num_blocks):
            u_hat = self.predict_embedding(block, images, z)
            z = self.coef_a[block] * u_hat + self.coef_b[block] * z
            if self.inference_noise:
                z = z + self.coef_c[block].sqrt() * torch.randn_like(z)
        return z


def noprop_dt_step(
    net: NoPropDTNet,
    block_optimizers: Sequence[torch.optim.Optimizer],
    head_optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    backward: Callable[[Tensor], None] | None = None,
    step: Callable[[torch.optim.Optimizer], None] | None = None,
) -> dict[str, float]:
    """One NoProp-DT training step on a batch: every block, then the head, each with its own optimizer.

    Blocks are processed one after another, each freeing its graph before the next is built, so peak
    activation memory is that of a single block. The shared class embeddings accumulate the gradients
    of all block losses and of the head loss and are updated once, by ``head_optimizer``, at the end.

    Args:
        net: the model.
        block_optimizers: one optimizer per block, over that block's parameters only.
        head_optimizer: over ``net.head_parameters()``.
        images: the batch's images, ``[B, C, H, W]``.
        labels: the batch's labels, ``[B]`` int64.
        backward: how to back-propagate a loss within one block (default ``loss.backward()``;
            Lightning passes ``manual_backward``).
        step: how to step an optimizer (default ``optimizer.step()``).

    Returns:
        ``{"block_<t>": loss, ..., "head": loss}`` as floats.
    """
    if len(block_optimizers) != net.num_blocks:
        raise ValueError(f"need one optimizer per block ({net.num_blocks}), got {len(block_optimizers)}")
    backward = backward or (lambda loss: loss.backward())
    step = step or (lambda optimizer: optimizer.step())
    losses: dict[str, float] = {}
    head_optimizer.zero_grad(set_to_none=True)
    for block, optimizer in enumerate(block_optimizers):
        optimizer.zero_grad(set_to_none=True)
        loss = net.block_loss(block, images, labels)
        backward(loss)
        step(optimizer)
        losses[f"block_{block + 1}"] = loss.item()
    loss = net.head_loss(labels)
    backward(loss)
    step(head_optimizer)
    losses["head"] = loss.item()
    return losses


class NoPropCTNet(_NoPropNet):
    """NoProp in continuous time: one network ``u_hat(z_t, x, t)`` and a learnable schedule, ``t ~ U[0, 1]``.

    Loss: ``(eta / 2) SNR'(t) ||u_hat - u_y||^2`` + cross-entropy on ``z_1 ~ q(z_1 | y)`` +
    ``KL(q(z_0 | y) || N(0, I))``. Inference integrates the probability-flow ODE of ``q`` from ``t = 0``
    to ``1`` (``solver="euler"``: exponential-integrator Euler, one network call per step; ``"heun"``:
    its trapezoidal corrector, two calls per step).

    Args:
        num_classes: ``K``.
        image_shape: ``(C, H, W)``.
        eta: scale of the denoising loss (paper: 1).
        gamma_min: ``gamma(1)``, the low end of the log-SNR range.
        gamma_max: ``gamma(0)``, the high end of the log-SNR range.
        inference_steps: number of ODE steps.
        solver: ``"euler"`` or ``"heun"``.
        **options: the options every variant shares (see :class:`NoPropDTNet`).
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: Sequence[int],
        *,
        eta: float = 1.0,
        gamma_min: float = -4.0,
        gamma_max: float = 4.0,
        inference_steps: int = 20,
        solver: str = "euler",
        **options: Any,
    ) -> None:
        super().__init__(num_classes, image_shape, **options)
        check_positive_float("eta", eta)
        _check_solver(solver, inference_steps)
        self.eta, self.inference_steps, self.solver = eta, inference_steps, solver
        self.schedule = LearnableNoiseSchedule(gamma_min, gamma_max)
        self.denoiser = self._denoiser(num_classes, time_conditioned=True)

    def predict_embedding(self, images: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """``u_hat(z_t, x, t)``, ``[B, d]``; ``t`` is ``[B]``."""
        return self.embed_probabilities(self.denoiser(images, z, t))

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The CT objective for one batch and its three parts (``denoise``, ``ce``, ``kl``)."""
        self._check_batch(images, labels)
        target = self.embedding(labels)
        t = torch.rand(labels.shape[0], device=images.device)
        _, snr_slope = self.schedule.snr_and_derivative(t)
        z_t = sample_marginal(target, self.schedule.alpha_bar(t))
        squared_error = (self.predict_embedding(images, z_t, t) - target).pow(2).sum(-1)
        ends = self.schedule.alpha_bar(torch.tensor([0.0, 1.0], device=images.device))
        parts = {
            "denoise": (self.eta / 2 * snr_slope * squared_error).mean(),
            "ce": F.cross_entropy(self.output_layer(sample_marginal(target, ends[1])), labels),
            "kl": kl_to_standard_normal(target, ends[0]).mean(),
        }
        return sum(parts.values()), parts

    @torch.no_grad()
    def sample(self, images: Tensor, steps: int | None = None, solver: str | None = None) -> Tensor:
        """``z_1`` from ``z_0 ~ q(z_0)`` by the probability-flow ODE, ``[B, d]``."""
        self._check_batch(images)
        steps, solver = steps or self.inference_steps, solver or self.solver
        _check_solver(solver, steps)
        batch = images.shape[0]
        times = torch.linspace(0.0, 1.0, steps + 1, device=images.device)
        alpha_bars = self.schedule.alpha_bar(times)
        z = torch.randn(batch, self.embedding_dim, dtype=images.dtype, device=images.device)
        z = z * (1 - alpha_bars[0]).sqrt()
        for k in range(steps):
            u_hat = self.predict_embedding(images, z, times[k].expand(batch))
            z_next = ddim_update(z, u_hat, alpha_bars[k], alpha_bars[k + 1])
            if solver == "heun":
                u_corrected = self.predict_embedding(images, z_next, times[k + 1].expand(batch))
                z_next = ddim_update(z, (u_hat + u_corrected) / 2, alpha_bars[k], alpha_bars[k + 1])
            z = z_next
        return z


class NoPropFMNet(_NoPropNet):
    """NoProp by flow matching: ``z_t = t u_y + (1 - t) z_0`` and ``v(z_t, x, t)`` regresses ``u_y - z_0``.

    An optional cross-entropy term (``ce_weight``) classifies the one-step extrapolation
    ``z_t + (1 - t) v``. Inference: Euler from ``z_0 ~ N(0, I)`` at ``t = 0`` to ``t = 1``.

    Args:
        num_classes: ``K``.
        image_shape: ``(C, H, W)``.
        ce_weight: weight of the cross-entropy term (0 turns it off).
        inference_steps: Euler steps.
        **options: the options every variant shares (see :class:`NoPropDTNet`).
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: Sequence[int],
        *,
        ce_weight: float = 1.0,
        inference_steps: int = 20,
        **options: Any,
    ) -> None:
        super().__init__(num_classes, image_shape, **options)
        check_nonnegative_float("ce_weight", ce_weight)
        _check_solver("euler", inference_steps)
        self.ce_weight, self.inference_steps = ce_weight, inference_steps
        # the network predicts a velocity in embedding space, so its output is d wide
        self.denoiser = self._denoiser(self.embedding_dim, time_conditioned=True)

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The FM objective for one batch and its parts (``flow``, ``ce``)."""
        self._check_batch(images, labels)
        target = self.embedding(labels)
        noise = torch.randn_like(target)
        t = torch.rand(labels.shape[0], device=images.device)
        z_t = t.unsqueeze(-1) * target + (1 - t.unsqueeze(-1)) * noise
        velocity = self.velocity(images, z_t, t)
        parts = {"flow": (velocity - (target - noise)).pow(2).sum(-1).mean()}
        if self.ce_weight > 0:
            extrapolated = z_t + (1 - t.unsqueeze(-1)) * velocity
            parts["ce"] = self.ce_weight * F.cross_entropy(self.output_layer(extrapolated), labels)
        return sum(parts.values()), parts

    @torch.no_grad()
    def sample(self, images: Tensor, steps: int | None = None) -> Tensor:
        """``z_1`` by Euler steps of ``dz/dt = v(z, x, t)`` from ``z_0 ~ N(0, I)``, ``[B, d]``."""
        self._check_batch(images)
        steps = steps or self.inference_steps
        _check_solver("euler", steps)
        batch = images.shape[0]
        z = torch.randn(batch, self.embedding_dim, dtype=images.dtype, device=images.device)
        for k in range(steps):
            t = torch.full((batch,), k / steps, dtype=images.dtype, device=images.device)
            z = z + self.velocity(images, z, t) / steps
        return z

    def velocity(self, images: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """``v(z_t, x, t) = g(z_t, x, t) - z_t``, ``[B, d]``.

        The skip term means the network ``g`` predicts where ``z`` is heading rather than having to
        reproduce ``-z_t`` through its ReLU layers (at ``t = 0`` the ideal ``g`` is ``E[u_y | x]``).
        """
        return self.denoiser(images, z, t) - z

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``[B, K]``: the output layer on ``z_1``, or, when ``ce_weight == 0`` leaves that layer
        untrained, minus the squared distance of ``z_1`` to each class embedding."""
        z = self.sample(images)
        if self.ce_weight > 0:
            return self.output_layer(z)
        return -torch.cdist(z, self.embedding.weight).pow(2)


def _check_solver(solver: str, steps: int) -> None:
    check_choice("solver", solver, SOLVERS)
    check_positive_int("inference_steps", steps)
