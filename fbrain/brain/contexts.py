"""``training_ctx`` / ``evaluation_ctx``: reusable autocast contexts for a precision.

SpeechBrain recipes write ``with self.training_ctx:`` around their forward pass; the object is
entered many times, so each entry opens a fresh ``torch.autocast`` (nothing at all for fp32).

Example::

    >>> import torch
    >>> from fbrain.brain.contexts import PrecisionContext
    >>> ctx = PrecisionContext("bf16", "cpu")
    >>> with ctx:
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.bfloat16
"""

from __future__ import annotations

import torch

from fbrain.precision import autocast_dtype


class PrecisionContext:
    """Autocast to ``precision`` on ``device_type`` each time it is entered (re-entrant)."""

    def __init__(self, precision: str, device_type: str):
        self.precision, self.device_type = precision, device_type
        self.dtype = autocast_dtype(precision)
        self._stack: list = []

    def __enter__(self):
        if self.dtype is None:
            self._stack.append(None)
            return self
        inner = torch.autocast(device_type=self.device_type, dtype=self.dtype)
        inner.__enter__()
        self._stack.append(inner)
        return self

    def __exit__(self, *exc):
        inner = self._stack.pop()
        if inner is not None:
            return inner.__exit__(*exc)
        return False
