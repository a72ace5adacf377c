"""``ZerothOrder``: train an unmodified LightningModule with forward passes only.

Added to ``Trainer(callbacks=[ZerothOrder(...)])`` the callback, at ``setup``:

1. switches the module to manual optimization and replaces what ``configure_optimizers`` returns
   with a zeroth-order optimizer over the module's parameters (and the optional LR scheduler);
2. wraps ``training_step`` so that each batch is one ``LightningOptimizer.step(closure)`` whose
   closure runs the user's ``training_step`` (no backward, dropout off). Going through the
   ``LightningOptimizer`` keeps ``global_step``, ``max_steps``, checkpoints and loggers working;
3. logs ``zo/loss``, ``zo/loss_plus``, ``zo/loss_minus``, ``zo/projected_grad`` and
   ``zo/skipped_steps`` every step.

At ``teardown`` (and on an exception) the module is given back exactly as it came: its own
methods and its ``automatic_optimization`` flag, so a later ordinary ``Trainer.fit`` trains it
normally. ``trainer.global_step`` still reads the steps taken.

Data parallel: under Lightning's ``strategy="ddp"`` (``DDPStrategy``) the optimizer shares rank
0's seed and averages the loss scalars of every forward over ranks (see
:func:`~lightning_bpfree.zo.distributed.make_data_parallel`), exactly as
``ZODataParallelStrategy`` does, so parameters stay bitwise identical on every rank.

Sharded: under ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` with a
``configure_model`` that applies FSDP2's ``fully_shard``, the seed and the loss averaging are the
same, and each rank perturbs and updates only its own shard of every parameter (``DTensor``
``Shard(0)``, through ``to_local()``) with the slice of the noise the whole parameter gets; the
optimizer state is sharded the same way. The run follows the trajectory of one process on the
combined batch (float rounding aside) whatever the number of ranks; our code never gathers a
parameter (FSDP all-gathers each layer for its forward, as it always does). Refused at ``setup``:
tensor parallelism (``tensor_parallel_size > 1``), any other placement, ``forward-grad``,
``sparsity`` and ``first_order`` on sharded parameters, and the other multi-process strategies
(FSDP1's ``FSDPStrategy`` flattens parameters, DeepSpeed wraps them). Checkpoints there are
distributed: the callback keeps the optimizer's seed and step counter in its own state (distributed
checkpointing saves only an optimizer's ``state`` and ``param_groups``) and creates the optimizer
state up front (it loads only into entries that exist). See docs/scaling.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

from lightning_bpfree.validation import (
    check_bool,
    check_choice,
    check_nonnegative_float,
    check_options,
    check_positive_float,
)
from lightning_bpfree.zo.distributed import (
    fsdp_modules,
    is_sharded,
    make_data_parallel,
    reshard,
    undo_data_parallel,
)
from lightning_bpfree.zo.optim import OPTIMIZERS, ZOOptimizer, make_optimizer
from lightning_bpfree.zo.strategy import ZODataParallelStrategy
from lightning_bpfree.zo.weight_decay import BIAS_AND_NORM, check_no_decay, weight_decay_groups

SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class ZerothOrder(Callback):
    """Train the LightningModule with a zeroth-order optimizer (MeZO and the ZO-Bench family).

    Args:
        optimizer: one of ``"zo-sgd"`` (MeZO), ``"zo-sgd-sign"``, ``"zo-sgd-mmt"``,
            ``"zo-sgd-cons"``, ``"zo-adam"``, ``"forward-grad"`` (those installed are listed in
            ``lightning_bpfree.zo.optim.OPTIMIZERS``).
        lr: learning rate.
        eps: perturbation scale.
        scheduler: optional ``fn(optimizer) -> LRScheduler`` or ``-> {"scheduler": ...,
            "interval": "step" | "epoch"}``; stepped every batch by default.
        disable_dropout: run the perturbed forwards in ``eval()`` mode (restored afterwards).
        no_decay: which parameters ``weight_decay`` spares. ``BIAS_AND_NORM`` (default): biases and
            every parameter of a normalization layer (``LayerNorm``, ``RMSNorm``, ``GroupNorm``,
            ``BatchNorm``, any ``*Norm`` class such as transformers' ``LlamaRMSNorm``), the Hugging
            Face Trainer convention that MeZO's released trainer follows; ``None``: decay every
            parameter; or a callable ``no_decay(name, parameter) -> bool`` (``name`` as
            ``named_parameters`` gives it; ``lightning_bpfree.zo.weight_decay.mezo_no_decay`` is
            MeZO's name rule exactly). With ``weight_decay > 0`` the optimizer gets two groups,
            see :func:`~lightning_bpfree.zo.weight_decay.weight_decay_groups`.
        **options: passed to the optimizer (``weight_decay``, ``perturbation``, ``one_sided``,
            ``num_queries``, ``seed``, ``exact_restore`` ...). Checked here: an option the chosen
            optimizer does not take (``momentum`` for ``"zo-sgd"``, a typo) is a ``TypeError``
            listing the valid ones; a bad value is a ``TypeError``/``ValueError`` naming it.

    The module's ``training_step`` must return the loss (a scalar tensor or a float, or a dict
    with ``"loss"``); it may be non-differentiable (e.g. minus an accuracy).
    """

    def __init__(
        self,
        optimizer: str = "zo-sgd",
        lr: float = 1e-6,
        eps: float = 1e-3,
        scheduler: SchedulerFactory | None = None,
        disable_dropout: bool = True,
        no_decay: Any = BIAS_AND_NORM,
        **options: Any,
    ):
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_options(f"ZerothOrder({optimizer!r})", options, OPTIMIZERS[optimizer].option_names())
        lr = check_nonnegative_float("lr", lr)
        eps = check_positive_float("eps", eps)
        if scheduler is not None and not callable(scheduler):
            raise TypeError(f"scheduler must be a callable fn(optimizer) -> scheduler, got {type(scheduler).__name__}")
        self.disable_dropout = check_bool("disable_dropout", disable_dropout)
        self.no_decay = check_no_decay(no_decay)
        # Build once on a stand-in parameter so that a bad option value fails here, not at fit time.
        make_optimizer(optimizer, [torch.zeros(1, requires_grad=True)], lr=lr, eps=eps, **options)
        self.optimizer_name = optimizer
        self.optimizer_options = dict(lr=lr, eps=eps, **options)
        self.scheduler_factory = scheduler
        self._scheduler_interval = "step"
        self._patched: list[str] = []
        self._original: dict[str, Any] = {}  # what setup changed on the module, to give back
        self._data_parallel = False  # share the seed and average the losses over ranks (DDP, ModelParallel)
        self._optimizer: ZOOptimizer | None = None
        self._pending_zo_state: dict[str, int] | None = None  # from a checkpoint read before the optimizer exists
        self._final_zo_state: dict[str, int] | None = None  # for a checkpoint saved after fit

    # ---------------------------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._validate_trainer(trainer, pl_module)
        self._data_parallel = self._needs_data_parallel(trainer)
        self._original = {
            "automatic_optimization": pl_module.automatic_optimization,
            # instance attributes the patches shadow (normally none: the methods live on the class)
            **{name: pl_module.__dict__[name] for name in ("configure_optimizers", "training_step") if name in pl_module.__dict__},
        }  # fmt: skip
        self._patched = ["configure_optimizers", "training_step"]  # before patching: _restore undoes a partial one
        pl_module.automatic_optimization = False
        pl_module.configure_optimizers = self._configure_optimizers(pl_module)
        pl_module.training_step = self._training_step(pl_module, pl_module.training_step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown hook after an exception: give the module back here too
        self._restore(trainer, pl_module)

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the module back as it came: its methods and its ``automatic_optimization`` flag."""
        if not self._patched:
            return
        for name in self._patched:
            pl_module.__dict__.pop(name, None)
            if name in self._original:
                pl_module.__dict__[name] = self._original[name]
        self._patched = []
        if self._optimizer is not None and self._data_parallel:
            undo_data_parallel(self._optimizer)
        if self._optimizer is not None:
            self._final_zo_state = dict(self._optimizer.zo_state)
        self._optimizer = None
        # trainer.global_step reads the automatic loop's counter once the flag is True again: give it
        # the steps the manual loop counted, so the finished trainer still reports them
        epoch_loop = trainer.fit_loop.epoch_loop
        steps = epoch_loop.manual_optimization.optim_step_progress.total.completed
        tracker = epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
        tracker.ready = tracker.completed = steps
        pl_module.automatic_optimization = self._original.pop("automatic_optimization")
        self._original = {}

    @staticmethod
    def _needs_data_parallel(trainer: pl.Trainer) -> bool:
        """Whether the optimizer must be made data-parallel here; refuses strategies ZO cannot follow."""
        strategy = trainer.strategy
        if trainer.world_size <= 1 or isinstance(strategy, ZODataParallelStrategy):
            return False  # one process, or the strategy wires the optimizer itself
        if isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy):
            return True
        if isinstance(strategy, ModelParallelStrategy):
            # the device mesh exists: setup_environment ran before the callbacks' setup
            tensor_parallel = strategy.device_mesh["tensor_parallel"].size()
            if tensor_parallel != 1:
                raise ValueError(
                    "ZerothOrder under ModelParallelStrategy supports data parallelism with FSDP2 only: "
                    f"tensor_parallel_size must be 1, got {tensor_parallel}"
                )
            return True  # the layout of every sharded parameter is checked when the optimizer is built
        raise ValueError(
            f"ZerothOrder cannot train under strategy {type(strategy).__name__} with {trainer.world_size} processes: "
            "it flattens or wraps the parameters, and the ranks would draw different noise or drift apart. Use "
            "strategy='ddp', ZODataParallelStrategy() (every rank holds the whole model) or "
            "ModelParallelStrategy(tensor_parallel_size=1) with FSDP2's fully_shard in configure_model."
        )

    def _validate_trainer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        precision = trainer.precision_plugin
        if getattr(precision, "scaler", None) is not None:
            raise ValueError(
                f"ZerothOrder cannot train under precision={trainer.precision!r}: its GradScaler unscales and checks "
                "gradients, and zeroth-order training has none. Use precision='bf16-mixed', '16-true', "
                "'bf16-true' or '32-true'."
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "ZerothOrder steps once per batch: accumulate_grad_batches must be 1, got "
                f"{trainer.accumulate_grad_batches} (use a larger batch or num_queries instead)"
            )
        if trainer.gradient_clip_val:
            raise ValueError("ZerothOrder has no gradients to clip: leave gradient_clip_val unset")
        if not pl_module.automatic_optimization:
            raise ValueError(
                "ZerothOrder drives the optimization itself: the module must use automatic optimization and its "
                "training_step must return the loss (not call manual_backward or step optimizers)"
            )

    def _configure_optimizers(self, pl_module: pl.LightningModule) -> Callable[[], Any]:
        def configure_optimizers() -> Any:
            # decay / no-decay groups (one group, in the module's order, when nothing is exempt)
            weight_decay = self.optimizer_options.get("weight_decay", 0.0)
            groups = weight_decay_groups(pl_module, weight_decay, self.no_decay)
            optimizer = make_optimizer(self.optimizer_name, groups, **self.optimizer_options)
            self._final_zo_state = None
            if self._pending_zo_state is not None:  # resuming: the step counter and seed of the checkpoint
                optimizer.zo_state.update(self._pending_zo_state)
                self._pending_zo_state = None
            if any(is_sharded(p) for group in optimizer.param_groups for p in group["params"]):
                optimizer.init_state()  # what distributed checkpointing needs to save and load into
            if self._data_parallel:  # the process group is up: configure_optimizers runs in strategy.setup
                strategy = pl_module.trainer.strategy
                make_data_parallel(optimizer, strategy.root_device if strategy.root_device.type == "cuda" else None)
            self._optimizer = optimizer
            if self.scheduler_factory is None:
                return optimizer
            scheduler = self.scheduler_factory(optimizer)
            config = dict(scheduler) if isinstance(scheduler, Mapping) else {"scheduler": scheduler}
            self._scheduler_interval = config.setdefault("interval", "step")
            if self._scheduler_interval not in ("step", "epoch"):
                raise ValueError(f"scheduler interval must be 'step' or 'epoch', got {self._scheduler_interval!r}")
            return {"optimizer": optimizer, "lr_scheduler": config}

        return configure_optimizers

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's seed and step counter (``zo_state``), also kept here because distributed
        checkpointing (``ModelParallelStrategy``) saves only an optimizer's ``state`` and ``param_groups``."""
        zo_state = self._final_zo_state if self._optimizer is None else self._optimizer.zo_state
        return {} if zo_state is None else {"zo_state": dict(zo_state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        zo_state = state_dict.get("zo_state")
        if not zo_state:
            return
        if self._optimizer is not None:  # ModelParallelStrategy restores callbacks after building optimizers
            self._optimizer.zo_state.update({key: int(value) for key, value in zo_state.items()})
        else:
            self._pending_zo_state = {key: int(value) for key, value in zo_state.items()}

    # ------------------------------------------------------------------------------ the step
    def _training_step(self, pl_module: pl.LightningModule, user_step: Callable[..., Any]) -> Callable[..., Any]:
        sharded: list[torch.nn.Module] | None = None  # the FSDP2 modules, found at the first step

        def training_step(*args: Any, **kwargs: Any) -> torch.Tensor:
            nonlocal sharded
            if sharded is None:
                sharded = fsdp_modules(pl_module)

            def closure() -> torch.Tensor:
                # every forward gathers the shards as the step left them (FSDP2 keeps the root's
                # parameters gathered after a forward, expecting a backward), and frees them after
                reshard(sharded)
                try:
                    output = user_step(*args, **kwargs)
                finally:
                    reshard(sharded)
                loss = output.get("loss") if isinstance(output, Mapping) else output
                if loss is None:
                    raise ValueError("with ZerothOrder, training_step must return the loss (or a dict with 'loss')")
                return loss

            optimizer = pl_module.optimizers()
            modes = {m: m.training for m in pl_module.modules()} if self.disable_dropout else {}
            if self.disable_dropout:
                pl_module.eval()
            try:
                loss = optimizer.step(closure=closure)
            finally:
                for module, mode in modes.items():
                    module.training = mode
            self._log(pl_module, optimizer.optimizer)
            if self.scheduler_factory is not None and self._scheduler_interval == "step":
                pl_module.lr_schedulers().step()
            return loss

        return training_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._patched and self.scheduler_factory is not None and self._scheduler_interval == "epoch":
            pl_module.lr_schedulers().step()

    @staticmethod
    def _log(pl_module: pl.LightningModule, optimizer: ZOOptimizer) -> None:
        estimate = optimizer.last_estimate
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        figures = {
            "zo/loss": estimate.loss,
            "zo/loss_plus": mean(estimate.loss_plus),
            "zo/loss_minus": mean(estimate.loss_minus),
            "zo/projected_grad": mean(estimate.projected_grads),
            "zo/skipped_steps": float(optimizer.zo_state["skipped_steps"]),
        }
        for name, value in figures.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name == "zo/loss")
