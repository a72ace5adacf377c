"""Zeroth-order optimizers: ``torch.optim.Optimizer``s that train with forward passes only.

``step(closure)`` evaluates the loss at perturbed parameters ``theta +- eps z`` (``z`` regenerated
from a seed, see :mod:`lightning_bpfree.zo.perturbation`), forms the projected gradient

    g = (L(theta + eps z) - L(theta - eps z)) / (2 eps)        (two-sided)
    g = (L(theta + eps z) - L(theta)) / eps                      (one-sided)

and updates ``theta`` along ``z`` (MeZO, arXiv 2305.17333). The closure is called under
``torch.no_grad()``: it must return the loss and must not call ``backward``.

State for exact resume (``state_dict``): the base seed and the step counter. Each step's noise
seed is a hash of the two, so a resumed run draws exactly the noise the uninterrupted run drew.

Enhancements (blocks, sparsity, hybrid first-order) are :class:`~lightning_bpfree.zo.parts.ZOPart`
objects whose hooks the base calls; the base itself only perturbs, estimates and updates.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_bpfree.validation import (
    check_bool,
    check_choice,
    check_float,
    check_nonnegative_float,
    check_optional,
    check_options,
    check_positive_float,
    check_positive_int,
    check_seed,
)
from lightning_bpfree.zo.blocks import ParameterBlocks
from lightning_bpfree.zo.distributed import is_sharded, local_tensor
from lightning_bpfree.zo.parts import ZOPart
from lightning_bpfree.zo.perturbation import NoiseBucket, SeededNoise, chunk_of, mix_seed

# Keeping a copy of the trainable parameters makes restores bitwise exact; up to this many bytes of
# trainable parameters (LoRA, prefix, head-only) the copy is kept by default.
EXACT_RESTORE_MAX_BYTES = 64 * 2**20


@dataclass
class ZOEstimate:
    """What one ``step`` measured: per query, its noise seed and projected gradient (a scalar)."""

    seeds: list[int] = field(default_factory=list)
    projected_grads: list[float] = field(default_factory=list)
    loss_plus: list[float] = field(default_factory=list)
    loss_minus: list[float] = field(default_factory=list)
    skipped: bool = False
    pending_scale: float = 0.0

    @property
    def loss(self) -> float:
        """The loss at theta: mean of the perturbed losses (second-order accurate in eps)."""
        values = self.loss_plus + self.loss_minus
        return sum(values) / len(values) if values else float("nan")

    def record(self, loss_plus: float, loss_minus: float, projected_grad: float) -> bool:
        """Append one query's figures; a NaN or infinite one marks the step skipped. Returns whether to go on."""
        self.loss_plus.append(loss_plus)
        self.loss_minus.append(loss_minus)
        self.projected_grads.append(projected_grad)
        if not all(math.isfinite(value) for value in (loss_plus, loss_minus, projected_grad)):
            self.skipped = True
        return not self.skipped


def scalar_loss(loss: Any, name: str = "closure") -> float:
    """The float value of what a closure returned (a one-element tensor or a number)."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"the {name} must return a scalar loss, got a tensor of shape {tuple(loss.shape)}")
        return float(loss.detach().float().item())
    if isinstance(loss, int | float):
        return float(loss)
    raise TypeError(f"the {name} must return a scalar tensor or a float, got {type(loss).__name__}")


def _as_part(name: str, value: Any, expected: str) -> ZOPart | None:
    if value is not None and not isinstance(value, ZOPart):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    return value


class ZOOptimizer(Optimizer):
    """Base class of the zeroth-order optimizers: seeded perturbation, estimate, update.

    Args:
        params: parameters or parameter groups; only tensors with ``requires_grad=True`` at step
            time are perturbed and updated.
        lr: learning rate (``>= 0``), per group; LR schedulers change ``param_groups[i]["lr"]``.
        eps: perturbation scale (``> 0``).
        weight_decay: decoupled from the estimate: ``theta <- theta - lr * wd * theta``.
        perturbation: ``"gaussian"`` or ``"rademacher"``.
        one_sided: use ``(L(theta + eps z) - L(theta)) / eps`` (one perturbed forward per query
            plus one unperturbed forward per step) instead of the two-sided difference.
        num_queries: directions averaged per step (``q``); memory does not grow with ``q``.
        seed: base seed of the noise; default ``torch.initial_seed()`` (so ``seed_everything``
            fixes it) without drawing from the global generator.
        exact_restore: keep a copy of the trainable parameters so that every restore is bitwise
            exact (costs their size in memory). ``None`` (default) keeps it when they take at most
            64 MiB, e.g. for LoRA; otherwise restores are arithmetic (``theta + eps z - 2 eps z +
            eps z``), exact up to float rounding, as in MeZO.
        chunk_numel: the most noise elements drawn at once (see
            :class:`~lightning_bpfree.zo.perturbation.SeededNoise`).
        num_threads: CPU threads that draw the noise (default ``torch.get_num_threads()``).
        blocks: block-wise ZO: a sequence (or a name -> parameters mapping, see
            :func:`~lightning_bpfree.zo.blocks.find_blocks`) of parameter blocks, or a
            :class:`~lightning_bpfree.zo.blocks.ParameterBlocks`. Each step then perturbs,
            estimates and updates one block after the other (``2 q`` forwards per block);
            trainable parameters in no block are not trained.
        sparsity: a :class:`~lightning_bpfree.zo.sparsity.GradientSparsity` mask on the
            perturbation (masked entries are neither perturbed nor updated).
        first_order: hybrid ZO/FO: a :class:`~lightning_bpfree.zo.hybrid.FirstOrderPart` whose
            parameters are trained by backprop in the same step, and left out of the ZO estimate.

    The three enhancements are :class:`~lightning_bpfree.zo.parts.ZOPart` objects, listed in ``parts``
    (sparsity, first-order, blocks: the order their hooks run in).

    Every argument is checked at construction (``TypeError``/``ValueError`` naming it; NaN and
    inf refused); an option this method does not take (``ZOSGD(params, momentum=0.9)``, a typo)
    is a ``TypeError`` listing the valid ones (:meth:`option_names`), and params with nothing to
    train (all ``requires_grad=False``) a ``ValueError``.

    ``loss_reducer`` (attribute, default None): ``fn(values) -> values`` applied to the float64
    tensor of the losses each closure call returns; data-parallel training sets it to an
    all-reduce mean (see :func:`~lightning_bpfree.zo.distributed.all_reduce_mean`).

    Sharded parameters (FSDP2 ``DTensor``s split along dim 0) are perturbed and updated through
    their local shard with the matching slice of the whole parameter's noise; state buffers
    (momentum, Adam moments, the exact-restore copy) hold the local shard only. ``forward-grad``,
    ``sparsity`` and ``first_order`` need whole parameters and refuse sharded ones (``ValueError``).
    """

    supports_sharding = True
    """Whether the method works on sharded parameters through their local shards (see above)."""

    combine_queries = False
    """When True, ``update`` calls ``update_chunk`` once per chunk with ``z`` the averaged estimate
    ``sum_q coeff_q z_q`` and ``coeff=1.0, query=0`` (for rules that need the whole estimate,
    e.g. momentum and Adam); otherwise once per query with that query's noise and coefficient."""

    fuse_restore = True
    """Let the last restore of a step share the update's pass over the noise, when possible."""

    chunk_of = staticmethod(chunk_of)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        perturbation: str = "gaussian",
        one_sided: bool = False,
        num_queries: int = 1,
        seed: int | None = None,
        exact_restore: bool | None = None,
        chunk_numel: int | None = None,
        num_threads: int | None = None,
        blocks: Any = None,
        sparsity: Any = None,
        first_order: Any = None,
        **defaults: Any,
    ):
        # every argument is checked before anything is built; options no method reads are refused
        check_options(type(self).__name__, defaults, self.option_names())
        lr = check_nonnegative_float("lr", lr)
        eps = check_positive_float("eps", eps)
        weight_decay = check_nonnegative_float("weight_decay", weight_decay)
        self.num_queries = check_positive_int("num_queries", num_queries)
        self.exact_restore = check_choice("exact_restore", exact_restore, (None, True, False))
        self.one_sided = check_bool("one_sided", one_sided)
        seed = check_optional(check_seed, "seed", seed)
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, **defaults))
        for group in self.param_groups:
            check_nonnegative_float("lr", group["lr"])
            check_positive_float("eps", group["eps"])
            check_nonnegative_float("weight_decay", group["weight_decay"])
        self.noise = SeededNoise(perturbation, chunk_numel=chunk_numel, num_threads=num_threads)
        self.zo_state: dict[str, int] = {
            "seed": int(torch.initial_seed() if seed is None else seed) & ((1 << 63) - 1),
            "step": 0,
            "skipped_steps": 0,
        }
        self.last_estimate = ZOEstimate()
        self._backup: dict[int, torch.Tensor] = {}
        self.blocks = blocks if blocks is None or isinstance(blocks, ParameterBlocks) else ParameterBlocks(blocks)
        self.sparsity = _as_part("sparsity", sparsity, "a GradientSparsity")
        self.first_order = _as_part("first_order", first_order, "a FirstOrderPart")
        self.parts: list[ZOPart] = [part for part in (self.sparsity, self.first_order, self.blocks) if part is not None]
        # ids of the parameters a part keeps for itself (first-order): never perturbed nor masked
        self._excluded: set[int] = {id(p) for part in self.parts for p in part.excluded()}
        # only the parts that mask, so that a dense step pays nothing per chunk
        self._maskers = [part for part in self.parts if type(part).chunk_mask is not ZOPart.chunk_mask]
        self.loss_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._active: set[int] | None = None  # ids of the scope (block) being stepped
        self._query_offset = 0
        self._update_queries = 1
        self.last_step_skipped = False
        """Whether the last ``step`` left some parameters unmoved (non-finite loss or first-order gradients)."""
        self._check_trainable()

    @classmethod
    def option_names(cls) -> list[str]:
        """The keyword options this optimizer's constructor accepts (``params`` excluded)."""
        names: list[str] = []
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is not None:
                for parameter in inspect.signature(init).parameters.values():
                    keyword = parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
                    if keyword and parameter.name not in ("self", "params") and parameter.name not in names:
                        names.append(parameter.name)
            if klass is ZOOptimizer:
                break
        return names

    def check_sharding_support(self) -> None:
        """Refuse (``ValueError``) a sharded parameter when the method or a part needs whole parameters."""
        needs_whole = [
            name
            for name, needed in (
                (f"the optimizer {type(self).__name__}", not self.supports_sharding),
                ("sparsity", self.sparsity is not None),
                ("first_order", self.first_order is not None),
            )
            if needed
        ]
        if needs_whole and any(is_sharded(p) for group in self.param_groups for p in group["params"]):
            raise ValueError(
                f"{' and '.join(needs_whole)} need(s) whole parameters, but some parameters are sharded (FSDP2 "
                "DTensors); use a zo-sgd* or zo-adam optimizer without sparsity / first_order, or do not shard"
            )

    def _check_trainable(self) -> None:
        """Refuse to run when no parameter is left for the estimate: the step would train nothing silently."""
        if not self.trainable_parameters():
            why = (
                "every parameter with requires_grad=True belongs to the first-order part"
                if self._excluded
                else "none of its params has requires_grad=True"
            )
            raise ValueError(
                f"{type(self).__name__} has no parameter to train: {why}; unfreeze some "
                "(p.requires_grad_(True)) or pass the parameters to train"
            )

    # ----------------------------------------------------------------------------- bookkeeping
    def _indexed_params(self) -> list[tuple[dict, list[torch.Tensor], list[int]]]:
        """Per group: the trainable parameters and their stable indices (position among all params)."""
        out, position = [], 0
        for group in self.param_groups:
            params, indices = [], []
            for p in group["params"]:
                if p.requires_grad and id(p) not in self._excluded and (self._active is None or id(p) in self._active):
                    params.append(p)
                    indices.append(position)
                position += 1
            out.append((group, params, indices))
        return out

    def _uses_backup(self) -> bool:
        if self.exact_restore is not None:
            return self.exact_restore
        nbytes = sum(p.numel() * p.element_size() for _, ps, _ in self._indexed_params() for p in ps)
        return nbytes <= EXACT_RESTORE_MAX_BYTES

    def query_seed(self, step: int, query: int) -> int:
        """The noise seed of query ``query`` at step ``step``."""
        return mix_seed(self.zo_state["seed"], step, query)

    def _new_estimate(self) -> ZOEstimate:
        """An empty estimate holding the seeds of this step's queries (offset per block)."""
        step, offset = self.zo_state["step"], self._query_offset
        return ZOEstimate(seeds=[self.query_seed(step, offset + q) for q in range(self.num_queries)])

    def for_each_chunk(
        self, seed: int, fn: Callable[[dict, int, int, torch.Tensor, torch.Tensor], None]
    ) -> None:
        """Call ``fn(group, param_index, start, values, z)`` on every chunk of every trainable parameter.

        ``z`` is zero where a part's mask (sparsity) excludes the element.
        """
        for group, params, indices in self._indexed_params():
            if params:
                self.noise.for_each_chunk(
                    params, seed, lambda i, s, v, z, g=group: fn(g, i, s, v, self._masked(i, s, v, z)),
                    param_indices=indices,
                )  # fmt: skip

    def _masked(self, index: int, start: int, values: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        for part in self._maskers:
            mask = part.chunk_mask(index, start, values)
            if mask is not None:
                z = z.mul_(mask)
        return z

    def trainable_parameters(self) -> list[tuple[int, torch.Tensor]]:
        """``(stable index, parameter)`` of every parameter the next estimate perturbs."""
        return [(i, p) for _, ps, idx in self._indexed_params() for p, i in zip(ps, idx)]

    def _reduce(self, values: torch.Tensor) -> torch.Tensor:
        """The float64 figures of one closure call, averaged over ranks when ``loss_reducer`` is set."""
        return values if self.loss_reducer is None else self.loss_reducer(values)

    def _loss(self, closure: Callable[[], Any]) -> float:
        return float(self._reduce(torch.tensor([scalar_loss(closure())], dtype=torch.float64))[0])

    # ---------------------------------------------------------------------------- perturbation
    def _save_backup(self) -> None:
        buffers, sources = [], []
        for _, params, indices in self._indexed_params():
            for p, i in zip(params, indices):
                local = local_tensor(p)  # the local shard of a sharded parameter
                buffer = self._backup.get(i)
                if buffer is None or buffer.shape != local.shape or buffer.dtype != local.dtype:
                    self._backup[i] = local.clone()
                else:
                    buffers.append(buffer)
                    sources.append(local)
        if buffers:  # one call, not one copy per tensor (kernel launches on accelerators)
            torch._foreach_copy_(buffers, sources)

    def _keep_copy(self) -> bool:
        """Save the copy of theta when exact restores are on; returns whether they are."""
        use_backup = self._uses_backup()
        if use_backup:
            self._save_backup()
        return use_backup

    def for_each_bucket(self, seed: int, fn: Callable[[dict, NoiseBucket], None]) -> None:
        """Call ``fn(group, bucket)`` on every :class:`~lightning_bpfree.zo.perturbation.NoiseBucket` of the
        trainable parameters (chunks grouped for ``torch._foreach_*`` ops). Only without masks
        (sparsity): the noise is not masked here, see :meth:`bucketed`."""
        for group, params, indices in self._indexed_params():
            if params:
                self.noise.for_each_bucket(params, seed, lambda bucket, g=group: fn(g, bucket), param_indices=indices)

    def bucketed(self) -> bool:
        """Whether the noise passes go bucket by bucket (one ``torch._foreach_*`` call per bucket of chunks)
        rather than chunk by chunk: always, unless a part masks the noise of each chunk (sparsity)."""
        return not self._maskers

    def _add_noise(self, seed: int, alpha: Callable[[dict], float], from_backup: bool = False) -> None:
        """``theta <- theta + alpha(group) * z`` (``theta_0 + ...`` from the kept copy when ``from_backup``)."""
        if self.bucketed():

            def apply_bucket(group: dict, bucket: NoiseBucket) -> None:
                if from_backup:
                    chunks = zip(bucket.indices, bucket.starts, bucket.values)
                    torch._foreach_copy_(bucket.values, [chunk_of(self._backup[i], s, v) for i, s, v in chunks])
                torch._foreach_add_(bucket.values, bucket.noise, alpha=alpha(group))

            self.for_each_bucket(seed, apply_bucket)
            return

        def apply(group: dict, index: int, start: int, values: torch.Tensor, z: torch.Tensor) -> None:
            if from_backup:
                values.copy_(chunk_of(self._backup[index], start, values))
            values.add_(z, alpha=alpha(group))

        self.for_each_chunk(seed, apply)

    def perturb_(self, seed: int, scale_in_eps: float, from_backup: bool = False) -> None:
        """``theta <- theta + scale_in_eps * eps * z`` (or ``backup + ...`` when ``from_backup``)."""
        self._add_noise(seed, lambda group: scale_in_eps * group["eps"], from_backup)

    def restore_(self, seed: int, current_scale_in_eps: float, use_backup: bool) -> None:
        """Undo a perturbation of ``current_scale_in_eps * eps * z``."""
        if use_backup:
            pairs = [(local_tensor(p), self._backup[i]) for _, ps, ix in self._indexed_params() for p, i in zip(ps, ix)]
            if pairs:  # one call, not one copy per tensor
                torch._foreach_copy_([local for local, _ in pairs], [backup for _, backup in pairs])
        else:
            self.perturb_(seed, -current_scale_in_eps)

    # ------------------------------------------------------------------------------- the step
    def estimate(self, closure: Callable[[], Any], use_backup: bool, leave_perturbed: bool = False) -> ZOEstimate:
        """Evaluate the closure at perturbed parameters and form the projected gradients.

        The parameters are restored after every query, except, when ``leave_perturbed`` and the
        restore is arithmetic of one two-sided query, after the last one: they stay at
        ``theta - eps z`` and ``estimate.pending_scale`` is ``-1.0``, so that ``update`` undoes it in
        its own pass over the noise. A skipped estimate is always left restored.
        """
        est = self._new_estimate()
        loss_at_theta = self._loss(closure) if self.one_sided else None
        eps = self.param_groups[0]["eps"]
        fuse = leave_perturbed and not use_backup and not self.one_sided and self.num_queries == 1
        for seed in est.seeds:
            self.perturb_(seed, +1.0)
            loss_plus = self._loss(closure)
            if self.one_sided:
                self.restore_(seed, +1.0, use_backup)
                loss_minus, denominator = loss_at_theta, 1.0
            else:
                if use_backup:
                    self.perturb_(seed, -1.0, from_backup=True)
                else:
                    self.perturb_(seed, -2.0)
                loss_minus, denominator = self._loss(closure), 2.0
                if fuse:  # one query: this is the last
                    est.pending_scale = -1.0
                else:
                    self.restore_(seed, -1.0, use_backup)
            if not est.record(loss_plus, loss_minus, (loss_plus - loss_minus) / (denominator * eps)):
                break
        if est.skipped and est.pending_scale:
            self.restore_(est.seeds[-1], est.pending_scale, use_backup)
            est.pending_scale = 0.0
        return est

    @staticmethod
    def _decay(group: dict, values: torch.Tensor) -> None:
        """Decoupled weight decay ``theta <- theta * (1 - lr * wd)``, applied once per step."""
        if group["weight_decay"]:
            values.mul_(1.0 - group["lr"] * group["weight_decay"])

    def update_chunk(
        self, group: dict, index: int, start: int, values: torch.Tensor, z: torch.Tensor, coeff: float, query: int
    ) -> None:
        """The update rule on one chunk: ``values -= lr * coeff * z`` (ZO-SGD).

        ``coeff`` is the query's projected gradient divided by the number of queries; ``query`` its
        position. Weight decay is applied by the base before the first query's rule. Subclasses with
        other rules (momentum, Adam, sign) override this; their state is indexed by ``(index, start)``.
        Overriding :meth:`update_bucket` as well lets the update go one bucket of chunks at a time.
        """
        values.add_(z, alpha=-group["lr"] * coeff)

    def update_bucket(self, group: dict, bucket: NoiseBucket, coeff: float, query: int) -> None:
        """:meth:`update_chunk` on every chunk of ``bucket`` at once (``torch._foreach_*`` ops).

        The base rule (ZO-SGD) has one; a subclass that overrides ``update_chunk`` without overriding
        this is updated chunk by chunk (see :meth:`_updates_by_bucket`).
        """
        torch._foreach_add_(bucket.values, bucket.noise, alpha=-group["lr"] * coeff)

    def _updates_by_bucket(self) -> bool:
        """Whether ``update`` can go bucket by bucket: no mask, queries not combined, and an ``update_bucket``
        defined by the class that defines ``update_chunk`` or by a subclass of it (so that a subclass
        changing only ``update_chunk`` is never updated by an inherited bucket rule)."""

        def owner(name: str) -> type:
            return next(klass for klass in type(self).__mro__ if name in klass.__dict__)

        same_rule = issubclass(owner("update_bucket"), owner("update_chunk"))
        return self.bucketed() and not self.combine_queries and same_rule

    def _update_chunk(
        self, group: dict, index: int, start: int, values: torch.Tensor, z: torch.Tensor, coeff: float, query: int,
        pending: float, pending_z: torch.Tensor | None,
    ) -> None:  # fmt: skip
        """One chunk of ``update``: undo the pending perturbation (noise ``pending_z``), decay, then the rule."""
        if pending:
            values.add_(pending_z, alpha=-pending * group["eps"])
        if query == 0:
            self._decay(group, values)
        self.update_chunk(group, index, start, values, z, coeff, query)

    def update(self, estimate: ZOEstimate) -> None:
        """Apply ``update_chunk`` for every query, first undoing ``estimate.pending_scale`` in the same pass."""
        count = self._update_queries = len(estimate.seeds)
        self.prepare_update()
        coeffs = [grad / count for grad in estimate.projected_grads]
        pending = estimate.pending_scale
        if self.combine_queries:
            for group, params, indices in self._indexed_params():
                if not params:
                    continue

                def combined_apply(index, start, values, combined, last_z, group=group) -> None:
                    combined = self._masked(index, start, values, combined)
                    pending_z = self._masked(index, start, values, last_z) if pending else None
                    self._update_chunk(group, index, start, values, combined, 1.0, 0, pending, pending_z)

                self.noise.for_each_chunk_combined(params, estimate.seeds, coeffs, combined_apply, param_indices=indices)
            return
        by_bucket = self._updates_by_bucket()
        for query, (seed, coeff) in enumerate(zip(estimate.seeds, coeffs)):
            undo = pending if query == count - 1 else 0.0
            if by_bucket:

                def apply_bucket(group: dict, bucket: NoiseBucket, q=query, c=coeff, undo=undo) -> None:
                    # the same ops in the same order as _update_chunk, each over the whole bucket
                    if undo:
                        torch._foreach_add_(bucket.values, bucket.noise, alpha=-undo * group["eps"])
                    if q == 0 and group["weight_decay"]:
                        torch._foreach_mul_(bucket.values, 1.0 - group["lr"] * group["weight_decay"])
                    self.update_bucket(group, bucket, c, q)

                self.for_each_bucket(seed, apply_bucket)
                continue

            def apply(group, index, start, values, z, q=query, c=coeff, undo=undo) -> None:
                self._update_chunk(group, index, start, values, z, c, q, undo, z)

            self.for_each_chunk(seed, apply)

    def prepare_update(self) -> None:
        """Hook run on the main thread before each update pass (create per-parameter state here)."""

    def init_state(self) -> None:
        """Create the per-parameter state now, as the first update would (zero buffers; an empty entry
        for methods without any), so that the state is the same as if created lazily.

        Distributed checkpointing (``torch.distributed.checkpoint``, which ``ModelParallelStrategy``
        uses) loads only into state entries that exist, and fills an empty optimizer state by calling
        ``step()`` without a closure, which a ZO step cannot take.
        """
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]  # noqa: B018 - creates the (empty) entry

    def state_of(self, index: int, name: str) -> torch.Tensor:
        """The per-parameter buffer ``name`` of parameter ``index`` (zeros, created by ``prepare_update``).

        Shaped like the parameter, or like its local shard when it is sharded.
        """
        return local_tensor(self.state[self._param_at[index]][name])

    def _init_buffers(self, *names: str) -> None:
        self._param_at = {}
        for index, p in self.trainable_parameters():
            self._param_at[index] = p
            state = self.state[p]
            for name in names:
                if name not in state:
                    # a sharded parameter gets a DTensor buffer laid out like it: each rank allocates its
                    # shard only, and distributed checkpointing sees how the buffer is split
                    if is_sharded(p):
                        state[name] = torch.zeros_like(p.data)
                    else:
                        state[name] = torch.zeros(p.shape, dtype=p.dtype, device=p.device)

    def direction(self, index: int, param: torch.Tensor, seed: int) -> torch.Tensor:
        """The whole (masked) float32 noise tensor that ``seed`` applies to parameter ``index``."""
        out = torch.empty(param.shape, dtype=torch.float32, device=param.device)

        def copy(i: int, start: int, values: torch.Tensor, z: torch.Tensor) -> None:
            chunk_of(out, start, values).copy_(self._masked(i, start, values, z))

        self.noise.for_each_chunk([param], seed, copy, param_indices=[index])
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One zeroth-order step; ``closure()`` computes the loss (no backward). Returns the loss at theta.

        A NaN or infinite loss skips the update: the parameters are restored (bitwise when a copy
        is kept, see ``exact_restore``) and ``zo_state["skipped_steps"]`` is incremented.
        The parts' hooks run around it (see :mod:`lightning_bpfree.zo.parts`): with ``blocks``,
        one such estimate and update per block; with ``sparsity``, the masks are resampled first
        when due; with ``first_order``, its gradients are computed at theta first and its
        optimizer steps last, and a non-finite first-order loss or gradient skips the whole step
        (nothing moves; ``last_step_skipped`` tells). A step with no parameter left to train
        (all frozen since construction) raises ``ValueError``.
        """
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that returns the loss")
        self._check_trainable()  # parameters may have been frozen since construction
        self.check_sharding_support()
        for part in self.parts:
            part.before_step(self, closure)
        if any(part.skips_step() for part in self.parts):
            loss = self._skip_step()
        else:
            scopes = next((scopes for part in self.parts if (scopes := part.scopes()) is not None), [None])
            losses, skipped = [], False
            try:
                for number, scope in enumerate(scopes):
                    self._active = None if scope is None else {id(p) for p in scope}
                    self._query_offset = number * self.num_queries
                    losses.append(self.step_once(closure, advance=number == len(scopes) - 1))
                    skipped = skipped or self.last_estimate.skipped
            finally:
                self._active, self._query_offset = None, 0
            loss, self.last_step_skipped = losses[0], skipped
        for part in self.parts:
            loss = part.after_step(self, loss)
        return loss

    def step_once(self, closure: Callable[[], Any], advance: bool = True) -> torch.Tensor:
        """Estimate and update the currently active parameters once; ``advance`` the step counter."""
        use_backup = self._keep_copy()
        estimate = self.estimate(closure, use_backup, leave_perturbed=self.fuse_restore)
        if not estimate.skipped:
            self.apply_estimate(estimate, closure, use_backup)
        if estimate.skipped:
            self.zo_state["skipped_steps"] += 1
        if advance:
            self.zo_state["step"] += 1
        self.last_estimate = estimate
        return torch.tensor(estimate.loss)

    def _skip_step(self) -> torch.Tensor:
        """A step a part refused (non-finite first-order loss): nothing moves, the skip is counted."""
        estimate = self._new_estimate()
        estimate.record(math.nan, math.nan, math.nan)
        self.zo_state["skipped_steps"] += 1
        self.zo_state["step"] += 1
        self.last_estimate, self.last_step_skipped = estimate, True
        return torch.tensor(math.nan)

    def apply_estimate(self, estimate: ZOEstimate, closure: Callable[[], Any], use_backup: bool) -> None:
        """Move theta from a finite estimate (``update``; ZO-SGD-Cons also compares candidates)."""
        self.update(estimate)

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["zo_state"] = dict(self.zo_state)
        for part in self.parts:
            if part.state_key is not None:
                state[part.state_key] = part.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch's Optimizer reads "state" and "param_groups"; the other keys are ours
        own = {key: value for key, value in state_dict.items() if key not in ("state", "param_groups")}
        for part in self.parts:
            if part.state_key is not None and own.get(part.state_key) is not None:
                part.load_state_dict(own[part.state_key])
        super().load_state_dict({key: state_dict[key] for key in ("state", "param_groups") if key in state_dict})
        if own.get("zo_state") is not None:
            self.zo_state.update({k: int(v) for k, v in own["zo_state"].items()})


class ZOSGD(ZOOptimizer):
    """MeZO: zeroth-order SGD with in-place, seed-replayed perturbations (memory of inference).

    ``ZOSGD(params, lr, eps=1e-3, weight_decay=0.0, perturbation="gaussian", one_sided=False)``;
    see :class:`ZOOptimizer` for every option. Per step: 2 forwards (two-sided), 3 passes of
    regenerated noise over the trainable parameters (``+eps z``, ``-2 eps z``, restore + update).
    """


SIGN_MODES = ("elementwise", "projected")


class ZOSGDSign(ZOOptimizer):
    """ZO-SGD-Sign: step by the sign of the ZO gradient estimate (no extra state).

    ``sign_mode="elementwise"`` (the ZO-Bench paper): ``theta -= lr * mean_q sign(g_q z_q)``, where
    ``g_q`` is the projected gradient of query ``q`` (with one query, the element-wise sign of the
    estimate; with several, the mean of their signs, so that memory stays constant in ``q``).
    ``sign_mode="projected"`` (the ZO-LLM code): ``theta -= lr * mean_q sign(g_q) z_q``, a
    normalised ZO-SGD step. Weight decay is decoupled, as in :class:`ZOSGD`.
    """

    def __init__(self, params: Iterable, lr: float = 1e-6, sign_mode: str = "elementwise", **options: Any):
        self.sign_mode = check_choice("sign_mode", sign_mode, SIGN_MODES)
        super().__init__(params, lr=lr, **options)

    def update_chunk(self, group, index, start, values, z, coeff, query) -> None:
        direction = torch.sign(z) if self.sign_mode == "elementwise" else z
        sign = (coeff > 0) - (coeff < 0)
        values.add_(direction, alpha=-group["lr"] * sign / self._update_queries)

    def update_bucket(self, group, bucket, coeff, query) -> None:
        direction = torch._foreach_sign(bucket.noise) if self.sign_mode == "elementwise" else bucket.noise
        sign = (coeff > 0) - (coeff < 0)
        torch._foreach_add_(bucket.values, direction, alpha=-group["lr"] * sign / self._update_queries)


class ZOSGDMomentum(ZOOptimizer):
    """ZO-SGD-MMT: heavy-ball momentum on the ZO estimate ``g`` (one buffer the size of the parameters).

    ``m <- momentum * m + g``; ``theta <- theta * (1 - lr * wd) - lr * m`` (``torch.optim.SGD``
    with ``momentum``, ``dampening=0`` and decoupled weight decay).
    """

    combine_queries = True

    def __init__(self, params: Iterable, lr: float = 1e-6, momentum: float = 0.9, **options: Any):
        momentum = check_float("momentum", momentum, low=0.0, high=1.0, high_open=True)
        super().__init__(params, lr=lr, momentum=momentum, **options)

    def prepare_update(self) -> None:
        self._init_buffers("momentum_buffer")

    def init_state(self) -> None:
        super().init_state()
        self._init_buffers("momentum_buffer")

    def update_chunk(self, group, index, start, values, z, coeff, query) -> None:
        buffer = self.chunk_of(self.state_of(index, "momentum_buffer"), start, values)
        buffer.mul_(group["momentum"]).add_(z)
        values.add_(buffer, alpha=-group["lr"])


class ZOAdam(ZOOptimizer):
    """ZO-Adam: Adam moments on the ZO estimate, built one chunk of one parameter at a time.

    The same arithmetic as ``torch.optim.Adam`` (``torch.optim.AdamW`` when ``weight_decay > 0``:
    the decay is decoupled) fed the gradient ``g = mean_q g_q z_q``; two buffers the size of the
    parameters, never a full gradient. ``adam_eps`` is Adam's denominator epsilon (``eps`` is the
    perturbation scale).
    """

    combine_queries = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        **options: Any,
    ):
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        betas = tuple(check_float(f"betas[{i}]", b, low=0.0, high=1.0, high_open=True) for i, b in enumerate(betas))
        adam_eps = check_positive_float("adam_eps", adam_eps)
        super().__init__(params, lr=lr, betas=betas, adam_eps=adam_eps, **options)

    def prepare_update(self) -> None:
        self._init_buffers("exp_avg", "exp_avg_sq")
        for _, p in self.trainable_parameters():
            self.state[p]["step"] = self.state[p].get("step", 0) + 1

    def init_state(self) -> None:
        super().init_state()
        self._init_buffers("exp_avg", "exp_avg_sq")
        for _, p in self.trainable_parameters():
            self.state[p].setdefault("step", 0)

    def update_chunk(self, group, index, start, values, z, coeff, query) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        step = self.state[self._param_at[index]]["step"]
        exp_avg = self.chunk_of(self.state_of(index, "exp_avg"), start, values)
        exp_avg_sq = self.chunk_of(self.state_of(index, "exp_avg_sq"), start, values)
        exp_avg.lerp_(z.to(exp_avg.dtype), 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(z, z, value=1.0 - beta2)
        bias_correction1 = 1.0 - beta1**step
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
        denominator = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["adam_eps"])
        values.addcdiv_(exp_avg, denominator, value=-lr / bias_correction1)


class ZOSGDConservative(ZOOptimizer):
    """ZO-SGD-Cons: estimate ``g``, then keep whichever of ``theta``, ``theta - lr g z`` and
    ``theta + lr g z`` has the lowest loss (``2 q + 3`` forwards per two-sided step).

    Weight decay (decoupled) is applied after the choice. A non-finite candidate loss never wins.
    ``last_choice`` records the candidate kept: ``+1`` (the ZO-SGD step ``theta - lr g z``), ``0``
    (stay) or ``-1`` (``theta + lr g z``).
    """

    last_choice = 0
    fuse_restore = False  # the candidates are evaluated after the estimate: theta must be restored

    def _move(self, estimate: ZOEstimate, direction: float, use_backup: bool) -> None:
        """Move theta by ``-direction * lr * g`` (from the kept copy ``theta_0`` when ``use_backup``)."""
        count = len(estimate.seeds)
        for query, (seed, grad) in enumerate(zip(estimate.seeds, estimate.projected_grads)):
            c = grad / count
            self._add_noise(seed, lambda group, c=c: -direction * group["lr"] * c, from_backup=use_backup and query == 0)

    def apply_estimate(self, estimate: ZOEstimate, closure: Callable[[], Any], use_backup: bool) -> None:
        losses = {0: self._loss(closure)}
        position = 0  # in units of the SGD step, relative to theta
        for candidate in (+1, -1):  # theta - lr g z (the ZO-SGD step), then theta + lr g z
            self._move(estimate, (candidate - position) if not use_backup else candidate, use_backup)
            position = candidate
            losses[candidate] = self._loss(closure)
        finite = {k: v for k, v in losses.items() if math.isfinite(v)}
        choice = min(finite, key=lambda k: (finite[k], abs(k))) if finite else 0
        if choice != position:
            self._move(estimate, (choice - position) if not use_backup else choice, use_backup)
        self.last_choice = choice
        for group, params, _ in self._indexed_params():
            for p in params:
                self._decay(group, local_tensor(p))


class ForwardGradient(ZOOptimizer):
    """Forward gradient (Baydin et al. 2022): exact directional derivatives by forward-mode AD, no backward.

    Per query, a tangent ``v`` (gaussian or rademacher, regenerated from a seed, one tensor per
    parameter held during the forward) is attached to every trainable parameter with
    ``torch.autograd.forward_ad`` (the engine under ``torch.func.jvp``); one forward gives the
    loss and ``d = grad L . v``. Update: ``theta <- theta * (1 - lr * wd) - lr * mean_q d_q v_q``.
    ``eps`` and ``one_sided`` are unused. The closure must be differentiable in forward mode; it
    runs with ``scaled_dot_product_attention`` restricted to its math kernel (the fused CPU and CUDA
    kernels have no forward-mode derivative). It needs whole parameters: sharded (FSDP2) ones are refused.
    """

    supports_sharding = False  # the tangents would have to follow FSDP's all-gather

    def directional_derivative(self, closure: Callable[[], Any], seed: int) -> tuple[float, float]:
        """``(L(theta), grad L(theta) . v)`` for the tangent ``v`` of ``seed``."""
        import torch.autograd.forward_ad as fwad
        from torch.nn.attention import SDPBackend, sdpa_kernel

        trainable = self.trainable_parameters()
        with fwad.dual_level():
            for index, p in trainable:
                tangent = self.direction(index, p, seed).to(p.dtype)
                p.copy_(fwad.make_dual(p.detach(), tangent))  # attaches the tangent to p itself
                del tangent
            # the fused attention kernels have no forward-mode derivative; the math one does
            with sdpa_kernel(SDPBackend.MATH):
                output = closure()
            if not isinstance(output, torch.Tensor) or output.numel() != 1:
                raise ValueError("the closure must return a scalar loss tensor for forward-grad")
            primal, tangent = fwad.unpack_dual(output)
            values = torch.tensor(
                [float(primal.detach().float()), 0.0 if tangent is None else float(tangent.float())],
                dtype=torch.float64,
            )  # fmt: skip
        values = self._reduce(values)
        return float(values[0]), float(values[1])

    def _uses_backup(self) -> bool:
        return False  # the parameters are never moved to evaluate the loss: nothing to restore

    def estimate(self, closure: Callable[[], Any], use_backup: bool = False, leave_perturbed: bool = False) -> ZOEstimate:
        """One forward per query: the loss at theta and its directional derivative along the query's tangent."""
        estimate = self._new_estimate()
        for seed in estimate.seeds:
            loss, derivative = self.directional_derivative(closure, seed)
            # both at theta: forward-grad evaluates no perturbed point
            if not estimate.record(loss, loss, derivative):
                break
        return estimate


OPTIMIZERS: dict[str, type[ZOOptimizer]] = {
    "zo-sgd": ZOSGD,
    "zo-sgd-sign": ZOSGDSign,
    "zo-sgd-mmt": ZOSGDMomentum,
    "zo-sgd-cons": ZOSGDConservative,
    "zo-adam": ZOAdam,
    "forward-grad": ForwardGradient,
}


def make_optimizer(name: str, params: Iterable, **options: Any) -> ZOOptimizer:
    """Build the ZO optimizer registered as ``name`` (see ``OPTIMIZERS``)."""
    return OPTIMIZERS[check_choice("optimizer", name, OPTIMIZERS)](params, **options)
