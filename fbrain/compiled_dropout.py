"""Dropout inside compiled steps: through ``native_dropout``, which torch.compile handles.

On the CPU, ``torch.nn.functional.dropout`` runs as ``empty_like(x).bernoulli_(1 - p)`` times
``x``. Inside a compiled step, where the gradient transform is part of the graph, torch 2.11's
inductor can fuse the multiplication by that mask into a kernel that runs *before* the in-place
``bernoulli_`` fills it. The forward pass then reads an unfilled buffer: masks that are not random
and not a function of ``state.rng`` (seen with Linear(bias=False) -> BatchNorm1d -> ReLU -> Dropout).
``native_dropout`` is lowered to inductor's own random numbers, with no in-place step, so a
compiled step routes ``F.dropout`` (``nn.Dropout``) through it. Same distribution, same scaling;
eager steps are not affected. Channel dropouts (``Dropout1d/2d/3d``, ``AlphaDropout``) keep their
own path.

Example::

    with when_compiling():
        out = model(x)  # under torch.compile, nn.Dropout layers draw through torch.native_dropout
"""

from __future__ import annotations

import contextlib

import torch

_DEFAULTS = {"p": 0.5, "training": True, "inplace": False}


class NativeDropout(torch.overrides.TorchFunctionMode):
    """A torch function mode that runs ``F.dropout`` (when it drops anything) as ``native_dropout``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.dropout:
            call = {**_DEFAULTS, **dict(zip(("input", "p", "training", "inplace"), args)), **kwargs}
            if call["training"] and call["p"] > 0:
                out = torch.native_dropout(call["input"], call["p"], True)[0]
                return call["input"].copy_(out) if call["inplace"] else out
        return func(*args, **kwargs)


def when_compiling():
    """:class:`NativeDropout` while torch.compile traces, nothing otherwise (eager steps keep
    torch's own dropout, so their masks stay those of a plain PyTorch loop)."""
    return NativeDropout() if torch.compiler.is_compiling() else contextlib.nullcontext()
