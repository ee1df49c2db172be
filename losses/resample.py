"""Octave-compatible polyphase resampling in torch (what ``pystoi`` does before STOI).

``pystoi`` resamples with ``scipy.signal.resample_poly`` and a Kaiser-windowed sinc filter
designed as Octave's ``resample`` does (60 dB rejection, roll-off a tenth of the cut-off). Using
the same filter here, rather than torchaudio's resampler, keeps STOI within 1e-3 of pystoi.

The filter is applied in polyphase form, one strided ``conv1d`` per output phase: batched,
differentiable, and free of host synchronisation.

>>> import torch
>>> x = torch.randn(2, 16000, dtype=torch.float64)
>>> resample_poly_octave(x, 16000, 10000).shape
torch.Size([2, 10000])
"""

from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=64)  # a pure function of two integers; bounded for arbitrary speed factors
def octave_filter(up: int, down: int) -> torch.Tensor:
    """The anti-aliasing filter for ``up/down`` (reduced), float64 on the CPU, gain ``up``."""
    rejection_db = 60.0
    cutoff = 1.0 / (2 * max(up, down))
    roll_off = cutoff / 10
    half = math.ceil((rejection_db - 8) / (28.714 * roll_off))
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    ideal = 2 * up * cutoff * torch.sinc(2 * cutoff * t)
    beta = 0.1102 * (rejection_db - 8.7)  # Kaiser's formula for rejection above 50 dB
    taps = torch.kaiser_window(2 * half + 1, periodic=False, beta=beta, dtype=torch.float64) * ideal
    # Octave normalises to unit DC gain; resample_poly then multiplies by `up` to undo the
    # energy that zero insertion spreads over `up` samples.
    return taps / taps.sum() * up


def resample_poly_octave(signal: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Resample ``[..., T]`` from ``orig_rate`` to ``new_rate`` Hz, like pystoi's ``resample_oct``.

    The output has ``ceil(T * new_rate / orig_rate)`` samples, aligned as scipy aligns them.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got orig_rate={orig_rate}, new_rate={new_rate}")
    gcd = math.gcd(int(orig_rate), int(new_rate))
    up, down = int(new_rate) // gcd, int(orig_rate) // gcd
    if up == down:
        return signal
    lead, steps = signal.shape[:-1], signal.shape[-1]
    flat = signal.reshape(-1, 1, steps)
    taps = octave_filter(up, down).to(device=signal.device, dtype=signal.dtype)
    half = (taps.shape[0] - 1) // 2
    out_steps = -(-steps * up // down)
    per_phase = -(-out_steps // up)
    # Output k is centred on upsampled sample k * down (scipy's alignment):
    #   y[k] = sum_j h[j] * x_up[k * down + half - j],  x_up[n * up] = x[n], zero elsewhere.
    # Polyphase: outputs k = phase + up * r all use the same taps h[j0::up] (the others meet
    # inserted zeros), so each phase is one strided conv1d on x itself, `up` times cheaper than
    # filtering the zero-stuffed signal.
    kernel = taps.flip(0)  # conv1d correlates; flip to convolve
    phases = []
    for phase in range(up):
        j0 = (half - phase * down) % up
        first = (phase * down + j0 - half) // up   # input sample under tap j0 for r = 0
        phase_taps = kernel[j0::up]
        phases.append((first, phase_taps))
    left = max(0, -min(first for first, _ in phases))
    need = max(first + (per_phase - 1) * down + t.shape[0] for first, t in phases)
    padded = torch.nn.functional.pad(flat, (left, max(0, need - steps)))
    outs = []
    for first, phase_taps in phases:
        start = first + left
        span = (per_phase - 1) * down + phase_taps.shape[0]
        outs.append(torch.nn.functional.conv1d(padded[..., start:start + span],
                                               phase_taps.reshape(1, 1, -1), stride=down))
    # Interleave: phase p supplies outputs p, p + up, p + 2 up, ...
    out = torch.stack(outs, dim=-1).reshape(flat.shape[0], per_phase * up)
    return out[..., :out_steps].reshape(*lead, out_steps)
