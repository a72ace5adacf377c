"""Hybrid ZO/FO: some modules trained by backprop, the rest by zeroth-order estimates, in the same step.

ZO-Bench (arXiv 2402.11592, section 5) proposes training the few parameters where ZO struggles
most (e.g. the head or the last layers) with first-order gradients while the bulk of the model
is trained forward-only; its code was not released. Here a :class:`FirstOrderPart` is handed to
any ZO optimizer (``ZOSGD(..., first_order=FirstOrderPart(model.lm_head.parameters()))``). Per
step:

1. one forward + backward at theta, with the ZO parameters' ``requires_grad`` switched off
   for that pass, so only the first-order parameters get ``.grad`` (autograd stores activations
   only for what leads to them: the last layers cost little);
2. the ZO estimate and update of the other parameters (the first-order ones are not perturbed);
3. the first-order optimizer's step, then its gradients are freed.

A non-finite loss skips both parts: when the first-order pass at theta gives a NaN or infinite
loss or gradient, its gradients are freed unused and the ZO estimate is skipped too (no forward
at perturbed weights runs), so the weights of both parts stay bitwise as they were and the skip
is counted in ``zo_state["skipped_steps"]``. When only the perturbed forwards are non-finite
(the loss at theta and its gradients are finite), the ZO estimate is skipped and so is the
first-order step: a skipped step moves neither part, so the two never drift out of step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from lightning_bpfree.validation import check_nonnegative_float
from lightning_bpfree.zo.optim import scalar_loss
from lightning_bpfree.zo.parts import ZOPart


class FirstOrderPart(ZOPart):
    """The parameters a hybrid ZO/FO step trains by backprop.

    Args:
        params: the first-order parameters (e.g. ``model.lm_head.parameters()``).
        optimizer: a ``torch.optim.Optimizer`` over ``params`` or a factory ``fn(params) -> Optimizer``;
            default ``torch.optim.AdamW(params, lr)``.
        lr: the learning rate of the default optimizer.

    ``grad_reducer`` (attribute, default None): ``fn(tensors)`` applied in place to the list of
    gradients, followed by a one-element float64 tensor holding the loss, before the optimizer step
    (data-parallel training all-reduces them, so every rank steps, or skips, alike).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        optimizer: torch.optim.Optimizer | Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
        lr: float = 1e-3,
    ):
        lr = check_nonnegative_float("lr", lr)
        self.params = [p for p in params]
        if not self.params or not all(isinstance(p, torch.Tensor) for p in self.params):
            raise ValueError("params must be a non-empty iterable of tensors")
        if optimizer is None:
            optimizer = torch.optim.AdamW(self.params, lr=lr)
        elif not isinstance(optimizer, torch.optim.Optimizer):
            if not callable(optimizer):
                raise TypeError(f"optimizer must be a torch Optimizer or fn(params) -> Optimizer, got {optimizer!r}")
            optimizer = optimizer(self.params)
        self.optimizer = optimizer
        self.grad_reducer: Callable[[Sequence[torch.Tensor]], None] | None = None
        self.last_loss = float("nan")
        self._finite = True

    def compute_gradients(self, closure: Callable[[], Any], zo_params: Sequence[torch.Tensor]) -> float:
        """Forward + backward at theta; only ``self.params`` get gradients. Returns the loss.

        Also records whether the loss and every gradient are finite (``skips_step``).
        """
        flags = [p.requires_grad for p in zo_params]
        for p in zo_params:
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                for p in self.params:
                    p.grad = None
                loss = closure()
                if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                    raise ValueError("the closure must return a loss tensor that depends on the first-order parameters")
                loss.backward()
        finally:
            for p, flag in zip(zo_params, flags):
                p.requires_grad_(flag)
        grads = [p.grad for p in self.params if p.grad is not None]
        value = scalar_loss(loss)
        if self.grad_reducer is not None:
            # the loss travels with the gradients: a NaN on any rank makes every rank skip
            reduced = torch.tensor([value], dtype=torch.float64, device=self.params[0].device)
            self.grad_reducer([*grads, reduced])
            value = float(reduced.item())
        self.last_loss = value
        self._finite = math.isfinite(value) and all(bool(torch.isfinite(g).all()) for g in grads)
        return self.last_loss

    state_key = "first_order"

    def excluded(self) -> Sequence[torch.Tensor]:
        return self.params

    def before_step(self, optimizer: Any, closure: Callable[[], Any]) -> None:
        # the ZO parameters of the whole step (no block active yet)
        self.compute_gradients(closure, [p for _, p in optimizer.trainable_parameters()])

    def skips_step(self) -> bool:
        return not self._finite

    def after_step(self, optimizer: Any, loss: torch.Tensor) -> torch.Tensor:
        if self._finite and not optimizer.last_step_skipped:
            self.step()
        else:  # a skipped step skips both parts; never step on NaN/inf gradients (see skips_step)
            self.optimizer.zero_grad(set_to_none=True)
        # a skipped ZO step reports the loss the first-order pass measured at theta
        return loss if math.isfinite(float(loss)) else torch.tensor(self.last_loss)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def step(self) -> None:
        """The first-order optimizer's step; the gradients are then freed."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
