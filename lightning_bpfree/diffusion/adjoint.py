"""AdjointDPM: gradients through diffusion sampling by solving the adjoint probability-flow ODE.

The variance-preserving probability-flow ODE becomes non-stiff after the exponential-integrator change of
variables ``rho = sigma_t / alpha_t`` and ``y = x / alpha_t`` (with ``alpha_t = sqrt(alphas_cumprod[t])``,
``sigma_t = sqrt(1 - alphas_cumprod[t])``)::

    dy/drho = eps_theta(alpha(rho) * y, t(rho), c),        alpha(rho) = 1 / sqrt(1 + rho^2)

Sampling integrates it from ``rho_T`` (noise) down to ``rho_0`` (data). Euler steps over the ``(t, prev_t)``
pairs ``DDIMScheduler.step`` uses (``prev_t = t - T // n`` for every ``timestep_spacing``) are exactly DDIM
with ``eta=0`` (:class:`DDIMStepPairs`). Backpropagating through the solver stores one UNet graph per
function evaluation; the adjoint method (torchdiffeq's ``odeint_adjoint``) instead integrates the
augmented system ``(y, a_y, a_theta, a_c)`` backwards from the data end, with
``da_y/drho = -a_y^T d eps/dy`` and ``da_theta/drho = -a_y^T d eps/dtheta`` (the same for ``c``), so memory
holds one UNet graph at a time whatever the number of steps. Its gradient differs from direct backprop
by the discretisation error, O(1/N) for Euler (optimise-then-discretise).

Everything here is plain PyTorch + diffusers + torchdiffeq; the Lightning layer is ``module.py``.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchdiffeq import odeint, odeint_adjoint

from lightning_bpfree.validation import check_choice, check_float, check_positive_int

METHODS = ("euler", "midpoint", "rk4", "explicit_adams")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def rho_of_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``rho_t = sigma_t / alpha_t = sqrt((1 - abar_t) / abar_t)``, float64, same shape as the input."""
    abar = alphas_cumprod.detach().to(torch.float64)
    return ((1.0 - abar) / abar).sqrt()


def _unet_output(output: Any) -> torch.Tensor:
    """The prediction tensor of a diffusers UNet output (``.sample``), a tuple, or a plain tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"the unet returned {type(output).__name__}; expected a tensor or an object with .sample")


class RhoTimeMap:
    """Maps ``rho`` to the (fractional) training timestep the UNet is conditioned on.

    The scheduler's ``rho_t`` is increasing in ``t``; between training timesteps ``t`` is interpolated
    linearly in ``log rho`` (as diffusers does for Karras sigmas), and clamped to ``[0, T-1]``. Values on
    the sampling grid are looked up exactly so that Euler steps see the scheduler's integer timesteps.
    """

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        rho = rho_of_alphas_cumprod(alphas_cumprod)
        if rho.ndim != 1 or rho.numel() < 2 or not bool((rho[1:] > rho[:-1]).all()):
            raise ValueError(
                "scheduler.alphas_cumprod must be a 1-D, strictly decreasing schedule of at least 2 values "
                "(noise level growing with t)"
            )
        self.log_rho = rho.log()
        self.exact: dict[float, float] = {}

    def register(self, rho: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Remember that grid value ``rho[i]`` (in the grid's dtype) is timestep ``timesteps[i]``.

        So are its two neighbouring floats: with ``perturb=True`` torchdiffeq evaluates a step's first
        and last stages one ulp inside the step, and those must still see the scheduler's timestep.
        """
        steps = timesteps.tolist()
        for neighbour in (
            rho,
            torch.nextafter(rho, rho.new_tensor(math.inf)),
            torch.nextafter(rho, rho.new_tensor(0.0)),
        ):
            for r, t in zip(neighbour.tolist(), steps):
                self.exact.setdefault(r, float(t))

    def __call__(self, rho: torch.Tensor) -> float:
        key = float(rho.detach())
        if key in self.exact:
            return self.exact[key]
        if key <= 0.0:
            return 0.0
        log_rho = math.log(key)
        table = self.log_rho
        if log_rho <= table[0]:
            return 0.0
        if log_rho >= table[-1]:
            return float(table.numel() - 1)
        upper = int(torch.searchsorted(table, torch.tensor([log_rho], dtype=table.dtype)).item())
        lower = upper - 1
        weight = (log_rho - float(table[lower])) / float(table[upper] - table[lower])
        return lower + weight


def is_ddim(scheduler: Any) -> bool:
    """Whether ``scheduler`` is a diffusers ``DDIMScheduler`` (or a subclass), by class name."""
    return any(cls.__name__ == "DDIMScheduler" for cls in type(scheduler).__mro__)


def previous_timesteps(scheduler: Any, timesteps: torch.Tensor) -> list[int]:
    """The timestep each sampling step lands on, as the scheduler's own ``step`` computes it.

    ``DDIMScheduler.step`` goes from ``t`` to ``t - T // n`` (``T = num_train_timesteps``, ``n`` the
    number of inference steps) whatever ``timestep_spacing`` listed the timesteps, and reads
    ``final_alpha_cumprod`` where that is negative. For ``"leading"`` spacing this is the next listed
    timestep; for ``"trailing"`` and ``"linspace"`` it often is not (999 -> 899 then 888 -> 788 ... at
    ``n = 10`` with ``linspace``). Any other scheduler goes to the next listed timestep, and after the
    last one to its end (-1 here).

    Args:
        scheduler: the scheduler after ``set_timesteps`` (``num_inference_steps`` is read from it).
        timesteps: its timesteps ``[n]``, decreasing.

    Returns:
        ``prev_t`` for every timestep, ``n`` ints; a negative value means the scheduler's final level.
    """
    listed = timesteps.tolist()
    if not is_ddim(scheduler):
        return listed[1:] + [-1]
    stride = int(scheduler.config.num_train_timesteps) // int(scheduler.num_inference_steps)
    return [t - stride for t in listed]


class DDIMStepPairs:
    """The right-hand side that makes an Euler step from grid point ``i`` to ``i + 1`` a DDIM step to ``prev_t``.

    On the grid ``g`` (rho at the listed timesteps, then the end), ``DDIMScheduler.step`` takes
    ``y = x / alpha`` from ``g[i]`` to the level ``p[i] = rho(prev_t)``, ``y + (p[i] - g[i]) eps``, and the
    next step reads the resulting ``x`` as if it were at ``g[i + 1]``, i.e. ``y`` is rescaled by
    ``s[i] = alpha(p[i]) / alpha(g[i + 1])``. With ``h[i] = g[i + 1] - g[i]`` the right-hand side on step
    ``i`` is therefore::

        f_i(rho, y) = ((s[i] - 1) * y + s[i] * (p[i] - g[i]) * eps) / h[i]

    whose Euler step is that map exactly, and ``eps`` itself where ``p[i] == g[i + 1]``. Other solvers
    integrate ``f_i`` within step ``i``; as ``n`` grows ``s -> 1`` and ``f_i -> eps``, the probability-flow
    ODE. A point ``rho`` belongs to the step whose interval ``[g[i], g[i + 1])`` holds it (the last
    grid point to the last step), so the adjoint pass, which evaluates ``f`` at ``g[i + 1]``, uses
    step ``i + 1``'s map there: part of its O(1/N) discretisation error.

    Args:
        grid: float64 rho grid ``[n + 1]``, decreasing.
        rho_previous: float64 ``[n]``, the level each step lands on.
    """

    def __init__(self, grid: torch.Tensor, rho_previous: torch.Tensor) -> None:
        length = grid[1:] - grid[:-1]
        scale = ((1.0 + grid[1:] ** 2) / (1.0 + rho_previous**2)).sqrt()
        self.linear = ((scale - 1.0) / length).tolist()
        self.noise = (scale * (rho_previous - grid[:-1]) / length).tolist()
        self.paired = (rho_previous != grid[1:]).tolist()
        self.grid = grid
        self._grids: dict[torch.dtype, list[float]] = {}

    @staticmethod
    def needed(grid: torch.Tensor, rho_previous: torch.Tensor) -> bool:
        """Whether some step lands off the next grid point (otherwise the plain ODE is the DDIM map)."""
        return bool((rho_previous != grid[1:]).any())

    def step_of(self, rho: torch.Tensor) -> int:
        """Index of the step whose interval holds ``rho``, compared in ``rho``'s own dtype."""
        if rho.dtype not in self._grids:
            self._grids[rho.dtype] = self.grid.to(rho.dtype).tolist()
        key = float(rho.detach())
        inside = sum(1 for g in self._grids[rho.dtype] if g >= key)
        return min(max(inside - 1, 0), len(self.paired) - 1)

    def derivative(self, rho: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``f_i(rho, y)`` given the noise prediction ``eps`` at ``(alpha(rho) y, t(rho))``; shape of ``y``."""
        i = self.step_of(rho)
        if not self.paired[i]:
            return eps
        return self.linear[i] * y + self.noise[i] * eps


class ProbabilityFlowODE(nn.Module):
    """``f(rho, y) = eps_theta(alpha(rho) y, t(rho), c)``: the right-hand side torchdiffeq integrates.

    Args:
        unet: ``UNet2DModel``, ``UNet2DConditionModel`` or any module called as ``unet(x, t)`` /
            ``unet(x, t, encoder_hidden_states=c)`` returning a tensor or an object with ``.sample``.
        time_map: the ``rho -> t`` map of the scheduler.
        prediction_type: what the UNet predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        guidance_scale: classifier-free guidance weight ``w``; ``eps = eps_u + w (eps_c - eps_u)``.
        checkpoint_steps: recompute each UNet call in backward instead of storing its activations
            (only meaningful for direct backprop).
        conditioning / negative_conditioning: ``encoder_hidden_states`` ``[B, L, D]`` for the conditional
            and (with guidance) unconditional branch. One ODE object per sampling call, so the adjoint
            pass, which runs later, sees the same conditioning as the forward pass.
        counter: a dict whose ``"evaluations"`` entry counts UNet calls (forward, adjoint and recomputed).
        step_pairs: the per-step map of :class:`DDIMStepPairs` when some step lands off the next grid
            point (DDIM's ``trailing`` / ``linspace`` spacings); None integrates ``eps`` itself.
    """

    def __init__(
        self,
        unet: nn.Module,
        time_map: RhoTimeMap,
        prediction_type: str = "epsilon",
        guidance_scale: float = 1.0,
        checkpoint_steps: bool = False,
        conditioning: torch.Tensor | None = None,
        negative_conditioning: torch.Tensor | None = None,
        counter: dict[str, int] | None = None,
        step_pairs: DDIMStepPairs | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.step_pairs = step_pairs
        self.time_map = time_map
        self.prediction_type = check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self.guidance_scale = check_float("guidance_scale", guidance_scale)
        self.checkpoint_steps = checkpoint_steps
        self.conditioning = conditioning
        self.negative_conditioning = negative_conditioning
        self.counter = counter if counter is not None else {"evaluations": 0}

    def epsilon(self, x: torch.Tensor, timestep: float, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Noise prediction at ``x`` (``[B, C, H, W]``), with guidance and prediction-type conversion."""
        self.counter["evaluations"] += 1
        guided = self.guidance_scale != 1.0
        cond = self.conditioning
        if guided:
            x_in = torch.cat([x, x])
            cond = torch.cat([self.negative_conditioning, self.conditioning])
        else:
            x_in = x
        t = torch.full((x_in.shape[0],), timestep, dtype=x.dtype, device=x.device)
        if cond is None:
            out = _unet_output(self.unet(x_in, t))
        else:
            out = _unet_output(self.unet(x_in, t, encoder_hidden_states=cond))
        if self.prediction_type == "v_prediction":
            out = alpha * out + sigma * x_in
        elif self.prediction_type == "sample":
            out = (x_in - alpha * out) / sigma
        if guided:
            uncond, cond_out = out.chunk(2)
            out = uncond + self.guidance_scale * (cond_out - uncond)
        return out

    def forward(self, rho: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        alpha = (1.0 + rho * rho).rsqrt()
        sigma = rho * alpha
        timestep = self.time_map(rho)
        x = alpha * y
        if self.checkpoint_steps and torch.is_grad_enabled():
            eps = checkpoint(self.epsilon, x, timestep, alpha, sigma, use_reentrant=False)
        else:
            eps = self.epsilon(x, timestep, alpha, sigma)
        return eps if self.step_pairs is None else self.step_pairs.derivative(rho, y, eps)


class AdjointSampler(nn.Module):
    """Deterministic diffusion sampler whose backward pass solves the adjoint ODE (AdjointDPM).

    ``sampler(x_T, encoder_hidden_states=None) -> x_0`` integrates the probability-flow ODE in
    ``rho = sigma/alpha`` over the ``num_steps`` timesteps that ``scheduler.set_timesteps(num_steps)``
    gives (on a private copy; the scheduler passed in is not modified). Each step goes from ``t`` to the
    ``prev_t`` the scheduler's own ``step`` goes to (:func:`previous_timesteps`; ``timestep_pairs`` lists
    them): for a ``DDIMScheduler`` ``t - T // n`` with every ``timestep_spacing``, a negative ``prev_t``
    meaning ``final_alpha_cumprod``; for other schedulers the next timestep, then their final level
    (``final_alpha_cumprod`` when they have one, else noise-free). With ``method="euler"`` the result
    equals diffusers' DDIM sampling with ``eta=0`` (to ~4e-7 relative in float32 for the leading,
    trailing and linspace spacings; without ``clip_sample`` / thresholding, which are not part of the
    ODE). Any other scheduler class, and ``clip_sample=True`` or
    ``thresholding=True``, get a ``UserWarning`` at construction saying so (see
    :func:`warn_about_scheduler`); ``x_T`` is checked against the UNet before it runs
    (:func:`check_noise_input`).

    Backward: with ``adjoint=True`` gradients of any loss on ``x_0`` reach ``x_T``, the conditioning and
    the UNet parameters that require grad, through ``torchdiffeq.odeint_adjoint`` with explicit
    ``adjoint_params``; memory does not grow with ``num_steps``. With ``adjoint=False`` autograd
    backpropagates through every solver step (the exact gradient of the discrete sampler; memory grows
    linearly with ``num_steps``), optionally recomputing each UNet call (``checkpoint_steps=True``).

    Args:
        unet: the noise-prediction network (``UNet2DModel``, ``UNet2DConditionModel``, or any module
            with the same call signature). Keep it in eval mode: dropout would make forward and
            adjoint passes see different networks.
        scheduler: any diffusers scheduler with ``alphas_cumprod`` and ``set_timesteps`` (DDPM, DDIM,
            DPM-Solver, ...). Its ``config.prediction_type`` (epsilon / v_prediction / sample) is honoured.
        num_steps: number of solver steps (>= 1); also the number of scheduler timesteps used.
        method: torchdiffeq fixed-grid solver: ``"euler"``, ``"midpoint"``, ``"rk4"``, ``"explicit_adams"``.
        adjoint: solve the adjoint ODE in backward (True) or backpropagate through the solver (False).
        guidance_scale: classifier-free guidance weight; when not 1 the call needs
            ``negative_encoder_hidden_states`` (the unconditional embedding).
        checkpoint_steps: with ``adjoint=False``, recompute each UNet call in backward.

    Shapes: ``x_T`` is ``[B, C, H, W]`` (standard normal noise, ``init_noise_sigma = 1``); the
    conditioning ``[B, L, D]``; ``x_0`` has the shape of ``x_T``.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler: Any,
        num_steps: int = 50,
        method: str = "euler",
        adjoint: bool = True,
        guidance_scale: float = 1.0,
        checkpoint_steps: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(unet, nn.Module):
            raise TypeError(f"unet must be a torch.nn.Module, got {type(unet).__name__}")
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(alphas_cumprod, torch.Tensor):
            raise ValueError(
                f"scheduler must have an `alphas_cumprod` tensor (DDPM/DDIM/DPM-Solver schedulers do); "
                f"{type(scheduler).__name__} has none"
            )
        if not hasattr(scheduler, "set_timesteps"):
            raise ValueError(f"scheduler must have `set_timesteps`; {type(scheduler).__name__} has none")
        self.num_steps = check_positive_int("num_steps", num_steps)
        self.method = check_choice("method", method, METHODS)
        self.adjoint = adjoint
        self.guidance_scale = check_float("guidance_scale", guidance_scale)
        self.checkpoint_steps = checkpoint_steps
        prediction_type = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
        self.prediction_type = check_choice("scheduler.config.prediction_type", prediction_type, PREDICTION_TYPES)
        self.scheduler_name = type(scheduler).__name__
        self.unet = unet
        self.time_map = RhoTimeMap(alphas_cumprod)
        self.timestep_pairs, rho_grid, rho_previous = self._timestep_grid(scheduler, num_steps)
        self.timesteps = torch.tensor([t for t, _ in self.timestep_pairs], dtype=torch.int64)
        # None where every step lands on the next grid point (leading spacing, other schedulers)
        self.step_pairs = (
            DDIMStepPairs(rho_grid, rho_previous) if DDIMStepPairs.needed(rho_grid, rho_previous) else None
        )
        if prediction_type == "sample" and method == "rk4" and float(rho_grid[-1]) == 0.0:
            raise ValueError(
                "method='rk4' evaluates the UNet at the noise-free end, where a prediction_type='sample' "
                "model defines no noise; use euler, midpoint or explicit_adams"
            )
        self.register_buffer("rho_grid", rho_grid, persistent=False)
        self.counter = {"evaluations": 0}
        warn_about_scheduler(scheduler, self.method)

    @staticmethod
    def _timestep_grid(scheduler: Any, num_steps: int) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
        """The ``(t, prev_t)`` pair of each step, the float64 rho grid and where each step lands.

        The grid is ``rho`` at the scheduler's timesteps plus one end point, the noise level the last
        step lands on; ``rho_previous[i]`` (float64, one per grid step) is the level step ``i`` lands on,
        which :func:`previous_timesteps` says (it differs from the next grid point for DDIM's
        ``trailing`` / ``linspace`` spacings). ``prev_t < 0`` stands for the scheduler's final level.
        """
        private = copy.deepcopy(scheduler)
        private.set_timesteps(num_steps)
        timesteps = torch.as_tensor(private.timesteps).to(torch.int64).cpu()
        if timesteps.numel() != num_steps:
            raise ValueError(
                f"{type(scheduler).__name__}.set_timesteps({num_steps}) gave {timesteps.numel()} timesteps; "
                "AdjointSampler needs one per step"
            )
        if not bool((timesteps[1:] < timesteps[:-1]).all()):
            raise ValueError(f"{type(scheduler).__name__} timesteps must be strictly decreasing, got {timesteps}")
        rho_table = rho_of_alphas_cumprod(scheduler.alphas_cumprod)
        rho = rho_table[timesteps]
        final = getattr(scheduler, "final_alpha_cumprod", None)
        rho_end = 0.0 if final is None else float(rho_of_alphas_cumprod(torch.as_tensor(final)))
        previous = previous_timesteps(private, timesteps)
        rho_previous = torch.tensor([float(rho_table[p]) if p >= 0 else rho_end for p in previous], dtype=rho.dtype)
        pairs = list(zip(timesteps.tolist(), previous))
        last = float(rho_previous[-1])
        if last == float(rho[-1]) and num_steps > 1:
            # DDIM with set_alpha_to_one=False: the last step goes from t=0 to t=0, the identity map
            return pairs, rho, rho_previous[:-1]
        if last >= float(rho[-1]):
            raise ValueError(f"the final noise level rho={last} is not below the last timestep's {float(rho[-1])}")
        return pairs, torch.cat([rho, rho.new_tensor([last])]), rho_previous

    def _grid(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        grid = self.rho_grid.to(device=device, dtype=dtype)
        self.time_map.register(grid[:-1], self.timesteps[: grid.numel() - 1])
        return grid

    def forward(
        self,
        x_T: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        negative_encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample ``x_0`` (``[B, C, H, W]``) from ``x_T`` (``[B, C, H, W]``)."""
        check_noise_input(x_T, self.unet)
        guided = self.guidance_scale != 1.0
        if guided and (encoder_hidden_states is None or negative_encoder_hidden_states is None):
            raise ValueError(
                f"guidance_scale={self.guidance_scale} needs both encoder_hidden_states and "
                "negative_encoder_hidden_states (the unconditional embedding)"
            )
        if not guided and negative_encoder_hidden_states is not None:
            raise ValueError("negative_encoder_hidden_states is only used with guidance_scale != 1")
        grid = self._grid(x_T.dtype, x_T.device)
        ode = ProbabilityFlowODE(
            self.unet,
            self.time_map,
            self.prediction_type,
            self.guidance_scale,
            self.checkpoint_steps,
            encoder_hidden_states,
            negative_encoder_hidden_states,
            self.counter,
            self.step_pairs,
        )
        y_T = x_T * (1.0 + grid[0] ** 2).sqrt()
        span = grid[[0, -1]]
        # perturb: evaluate each step's end points one ulp inside it, so that a step's map (DDIMStepPairs)
        # is used on that step alone, by the forward solve and by the adjoint solve run the other way
        options = {"grid_constructor": _GridConstructor(grid), "perturb": self.step_pairs is not None}
        if self.adjoint:
            conditioning = tuple(c for c in (encoder_hidden_states, negative_encoder_hidden_states) if c is not None)
            params = conditioning + tuple(p for p in self.unet.parameters() if p.requires_grad)
            y = odeint_adjoint(ode, y_T, span, method=self.method, options=options, adjoint_params=params)[-1]
        else:
            y = odeint(ode, y_T, span, method=self.method, options=options)[-1]
        return y * (1.0 + grid[-1] ** 2).rsqrt()

    def extra_repr(self) -> str:
        return (
            f"num_steps={self.num_steps}, method={self.method!r}, adjoint={self.adjoint}, "
            f"guidance_scale={self.guidance_scale}, scheduler={self.scheduler_name}"
        )


def warn_about_scheduler(scheduler: Any, method: str) -> None:
    """Say what :class:`AdjointSampler` integrates when it is not the scheduler's own sampling loop.

    Only the scheduler's ``alphas_cumprod``, timesteps and ``prediction_type`` are used: the sampler
    integrates the probability-flow ODE on them, which with ``method="euler"`` is exactly DDIM with
    ``eta=0``. Any other scheduler class (DDPM, Euler, LMS, DPM-Solver with or without Karras sigmas,
    ...) is therefore not reproduced, and ``clip_sample`` / ``thresholding`` (not part of the ODE) are
    never applied: each gets a ``UserWarning`` here rather than a silently different result.
    """
    name = type(scheduler).__name__
    solver = "DDIM with eta=0" if method == "euler" else f"its {method!r} discretisation"
    if not is_ddim(scheduler):
        warnings.warn(
            f"AdjointSampler does not reproduce {name}'s own update: it integrates the probability-flow ODE "
            f"on {name}'s alphas_cumprod at its timesteps ({solver}), so samples differ from {name}'s "
            "sampling loop; pass a DDIMScheduler to make this explicit",
            UserWarning,
            stacklevel=3,
        )
    config = getattr(scheduler, "config", None)
    for option in ("clip_sample", "thresholding"):
        if getattr(config, option, False) is True:
            warnings.warn(
                f"{name}({option}=True) is not applied by AdjointSampler: the probability-flow ODE has no "
                f"{option.replace('_', ' ')} step; pass {option}=False to silence this",
                UserWarning,
                stacklevel=3,
            )


def check_noise_input(x_T: Any, unet: nn.Module) -> None:
    """Refuse an ``x_T`` the UNet cannot take, naming ``x_T``, before the UNet fails deep inside.

    Checks a floating-point ``[B, C, H, W]`` tensor with ``B >= 1``, the dtype of the UNet's parameters,
    ``C == unet.config.in_channels`` and ``H``, ``W`` divisible by the UNet's down-sampling factor
    ``2 ** (len(block_out_channels) - 1)`` (what a diffusers UNet needs; its ``sample_size`` is only the
    training size). Checks that need a diffusers ``config`` are skipped for other modules.
    """
    if not isinstance(x_T, torch.Tensor):
        raise TypeError(f"x_T must be a floating-point tensor [B, C, H, W], got {type(x_T).__name__}")
    if not x_T.is_floating_point():
        raise TypeError(f"x_T must be a floating-point tensor [B, C, H, W], got dtype {x_T.dtype}")
    if x_T.ndim != 4 or x_T.shape[0] == 0:
        raise ValueError(f"x_T must be [B, C, H, W] with B >= 1, got shape {tuple(x_T.shape)}")
    weight = next(unet.parameters(), None)
    if weight is not None and weight.is_floating_point() and weight.dtype != x_T.dtype:
        raise TypeError(f"x_T has dtype {x_T.dtype} but the unet's parameters are {weight.dtype}")
    config = getattr(unet, "config", None)
    channels = getattr(config, "in_channels", None)
    if isinstance(channels, int) and x_T.shape[1] != channels:
        raise ValueError(f"x_T has {x_T.shape[1]} channels but the unet takes in_channels={channels}")
    blocks = getattr(config, "block_out_channels", None)
    if blocks:
        factor = 2 ** (len(blocks) - 1)
        if x_T.shape[2] % factor or x_T.shape[3] % factor:
            raise ValueError(
                f"x_T's height and width {tuple(x_T.shape[2:])} must be multiples of {factor} "
                f"(the unet down-samples {len(blocks) - 1} times; it was trained at sample_size="
                f"{getattr(config, 'sample_size', None)})"
            )


class _GridConstructor:
    """torchdiffeq ``grid_constructor``: the rho grid between the two requested end points.

    Only the two end points are handed to ``odeint`` (so nothing of size ``num_steps`` is stored for
    backward); the solver walks this grid in whichever direction it asks for. torchdiffeq integrates
    in increasing time only, so decreasing spans reach us negated (``t = -rho``), once per reversal.
    """

    def __init__(self, grid: torch.Tensor) -> None:
        self.grid = grid

    def __call__(self, func: Any, y0: Any, t: torch.Tensor) -> torch.Tensor:
        sign = -1.0 if bool(t[0] + t[-1] < 0) else 1.0
        grid = self.grid.to(dtype=t.dtype, device=t.device)
        if bool(sign * t[0] < sign * t[-1]):
            grid = grid.flip(0)
        grid = sign * grid
        grid[0], grid[-1] = t[0], t[-1]
        return grid
