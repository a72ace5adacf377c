"""SOFT: softmax-free linear attention (Lu et al., NeurIPS 2021), in plain PyTorch.

Self-attention with the Gaussian kernel ``S_ij = exp(-||q_i - q_j||^2 / 2)`` (queries and keys share one
projection) approximated in Nystrom form through ``m`` landmarks ``L``::

    out = A(Q, L) @ pinv(A(L, L)) @ (A(Q, L)^T @ V)        A(X, Y)_ij = exp(-||x_i - y_j||^2 / 2)

With ``m`` fixed the cost is ``O(N m d)`` in time and ``O(N m)`` in memory for ``N`` tokens, against
``O(N^2)`` for softmax attention. The pseudo-inverse of the small ``m x m`` landmark kernel comes from a
Newton-Schulz iteration (:func:`newton_pinv`) run without a graph; its backward is the closed-form
gradient of the pseudo-inverse, so the iterations cost nothing in memory.

Padding: a key padding mask removes padded tokens from the landmarks and from the sum over keys, and the
landmarks are pooled over the real tokens only, so the outputs at real positions do not depend on how
much padding a sequence carries (see :class:`SOFTKernelAttention`).

Differences from the reference code (fudan-zvg/SOFT): it runs on any device (the reference asserts CUDA);
the default landmarks are a fixed number ``m`` of pooled segments (the reference's strided convolution,
whose landmark count grows with ``N``, is ``landmarks="conv"``); the symmetric normalization is a flag; the
Newton iteration takes the pseudo-inverse of the landmark kernel where the reference inverts ``A + 0.01 I``,
and the landmark convolution has a bias where the reference has none. ``ridge=0.01, landmark_bias=False``
(with ``landmarks="conv"`` and ``qkv_bias=True``) computes the released layer, e.g. to load its checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_bpfree.validation import (
    check_bool,
    check_choice,
    check_int,
    check_nonnegative_float,
    check_optional,
    check_options,
    check_positive_int,
)

LANDMARK_KINDS = ("pool", "conv")
# The SOFTKernelAttention options SOFTAttention passes on through **core_options.
CORE_OPTIONS = ("landmarks", "conv_stride", "project_landmarks", "value_conv_kernel")


def head_size(dim: int, num_heads: int) -> int:
    """The size ``dim // num_heads`` of one attention head, after checking that the heads split ``dim`` evenly.

    Raises:
        TypeError / ValueError: ``num_heads`` or ``dim`` is not a positive int, or ``num_heads`` does not
            divide ``dim``.
    """
    check_positive_int("num_heads", num_heads)
    if check_positive_int("dim", dim) % num_heads != 0:
        raise ValueError(f"dim must be a positive int divisible by num_heads={num_heads}, got dim={dim!r}")
    return dim // num_heads


def gaussian_kernel(x: Tensor, y: Tensor) -> Tensor:
    """The Gaussian kernel ``exp(-||x_i - y_j||^2 / 2)``.

    Args:
        x: ``[..., N, d]``.
        y: ``[..., M, d]`` (same leading dimensions as ``x``).

    Returns:
        ``[..., N, M]``, values in (0, 1].
    """
    # ||x||^2 + ||y||^2 - 2 x.y is one matmul instead of an [N, M, d] difference tensor; rounding can make
    # it slightly negative for near-identical points, hence the clamp.
    sq_dist = x.pow(2).sum(-1, keepdim=True) + y.pow(2).sum(-1).unsqueeze(-2) - 2.0 * (x @ y.transpose(-1, -2))
    return torch.exp(-0.5 * sq_dist.clamp_min(0.0))


def newton_schulz_pinv(A: Tensor, iters: int, ridge: float = 0.0) -> Tensor:
    """Newton-Schulz iteration ``V <- 2V - V P V`` on ``P = A + ridge I`` from ``V0 = alpha P^T`` (no graph needed).

    ``alpha = 1.8 / (||A||_1 ||A||_inf) < 2 / sigma_max(A)^2``, so every singular value of ``V A`` starts in
    (0, 2) and the iteration converges to the Moore-Penrose pseudo-inverse. A singular value ``sigma`` needs
    about ``log2(sigma_max^2 / sigma^2)`` iterations before its error shrinks quadratically, so with few
    iterations the result is the pseudo-inverse of ``A`` with its smallest singular values filtered out.

    With ``ridge > 0`` (square ``A`` only) the iteration inverts ``A + ridge I``, as SOFT's released code does
    with ``ridge = 0.01``. ``alpha`` still comes from the norms of ``A`` (the released step size), capped at
    ``1.9 / (||P||_1 ||P||_inf)`` so that a large ridge cannot push ``alpha sigma_max(P)^2`` past 2.

    Args:
        A: ``[..., m, n]`` float tensor (any batch shape; a zero row/column stays zero in the result).
        iters: number of iterations (>= 0).
        ridge: ``r >= 0`` added to the diagonal of a square ``A`` before inverting.

    Returns:
        ``[..., n, m]``, same dtype as ``A``.
    """
    ridge = _check_matrix(A, iters, ridge)

    def norm_product(M: Tensor) -> Tensor:
        # ||M||_1 ||M||_inf >= sigma_max(M)^2; clamped so an all-zero matrix keeps alpha finite (V0 = 0 stays 0).
        return (M.abs().sum(-2).amax(-1) * M.abs().sum(-1).amax(-1)).clamp_min(torch.finfo(M.dtype).tiny)

    alpha = 1.8 / norm_product(A)
    P = A
    if ridge > 0.0:
        P = A + ridge * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        alpha = torch.minimum(alpha, 1.9 / norm_product(P))
    V = alpha[..., None, None] * P.transpose(-1, -2)
    for _ in range(iters):
        V = 2.0 * V - V @ (P @ V)
    return V


class _NewtonPinv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A: Tensor, iters: int, ridge: float) -> Tensor:
        # Half precision has too few mantissa bits for V <- 2V - VAV to converge; float64 stays float64.
        work = A.detach().float() if A.element_size() < 4 else A.detach()
        V = newton_schulz_pinv(work, iters, ridge)
        if ridge > 0.0:
            # d(A + rI) = dA, so the gradient is that of the inverse of the shifted matrix.
            work = work + ridge * torch.eye(work.shape[-1], dtype=work.dtype, device=work.device)
        ctx.save_for_backward(work, V)
        return V.to(A.dtype)

    @staticmethod
    def backward(ctx, grad_V: Tensor) -> tuple[Tensor, None, None]:
        A, V = ctx.saved_tensors
        G = grad_V.to(A.dtype)
        Vt = V.transpose(-1, -2)
        Gt = G.transpose(-1, -2)
        # Golub-Pereyra: dV = -V dA V + V V^T dA^T (I - A V) + (I - V A) dA^T V^T V. The two projector terms
        # vanish for an invertible A; they keep the gradient right when A is rank-deficient (padded landmarks)
        # or when the iteration has filtered out small singular values.
        eye_m = torch.eye(A.shape[-2], dtype=A.dtype, device=A.device)
        eye_n = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        grad_A = -Vt @ G @ Vt
        grad_A = grad_A + (eye_m - A @ V) @ Gt @ (V @ Vt)
        grad_A = grad_A + (Vt @ V) @ Gt @ (eye_n - V @ A)
        return grad_A.to(grad_V.dtype), None, None


def newton_pinv(A: Tensor, iters: int = 20, ridge: float = 0.0) -> Tensor:
    """Pseudo-inverse of ``A`` (or inverse of ``A + ridge I``) by Newton-Schulz iteration, analytic backward.

    The forward runs :func:`newton_schulz_pinv` without recording a graph, in float32 for bf16/fp16
    inputs (in the input's dtype otherwise); the backward applies the closed-form gradient of the
    pseudo-inverse once, so memory does not grow with ``iters``.

    Args:
        A: ``[..., m, n]`` floating tensor.
        iters: Newton-Schulz iterations; a condition number ``kappa`` needs about ``2 log2(kappa) + 10``
            iterations to reach a relative error below 1e-6 (measured on 32 x 32 SPD matrices in
            float64); with fewer, the result is a spectrally filtered pseudo-inverse.
        ridge: ``r >= 0``; with ``r > 0`` (square ``A`` only) the result is the inverse of ``A + r I``.
            SOFT's released code uses ``r = 0.01``: at condition number 10 that moves the inverse by about
            1.4 %, so the default 0 gives the pseudo-inverse that the Nystrom form calls for.

    Returns:
        ``[..., n, m]`` in the dtype of ``A``.
    """
    ridge = _check_matrix(A, iters, ridge)
    return _NewtonPinv.apply(A, iters, ridge)


def _check_matrix(A: Tensor, iters: int, ridge: float) -> float:
    """The argument checks of the two pseudo-inverse functions (non-finite entries are allowed: they give NaN).

    Returns ``ridge`` as a float.
    """
    if not isinstance(A, Tensor) or not A.is_floating_point():
        raise TypeError(f"A must be a floating-point torch.Tensor, got {type(A).__name__}")
    if A.dim() < 2:
        raise ValueError(f"A must have at least 2 dimensions [..., m, n], got shape {tuple(A.shape)}")
    if A.shape[-1] == 0 or A.shape[-2] == 0:
        raise ValueError(f"A must have m, n >= 1 in its shape [..., m, n], got shape {tuple(A.shape)}")
    check_int("iters", iters, low=0)
    ridge = check_nonnegative_float("ridge", ridge)
    if ridge > 0.0 and A.shape[-1] != A.shape[-2]:
        raise ValueError(f"ridge > 0 needs a square A [..., n, n], got shape {tuple(A.shape)}")
    return ridge


def _check_key_padding_mask(key_padding_mask: Tensor | None, batch: int, tokens: int) -> Tensor | None:
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
        raise TypeError("key_padding_mask must be a bool tensor [B, N] with True marking padding")
    if tuple(key_padding_mask.shape) != (batch, tokens):
        raise ValueError(
            f"key_padding_mask must have shape [B, N] = {(batch, tokens)}, got {tuple(key_padding_mask.shape)}"
        )
    return key_padding_mask


def _check_hw(hw: tuple[int, int] | None, tokens: int) -> tuple[int, int] | None:
    if hw is None:
        return None
    if not isinstance(hw, (tuple, list)) or len(hw) != 2:
        raise TypeError(f"hw must be a pair (H, W) of ints, got {hw!r}")
    height, width = check_positive_int("hw[0]", hw[0]), check_positive_int("hw[1]", hw[1])
    if height * width != tokens:
        raise ValueError(f"hw=(H, W) must satisfy H * W == N = {tokens}, got hw={tuple(hw)}")
    return height, width


def _grid_shape(count: int, H: int, W: int) -> tuple[int, int]:
    """A landmark grid of at most ``count`` cells with about the aspect ratio of ``H x W``."""
    rows = min(H, max(1, round(math.sqrt(count * H / W))))
    cols = min(W, max(1, count // rows))
    return rows, cols


def segment_pooling_matrix(
    valid: Tensor, num_landmarks: int, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Averaging weights that pool the real tokens of each sequence into contiguous segments.

    Token ``t`` of sequence ``b`` with rank ``r`` among that sequence's ``n_b`` real tokens goes to segment
    ``floor(r * m_b / n_b)`` with ``m_b = min(num_landmarks, n_b)``. Only the real tokens count, so the
    segments (and the landmarks) are the same however much padding the sequence carries, and a sequence
    shorter than ``num_landmarks`` gets one landmark per token.

    Args:
        valid: bool ``[B, N]``, True for real tokens.
        num_landmarks: ``m``.
        dtype: dtype of ``weights`` (the queries' dtype: a float64 layer must not pool with float32 ``1/3``).

    Returns:
        ``weights`` ``[B, m, N]`` in ``dtype`` (rows of real segments sum to 1, other rows are 0) and
        ``landmark_valid`` bool ``[B, m]``.
    """
    n_real = valid.sum(-1, keepdim=True)
    m_b = n_real.clamp(max=num_landmarks)
    rank = valid.long().cumsum(-1) - 1
    segment = torch.where(valid, rank * m_b // n_real.clamp_min(1), num_landmarks)
    one_hot = F.one_hot(segment, num_landmarks + 1)[..., :num_landmarks].transpose(1, 2).to(_pooling_dtype(dtype))
    counts = one_hot.sum(-1, keepdim=True)
    landmark_valid = counts.squeeze(-1) > 0
    return (one_hot / counts.clamp_min(1.0)).to(dtype), landmark_valid


def grid_pooling_matrix(
    valid: Tensor, hw: tuple[int, int], num_landmarks: int, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Averaging weights that pool an ``H x W`` token grid into a grid of at most ``num_landmarks`` cells.

    Cell borders follow ``adaptive_avg_pool2d``'s rule (``floor(i H / h)`` to ``ceil((i + 1) H / h)``);
    padded tokens are left out of every cell and a cell without real tokens is not a landmark.

    Args:
        valid: bool ``[B, H * W]``, True for real tokens.
        hw: ``(H, W)``.
        num_landmarks: the largest number of cells.
        dtype: dtype of ``weights``.

    Returns:
        ``weights`` ``[B, m, H * W]`` in ``dtype`` and ``landmark_valid`` bool ``[B, m]``, ``m = h * w``.
    """
    H, W = hw
    rows, cols = _grid_shape(num_landmarks, H, W)

    def membership(size: int, cells: int) -> Tensor:
        index = torch.arange(size, device=valid.device)
        cell = torch.arange(cells, device=valid.device)[:, None]
        start = torch.div(cell * size, cells, rounding_mode="floor")
        end = torch.div((cell + 1) * size + cells - 1, cells, rounding_mode="floor")
        return ((index >= start) & (index < end)).float()  # [cells, size]

    cell_of_token = torch.einsum("ah,bw->abhw", membership(H, rows), membership(W, cols)).reshape(rows * cols, H * W)
    weights = (cell_of_token.unsqueeze(0) * valid.unsqueeze(1).float()).to(_pooling_dtype(dtype))
    counts = weights.sum(-1, keepdim=True)
    return (weights / counts.clamp_min(1.0)).to(dtype), counts.squeeze(-1) > 0


def _pooling_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 layers, float32 otherwise: a half-precision count above 256 would be rounded."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class SOFTKernelAttention(nn.Module):
    """The SOFT attention core on projected heads: landmarks, Gaussian kernels, Nystrom product.

    It holds the only parameters SOFT adds (the landmark projection and the optional depthwise
    convolution on ``V``); :class:`SOFTAttention` wraps it with the query/value/output projections and
    :func:`lightning_bpfree.attention.use_soft_attention` attaches one to each attention layer of a
    transformers model.

    Args:
        head_dim: ``d``, the size of one head.
        num_landmarks: ``m`` for ``landmarks="pool"`` (fixed, whatever ``N``); sequences with fewer real
            tokens use each token as a landmark, where the Nystrom form is exact.
        newton_iters: Newton-Schulz iterations of :func:`newton_pinv`.
        normalize: SOFT's symmetric normalization, ``pinv <- D^-1/2 pinv D^-1/2`` with ``D`` the row sums
            of the landmark kernel.
        landmarks: ``"pool"`` (segment or grid means, then ``Linear + LayerNorm + GELU``) or ``"conv"``
            (the reference's convolution with kernel = stride = ``conv_stride``, then ``LayerNorm + GELU``;
            ``N / conv_stride`` landmarks, so the cost is no longer linear in ``N``).
        conv_stride: stride of ``landmarks="conv"`` (per axis for image tokens).
        project_landmarks: apply the learned ``Linear + LayerNorm + GELU`` to the pooled landmarks (SOFT);
            False uses the plain segment means (as Nystromformer does), with which a sequence of at most
            ``num_landmarks`` tokens gets the exact kernel attention ``A(Q, Q) V``.
        value_conv_kernel: if set, adds a depthwise convolution of this (odd) size on ``V`` (1D along the
            sequence, 2D over the ``hw`` grid): one kernel per channel of a head, shared by the heads
            (SOFT's reference has one kernel per head, shared by the channels).
        ridge: invert ``A(L, L) + ridge I`` instead of taking the pseudo-inverse (see :func:`newton_pinv`);
            the released code uses 0.01.
        landmark_bias: a bias in the landmark convolution / projection (the released code has none).

    ``ridge=0.01, landmark_bias=False`` (with ``landmarks="conv"``, ``value_conv_kernel=None``) computes the
    released ``SoftmaxFreeAttentionKernel``; the defaults keep the pseudo-inverse of the paper's Nystrom form.
    """

    def __init__(
        self,
        head_dim: int,
        num_landmarks: int = 49,
        newton_iters: int = 20,
        normalize: bool = False,
        landmarks: str = "pool",
        conv_stride: int = 4,
        project_landmarks: bool = True,
        value_conv_kernel: int | None = None,
        ridge: float = 0.0,
        landmark_bias: bool = True,
    ) -> None:
        super().__init__()
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.ridge = check_nonnegative_float("ridge", ridge)
        self.landmark_bias = check_bool("landmark_bias", landmark_bias)
        self.num_landmarks = check_positive_int("num_landmarks", num_landmarks)
        self.newton_iters = check_positive_int("newton_iters", newton_iters)
        self.normalize = check_bool("normalize", normalize)
        self.landmarks = check_choice("landmarks", landmarks, LANDMARK_KINDS)
        self.conv_stride = check_positive_int("conv_stride", conv_stride)
        self.value_conv_kernel = check_optional(check_positive_int, "value_conv_kernel", value_conv_kernel)
        if value_conv_kernel is not None and value_conv_kernel % 2 == 0:
            # an even kernel has no centre, so "same" padding would shift the sequence by half a token
            raise ValueError(f"value_conv_kernel must be None or an odd positive int, got {value_conv_kernel!r}")
        self.project_landmarks = check_bool("project_landmarks", project_landmarks)
        if landmarks == "conv":
            self.landmark_conv = nn.Conv2d(
                head_dim, head_dim, kernel_size=conv_stride, stride=conv_stride, bias=landmark_bias
            )
        elif project_landmarks:
            self.landmark_proj = nn.Linear(head_dim, head_dim, bias=landmark_bias)
        if landmarks == "conv" or project_landmarks:
            self.landmark_norm = nn.LayerNorm(head_dim)
        if value_conv_kernel is not None:
            # One square depthwise kernel serves both layouts: sequences use its middle row.
            self.value_conv = nn.Conv2d(
                head_dim, head_dim, value_conv_kernel, padding=value_conv_kernel // 2, groups=head_dim
            )

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_landmarks={self.num_landmarks}, "
            f"newton_iters={self.newton_iters}, normalize={self.normalize}, landmarks={self.landmarks!r}, "
            f"ridge={self.ridge}, landmark_bias={self.landmark_bias}"
        )

    def forward(
        self, q: Tensor, v: Tensor, key_padding_mask: Tensor | None = None, hw: tuple[int, int] | None = None
    ) -> Tensor:
        """Attend with queries = keys = ``q``.

        Args:
            q: ``[B, heads, N, d]`` queries (also the keys), already scaled (SOFT uses ``d^-1/4``).
            v: ``[B, heads, N, d_v]`` values.
            key_padding_mask: optional bool ``[B, N]``, True marks padding.
            hw: optional ``(H, W)`` grid of the ``N`` tokens (2D landmarks and value convolution).

        Returns:
            ``[B, heads, N, d_v]``; rows at padded positions are zero.
        """
        for name, tensor in (("q", q), ("v", v)):
            if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor [B, heads, N, d], got {type(tensor).__name__}")
        if q.dim() != 4 or v.dim() != 4 or q.shape[:3] != v.shape[:3]:
            raise ValueError(f"q and v must be [B, heads, N, d] with equal B, heads, N; got {q.shape}, {v.shape}")
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"q has head size {q.shape[-1]}, this module was built for head_dim={self.head_dim}")
        B, heads, N, _ = q.shape
        key_padding_mask = _check_key_padding_mask(key_padding_mask, B, N)
        hw = _check_hw(hw, N)
        valid = torch.ones(B, N, dtype=torch.bool, device=q.device) if key_padding_mask is None else ~key_padding_mask
        if key_padding_mask is not None:
            # Padded entries are replaced, not multiplied by 0, so whatever they hold (even NaN) never
            # reaches the real tokens' outputs.
            q = torch.where(valid[:, None, :, None], q, 0.0)
            v = torch.where(valid[:, None, :, None], v, 0.0)
        token_weight = valid[:, None, :, None].to(q.dtype)  # [B, 1, N, 1]

        landmarks, landmark_valid = self._landmarks(q, valid, hw)  # [B, heads, m, d], [B, m]
        landmark_weight = landmark_valid[:, None, None, :].to(q.dtype)  # [B, 1, 1, m]
        # Zeroing padded rows and unused landmark columns removes them from every sum below; the landmark
        # kernel becomes block-diagonal [A_real, 0], whose pseudo-inverse is [pinv(A_real), 0].
        kernel_ql = gaussian_kernel(q, landmarks) * token_weight * landmark_weight  # [B, h, N, m]
        kernel_ll = gaussian_kernel(landmarks, landmarks) * landmark_weight * landmark_weight.transpose(-1, -2)
        # With a ridge the unused slots invert to 1 / ridge, in their own diagonal block; the zero columns of
        # kernel_ql and zero rows of landmark_values keep them out of the output.
        inverse = newton_pinv(kernel_ll, self.newton_iters, self.ridge)
        if self.normalize:
            inv_sqrt_degree = kernel_ll.sum(-1).clamp_min(1e-12).rsqrt() * landmark_weight[:, :, 0, :]
            inverse = inv_sqrt_degree.unsqueeze(-1) * inverse * inv_sqrt_degree.unsqueeze(-2)
        landmark_values = kernel_ql.transpose(-1, -2) @ (v * token_weight)  # [B, h, m, d_v]
        out = kernel_ql @ (inverse @ landmark_values)
        if self.value_conv_kernel is not None:
            out = out + self._value_conv(v * token_weight, hw) * token_weight
        return out

    def _landmarks(self, q: Tensor, valid: Tensor, hw: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
        if self.landmarks == "conv":
            pooled, landmark_valid = self._conv_landmarks(q, valid, hw)
        else:
            if hw is None:
                weights, landmark_valid = segment_pooling_matrix(valid, self.num_landmarks, q.dtype)
            else:
                weights, landmark_valid = grid_pooling_matrix(valid, hw, self.num_landmarks, q.dtype)
            pooled = weights.unsqueeze(1) @ q
            if not self.project_landmarks:
                return pooled, landmark_valid
            pooled = self.landmark_proj(pooled)
        return F.gelu(self.landmark_norm(pooled)), landmark_valid

    def _conv_landmarks(self, q: Tensor, valid: Tensor, hw: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
        B, heads, N, d = q.shape
        s = self.conv_stride
        grid = (1, N) if hw is None else hw
        kernel = (1, s) if hw is None else (s, s)
        if grid[0] < kernel[0] or grid[1] < kernel[1]:
            raise ValueError(f"landmarks='conv' with conv_stride={s} needs at least {kernel} tokens, got {grid}")
        q_grid = (q * valid[:, None, :, None].to(q.dtype)).transpose(-1, -2).reshape(B * heads, d, *grid)
        weight = self.landmark_conv.weight if hw is not None else self.landmark_conv.weight[..., :1, :]
        # In 1D a single kernel row is used, so one module serves both layouts.
        pooled = F.conv2d(q_grid, weight, self.landmark_conv.bias, stride=kernel)
        m = pooled.shape[-2] * pooled.shape[-1]
        pooled = pooled.reshape(B, heads, d, m).transpose(-1, -2)
        # A window with any padded token is no landmark, so right padding leaves the real landmarks alone.
        all_real = F.max_pool2d((~valid).float().reshape(B, 1, *grid), kernel, stride=kernel) == 0
        return pooled, all_real.reshape(B, m)

    def _value_conv(self, v: Tensor, hw: tuple[int, int] | None) -> Tensor:
        B, heads, N, d = v.shape
        k = self.value_conv_kernel
        grid = (1, N) if hw is None else hw
        channels = v.transpose(-1, -2).reshape(B * heads, d, *grid)
        weight = self.value_conv.weight if hw is not None else self.value_conv.weight[:, :, k // 2 : k // 2 + 1]
        padding = (k // 2, k // 2) if hw is not None else (0, k // 2)
        mixed = F.conv2d(channels, weight, self.value_conv.bias, padding=padding, groups=d)
        return mixed.reshape(B, heads, d, N).transpose(-1, -2)


class SOFTAttention(nn.Module):
    """Multi-head SOFT self-attention: ``[B, N, C] -> [B, N, C]`` in time and memory linear in ``N``.

    Queries and keys share the projection ``W_q`` (SOFT's Gaussian kernel needs ``K = Q``) scaled by
    ``d^-1/4``; values have their own projection; an output projection mixes the heads.

    Args:
        dim: ``C``, the embedding size; must be divisible by ``num_heads``.
        num_heads: number of heads.
        num_landmarks: landmarks per head (default 49, a 7x7 grid for image tokens).
        newton_iters: Newton-Schulz iterations for the landmark pseudo-inverse.
        normalize: the symmetric normalization of SOFT-Norm.
        qkv_bias: bias in the query and value projections.
        ridge: invert ``A(L, L) + ridge I`` rather than take the pseudo-inverse (released code: 0.01).
        landmark_bias: a bias in the landmark convolution / projection (released code: none).
        **core_options: ``landmarks``, ``conv_stride``, ``project_landmarks``, ``value_conv_kernel`` of
            :class:`SOFTKernelAttention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_landmarks: int = 49,
        newton_iters: int = 20,
        normalize: bool = False,
        qkv_bias: bool = False,
        ridge: float = 0.0,
        landmark_bias: bool = True,
        **core_options: Any,
    ) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = head_size(dim, num_heads)
        check_bool("qkv_bias", qkv_bias)
        check_options("SOFTAttention", core_options, CORE_OPTIONS)
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.value = nn.Linear(dim, dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)
        self.core = SOFTKernelAttention(
            self.head_dim,
            num_landmarks=num_landmarks,
            newton_iters=newton_iters,
            normalize=normalize,
            ridge=ridge,
            landmark_bias=landmark_bias,
            **core_options,
        )

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, hw: tuple[int, int] | None = None) -> Tensor:
        """Self-attention over the tokens of ``x``.

        Args:
            x: ``[B, N, C]``.
            key_padding_mask: optional bool ``[B, N]``, True marks padding (PyTorch's convention).
            hw: optional ``(H, W)`` with ``H * W == N`` for image tokens (2D landmarks).

        Returns:
            ``[B, N, C]``; padded positions carry the output projection's bias only.
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor [B, N, C], got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, N, C={self.dim}], got shape {tuple(x.shape)}")
        B, N, _ = x.shape
        heads = (B, N, self.num_heads, self.head_dim)
        q = self.query(x).view(heads).transpose(1, 2) * self.head_dim**-0.25
        v = self.value(x).view(heads).transpose(1, 2)
        out = self.core(q, v, key_padding_mask=key_padding_mask, hw=hw)
        return self.out(out.transpose(1, 2).reshape(B, N, self.dim))
