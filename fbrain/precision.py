"""Mixed precision: the three precisions a step can run in, and their autocast contexts.

Example::

    >>> from fbrain.precision import autocast_dtype
    >>> autocast_dtype("bf16")
    torch.bfloat16
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for fp32); a clear error for anything else."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def autocast(precision: str, device: torch.device):
    """The context a forward pass runs in: autocast for bf16/fp16, nothing for fp32."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
