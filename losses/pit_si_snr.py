"""SpeechBrain's separation objective, ``get_si_snr_with_pitwrapper``, vectorised.

Same signature, layout and result as ``speechbrain.nnet.losses.get_si_snr_with_pitwrapper``
(``[B, T, C]`` in, per-example ``-SI-SNR`` ``[B]`` out), but one batched computation instead of
a Python loop over examples and permutations, and the inputs are never written to (SpeechBrain's
``cal_si_snr`` multiplies ``estimate_source`` by its mask in place).

>>> import torch
>>> x = torch.arange(600.0).reshape(3, 100, 2)
>>> get_si_snr_with_pitwrapper(x, x[:, :, (1, 0)])
tensor([-135.2284, -135.2284, -135.2284])
"""

from __future__ import annotations

import torch

from .pit import pit
from .si_snr import pairwise_neg_si_snr


def get_si_snr_with_pitwrapper(source: torch.Tensor, estimate_source: torch.Tensor) -> torch.Tensor:
    """Permutation-invariant negative SI-SNR per example, for ``[B, T, C]`` inputs; returns ``[B]``."""
    if source.dim() != 3 or source.shape != estimate_source.shape:
        raise ValueError("source and estimate_source must have the same shape [batch, time, sources], "
                         f"got {tuple(source.shape)} and {tuple(estimate_source.shape)}")
    # transpose is a view: nothing is copied and nothing is written.
    loss, _ = pit(pairwise_neg_si_snr, estimate_source.transpose(1, 2), source.transpose(1, 2))
    return loss
