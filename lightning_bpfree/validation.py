"""Argument checks shared by every public constructor.

Each check names the argument and the accepted values in its message, raises ``TypeError`` for a
value of the wrong type and ``ValueError`` for a value of the right type outside the accepted range,
and returns the value converted to its canonical type (``float`` for numbers, ``int`` for counts), so a
constructor reads ``self.lr = check_float("lr", lr, low=0.0, low_open=True)``.

Rules that hold everywhere:

- ``bool`` is never accepted as a number (``True`` is not an int here), and only a real ``bool`` is
  accepted as a flag (``"false"`` is refused rather than read as true);
- NaN and both infinities are refused alike unless ``allow_inf`` says otherwise;
- strings are never parsed as numbers (``lr="1e-3"`` is a ``TypeError``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_real_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Real):
        return True
    # 0-d tensors and numpy scalars
    return hasattr(value, "item") and getattr(value, "ndim", None) == 0


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """``value`` as a finite ``float`` within ``[low, high]`` (``low_open``/``high_open`` exclude an end).

    ``allow_inf=True`` accepts ``+inf`` (never NaN) when ``high`` is ``None``, for caps that may be off.
    """
    if not _is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    number = float(value)
    if math.isnan(number) or (math.isinf(number) and not (allow_inf and number > 0 and high is None)):
        raise ValueError(f"{name} must be a finite number, got {number}")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be {_range_text(low, high, low_open, high_open)}, got {number:g}")
    return number


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a finite ``float`` > 0 (learning rates, step sizes, scales)."""
    return check_float(name, value, low=0.0, low_open=True)


def check_nonnegative_float(name: str, value: Any) -> float:
    """``value`` as a finite ``float`` >= 0 (weight decay, noise levels, penalties)."""
    return check_float(name, value, low=0.0)


def check_probability(name: str, value: Any, *, include_one: bool = True) -> float:
    """``value`` as a ``float`` in ``[0, 1]`` (``[0, 1)`` with ``include_one=False``)."""
    return check_float(name, value, low=0.0, high=1.0, high_open=not include_one)


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` within ``[low, high]``; floats (even ``2.0``) and bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name} must be an int {_range_text(low, high, False, False)}, got {number}")
    return number


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an ``int`` >= 1 (counts, sizes, steps)."""
    return check_int(name, value, low=1)


def check_optional(check: Any, name: str, value: Any, **kwargs: Any) -> Any:
    """``None`` as is, otherwise ``check(name, value, **kwargs)``."""
    return None if value is None else check(name, value, **kwargs)


def check_bool(name: str, value: Any) -> bool:
    """``value`` when it is a real ``bool`` (``"false"``, ``0`` and ``None`` are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_describe(value)}")
    return value


def check_choice(name: str, value: T, choices: Collection[T]) -> T:
    """``value`` when it is one of ``choices`` (compared with ``==``)."""
    try:
        ok = value in choices
    except TypeError:  # unhashable value against a set
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {sorted(map(str, choices))}, got {value!r}")
    return value


def check_seed(name: str, value: Any) -> int:
    """A random seed: an ``int`` in ``[0, 2**63)``."""
    return check_int(name, value, low=0, high=2**63 - 1)


def check_options(owner: str, options: Mapping[str, Any], accepted: Iterable[str]) -> None:
    """Refuse any key of ``options`` not in ``accepted``, naming the unknown keys and the valid ones.

    ``owner`` names what was being built (``"ZOSGD"``, ``"ZerothOrder('zo-sgd')"``).
    """
    accepted = set(accepted)
    unknown = sorted(set(options) - accepted)
    if unknown:
        listed = ", ".join(sorted(accepted)) or "none"
        raise TypeError(f"{owner} got unknown option(s) {', '.join(map(repr, unknown))}; valid options: {listed}")


def check_float_tensor(name: str, value: Any) -> Any:
    """``value`` when it is a floating-point ``torch.Tensor``; ``TypeError`` naming ``name`` otherwise."""
    import torch

    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {kind}")
    return value


def check_finite_tensor(name: str, value: Any, *, consequence: str = "") -> Any:
    """``value`` (a tensor or numpy array) when every element is finite; otherwise a ``ValueError``
    naming ``name``, counting the NaN / inf elements and adding ``consequence`` (what the caller does
    instead, e.g. "NoProp refuses the batch rather than train on it")."""
    import numpy as np
    import torch

    finite = torch.isfinite(value) if isinstance(value, torch.Tensor) else np.isfinite(np.asarray(value))
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"{name} holds NaN or inf: {bad} non-finite value(s)" + (f"; {consequence}" if consequence else "")
        )
    return value


def check_generator(name: str, value: Any) -> Any:
    """``value`` when it is ``None`` or a ``torch.Generator`` (an int seed is not one)."""
    import torch

    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")
    return value


def check_int_sequence(name: str, values: Any, *, low: int = 1) -> tuple[int, ...]:
    """``values`` as a tuple of ints ``>= low`` (layer widths, channel lists); may be empty."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {values!r}")
    return tuple(check_int(f"{name}[{i}]", value, low=low) for i, value in enumerate(values))


def check_token_ids(name: str, ids: Any, vocab_size: int | None) -> Any:
    """Refuse token ids that are not integers in ``[0, vocab_size)`` (``>= 0`` when the size is unknown):
    an embedding would fail later with "index out of range in self". A tensor is returned as is, a
    sequence as a tuple of ints."""
    import torch

    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        values = ids
    else:
        if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
            raise TypeError(f"{name} must be a sequence of token ids, got {ids!r}")
        ids = tuple(check_int(f"{name}[{i}]", token) for i, token in enumerate(ids))
        values = torch.tensor(ids, dtype=torch.long)
    if values.numel() and (bool((values < 0).any()) or (vocab_size is not None and bool((values >= vocab_size).any()))):
        allowed = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise ValueError(f"{name} must be token ids in {allowed}, got ids from {int(values.min())} to {int(values.max())}")
    return ids
