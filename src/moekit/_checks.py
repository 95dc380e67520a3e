"""Argument checks shared by the public ops: clear errors that name the argument."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise TypeError/ValueError unless `value` is a tensor of the expected kind."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(
            f"{name}: expected a {ndim}-d tensor, got shape {tuple(value.shape)}"
        )
    if device is not None and value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {value.device}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: Sequence[int], what: str) -> None:
    """Raise ValueError unless `value.shape == expected`; `what` explains the expectation."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(
            f"{name}: expected shape {tuple(expected)} ({what}), got {tuple(value.shape)}"
        )
