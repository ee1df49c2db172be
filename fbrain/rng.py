"""Randomness as part of the training state.

A step's random draws (dropout, noise injection) must be a function of the
state, never of the caller's global generator. PyTorch's modules draw from the
process-wide default generators, so a step installs the state's key in them,
runs, reads the advanced key back, and restores what the caller had.

The key is the CPU generator's own state (a ``uint8`` tensor). Installing it
needs no Python integer, so no tensor value is ever read on the host. On CUDA
the device generator is seeded from bytes drawn from that same key, so one key
drives every device.

Example::

    >>> import torch
    >>> from fbrain import rng
    >>> key = rng.new_key(0)
    >>> with rng.scope(key) as out:
    ...     a = torch.rand(2)
    >>> with rng.scope(key):
    ...     b = torch.rand(2)
    >>> bool(torch.equal(a, b)), out.key is not key
    (True, True)
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch


def new_key(seed: int) -> torch.Tensor:
    """A fresh key: the state of a CPU generator seeded with ``seed``."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:  # what a torch generator takes (64 bits)
        raise ValueError(f"seed: expected an int in [-2**63, 2**64), got {seed}")
    return torch.Generator().manual_seed(seed).get_state()


class _Out:
    """Receives the advanced key when a :func:`scope` closes."""

    key: torch.Tensor


@contextlib.contextmanager
def scope(key: torch.Tensor, cuda_devices: Sequence[torch.device] = ()) -> Iterator[_Out]:
    """Run a block with the global generators set from ``key``; restore them after.

    The yielded object's ``key`` attribute holds the advanced key once the
    block has finished.
    """
    out = _Out()
    cpu_saved = torch.get_rng_state()
    cuda_saved = [torch.cuda.get_rng_state(d) for d in cuda_devices]
    try:
        torch.set_rng_state(key)
        for device in cuda_devices:
            # Philox state is (seed: 8 bytes, offset: 8 bytes); draw the seed from the key.
            seed_bytes = torch.randint(0, 256, (8,), dtype=torch.uint8)
            torch.cuda.set_rng_state(torch.cat([seed_bytes, torch.zeros(8, dtype=torch.uint8)]), device)
        yield out
        out.key = torch.get_rng_state()
    finally:
        torch.set_rng_state(cpu_saved)
        for device, saved in zip(cuda_devices, cuda_saved):
            torch.cuda.set_rng_state(saved, device)
