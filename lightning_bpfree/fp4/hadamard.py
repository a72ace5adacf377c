"""Random Hadamard transform (RHT) of 16-element chunks along the last dimension.

A 16x16 orthogonal matrix ``H = diag(signs) @ H16 / 4`` (``H16`` the Sylvester Hadamard matrix)
spreads each chunk's outliers over all 16 elements, so a block scale fits the chunk more tightly.
Applied to *both* operands of a GEMM along the contraction dimension it cancels exactly:
``(A H)(B H)^T = A B^T``. The FP4 recipe applies it to the two operands of the weight-gradient GEMM,
whose contraction runs over tokens. One sign vector serves every layer for the whole run.
"""

from __future__ import annotations

import torch

from lightning_bpfree.fp4.constants import WGRAD_SIGNS
from lightning_bpfree.validation import check_float_tensor


def sylvester_hadamard(size: int) -> torch.Tensor:
    """The ``size x size`` Sylvester Hadamard matrix of +-1 (float32); ``size`` a power of two."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"size must be a power of two, got {size}")
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < size:
        matrix = torch.cat((torch.cat((matrix, matrix), 1), torch.cat((matrix, -matrix), 1)), 0)
    return matrix


def hadamard_matrix(
    signs: tuple[int, ...] | torch.Tensor = WGRAD_SIGNS, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """Orthogonal ``n x n`` matrix ``diag(signs) @ H_n / sqrt(n)`` with ``n = len(signs)``."""
    try:
        signs = torch.as_tensor(signs, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"signs must be a 1-D sequence of +1/-1, got {signs!r}") from error
    if signs.ndim != 1 or not bool(((signs == 1) | (signs == -1)).all()):
        raise ValueError(f"signs must be a 1-D sequence of +1/-1, got {signs.tolist()}")
    size = signs.numel()
    if size < 1 or size & (size - 1):
        raise ValueError(f"signs must have a power-of-two length, got {size}")
    matrix = signs[:, None] * sylvester_hadamard(size) / size**0.5
    return matrix.to(dtype=dtype, device=device)


def random_hadamard_transform(
    x: torch.Tensor,
    signs: tuple[int, ...] | torch.Tensor = WGRAD_SIGNS,
    output_dtype: torch.dtype | None = torch.bfloat16,
) -> torch.Tensor:
    """Rotate each chunk of ``len(signs)`` elements along the last dimension of ``x``.

    Args:
        x: ``[..., K]`` with ``K`` a multiple of ``len(signs)`` (16 by default).
        signs: the sign vector of the transform.
        output_dtype: the rotated values are rounded to this dtype (bfloat16, as NVIDIA's kernel does)
            and returned as float32; ``None`` keeps float32.

    Returns:
        float32 tensor of ``x``'s shape. A NaN or inf element makes its whole chunk of ``len(signs)``
        outputs non-finite (every output mixes every input of its chunk); other chunks are unaffected.

    Raises:
        TypeError: ``x`` is not a floating-point tensor, or ``output_dtype`` is not a floating-point dtype.
        ValueError: ``x`` is 0-d, its last dimension is not a multiple of ``len(signs)``, or ``signs`` is
            not a 1-D sequence of +-1 of power-of-two length.
    """
    check_float_tensor("x", x)
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    if output_dtype is not None and not (isinstance(output_dtype, torch.dtype) and output_dtype.is_floating_point):
        raise TypeError(f"output_dtype must be a floating-point torch.dtype or None, got {output_dtype!r}")
    matrix = hadamard_matrix(signs, device=x.device)
    size = matrix.shape[0]
    if x.shape[-1] % size:
        raise ValueError(f"the last dimension of x ({x.shape[-1]}) must be a multiple of the RHT size {size}")
    rotated = (x.float().reshape(-1, size) @ matrix).reshape(x.shape)
    if output_dtype is not None:
        rotated = rotated.to(output_dtype).float()
    return rotated
