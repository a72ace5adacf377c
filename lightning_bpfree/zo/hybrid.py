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

    ``grad_reducer`` (attribute, default None): ``fn(grads)`` applied to the list of gradients
    before the optimizer step (data-parallel training all-reduces them).
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

    def compute_gradients(self, closure: Callable[[], Any], zo_params: Sequence[torch.Tensor]) -> float:
        """Forward + backward at theta; only ``self.params`` get gradients. Returns the loss."""
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
        if self.grad_reducer is not None:
            self.grad_reducer([p.grad for p in self.params if p.grad is not None])
        self.last_loss = scalar_loss(loss)
        return self.last_loss

    state_key = "first_order"

    def excluded(self) -> Sequence[torch.Tensor]:
        return self.params

    def before_step(self, optimizer: Any, closure: Callable[[], Any]) -> None:
        # the ZO parameters of the whole step (no block active yet)
        self.compute_gradients(closure, [p for _, p in optimizer.trainable_parameters()])

    def after_step(self, optimizer: Any, loss: torch.Tensor) -> torch.Tensor:
        self.step()
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
