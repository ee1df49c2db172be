"""Short-time objective intelligibility (STOI, Taal et al. 2010), batched and differentiable.

Follows ``pystoi.stoi`` (classic STOI, not the extended variant): resample to 10 kHz with the
same Octave-style filter, drop frames more than 40 dB below the loudest frame of the reference,
overlap-add what is left, 256-sample Hann frames zero-padded to a 512-point FFT, 15 one-third
octave bands from 150 Hz, 30-frame (384 ms) segments, clipping at -15 dB SDR, and the mean
correlation of the normalised band envelopes.

Silent-frame removal leaves each example with its own number of frames. Rather than loop, the
kept frames are moved to the front of a fixed-size buffer (a stable sort by "silent"), the rest
zeroed, and frames and segments past each example's count are masked out of the mean. So a batch
runs as one computation with no host synchronisation, and the score has a gradient with respect
to ``estimate`` (the silence decision depends on ``reference`` only).

As in pystoi, an example with fewer than 30 frames left after silence removal scores 1e-5
(pystoi also warns; a warning here would need a host synchronisation, so there is none).

>>> import torch
>>> clean = torch.randn(16000, dtype=torch.float64)
>>> float(stoi(clean, clean, 16000))
1.0
"""

from __future__ import annotations

import functools

import torch

from .resample import resample_poly_octave

STOI_RATE = 10000        # STOI is defined at 10 kHz
FRAME = 256              # samples per frame (25.6 ms), hop FRAME // 2
FFT_SIZE = 512
NUM_BANDS = 15
MIN_FREQ = 150.0         # centre of the lowest one-third octave band, Hz
SEGMENT = 30             # frames per segment: 384 ms
BETA = -15.0             # lower SDR bound, dB
DYNAMIC_RANGE = 40.0     # frames this far below the loudest reference frame count as silence
TOO_SHORT = 1e-5         # pystoi's score when fewer than SEGMENT frames survive
EPS = 2.220446049250313e-16  # numpy's float64 eps, pystoi's guard against division by zero


@functools.lru_cache(maxsize=None)
def third_octave_matrix(rate: int = STOI_RATE, fft_size: int = FFT_SIZE, num_bands: int = NUM_BANDS,
                        min_freq: float = MIN_FREQ) -> torch.Tensor:
    """``[num_bands, fft_size // 2 + 1]`` 0/1 matrix summing FFT bins into one-third octave bands.

    Band edges snap to the nearest FFT bin; the upper edge bin is excluded (as in pystoi).
    """
    freqs = torch.linspace(0, rate, fft_size + 1, dtype=torch.float64)[: fft_size // 2 + 1]
    k = torch.arange(num_bands, dtype=torch.float64)
    low = min_freq * 2.0 ** ((2 * k - 1) / 6)
    high = min_freq * 2.0 ** ((2 * k + 1) / 6)
    # argmin returns the first of equal distances, like numpy's.
    low_bin = ((freqs[None, :] - low[:, None]) ** 2).argmin(dim=1)
    high_bin = ((freqs[None, :] - high[:, None]) ** 2).argmin(dim=1)
    bins = torch.arange(freqs.shape[0])
    return ((bins >= low_bin[:, None]) & (bins < high_bin[:, None])).to(torch.float64)


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite slope at 0; zero bands and padded frames would turn the gradient into
    # NaN (0 * inf). Their value is 0 either way; their gradient is taken as 0.
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def _norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _safe_sqrt((x * x).sum(dim=dim, keepdim=True))


def _frames(signal: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` half-overlapping Hann-windowed frames of ``[B, T]``: ``[B, count, FRAME]``."""
    window = torch.hann_window(FRAME + 2, periodic=False, dtype=signal.dtype, device=signal.device)[1:-1]
    hop = FRAME // 2
    # Half-overlapping frames are pairs of adjacent hop-sized chunks. Reshape and cat, rather
    # than unfold, because vmap has no batching rule for unfold's backward.
    chunks = signal[:, : (count + 1) * hop].reshape(signal.shape[0], count + 1, hop)
    return torch.cat([chunks[:, :-1], chunks[:, 1:]], dim=-1) * window


def _overlap_add(frames: torch.Tensor) -> torch.Tensor:
    """Overlap-add ``[B, F, FRAME]`` frames at hop FRAME/2 into ``[B, (F + 1) * FRAME / 2]``."""
    hop = FRAME // 2
    first, second = frames[..., :hop], frames[..., hop:]
    zero = frames.new_zeros(frames.shape[0], 1, hop)
    # Chunk c holds the first half of frame c plus the second half of frame c - 1.
    chunks = torch.cat([first, zero], dim=1) + torch.cat([zero, second], dim=1)
    return chunks.reshape(frames.shape[0], -1)


def _band_envelopes(signal: torch.Tensor, count: int) -> torch.Tensor:
    """One-third octave band magnitudes ``[B, count, NUM_BANDS]`` of the first ``count`` frames."""
    spectrum = torch.fft.rfft(_frames(signal, count), n=FFT_SIZE)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    bands = third_octave_matrix().to(device=signal.device, dtype=signal.dtype)
    return _safe_sqrt(power @ bands.T)


def stoi(estimate: torch.Tensor, reference: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """STOI of ``estimate`` (processed speech) against ``reference`` (clean speech).

    Both ``[..., T]`` with the same shape; returns ``[...]``, higher is more intelligible
    (about 0.3 for speech buried in noise, 1 for a perfect copy).
    Equal to ``pystoi.stoi(reference, estimate, sample_rate)`` to float rounding.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> clean = torch.randn(2, 16000, generator=g, dtype=torch.float64)
    >>> noisy = clean + 3 * torch.randn(2, 16000, generator=g, dtype=torch.float64)
    >>> bool((stoi(noisy, clean, 16000) < stoi(clean, clean, 16000)).all())
    True
    """
    if estimate.shape != reference.shape:
        raise ValueError(f"estimate and reference must have the same shape [..., time], got "
                         f"{tuple(estimate.shape)} and {tuple(reference.shape)}")
    if estimate.dim() == 0:
        raise ValueError("estimate and reference need a time axis (last), got scalars")
    if not estimate.is_floating_point() or estimate.dtype != reference.dtype:
        raise ValueError("estimate and reference must share one floating-point dtype, got "
                         f"{estimate.dtype} and {reference.dtype}")
    lead = estimate.shape[:-1]
    both = torch.stack([reference, estimate]).reshape(2, -1, estimate.shape[-1])
    both = resample_poly_octave(both, int(sample_rate), STOI_RATE)
    clean, processed = both[0], both[1]
    steps = clean.shape[-1]

    # Frames start every hop while start < steps - FRAME (pystoi's range(0, len - FRAME, hop)).
    num_frames = max(0, -(-(steps - FRAME) // (FRAME // 2)))
    if num_frames - 1 < SEGMENT:  # too short even before silence removal: a static decision
        return torch.full(lead, TOO_SHORT, dtype=estimate.dtype, device=estimate.device)

    # --- silent-frame removal, decided on the reference only -----------------------------------
    clean_frames, processed_frames = _frames(clean, num_frames), _frames(processed, num_frames)
    energy = 20 * torch.log10(_norm(clean_frames.detach(), -1).squeeze(-1) + EPS)  # [B, F]
    keep = energy > energy.max(dim=-1, keepdim=True).values - DYNAMIC_RANGE
    kept = keep.sum(dim=-1)                                                       # [B]
    # Stable sort puts kept frames first, in their original order; the tail is zeroed.
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    in_front = torch.arange(num_frames, device=keep.device) < kept[:, None]
    index = order[..., None].expand(-1, -1, FRAME)
    clean_frames = clean_frames.gather(1, index) * in_front[..., None]
    processed_frames = processed_frames.gather(1, index) * in_front[..., None]
    clean, processed = _overlap_add(clean_frames), _overlap_add(processed_frames)

    # --- band envelopes and 30-frame segments ------------------------------------------------
    # After overlap-add of k frames pystoi's STFT has k - 1 frames; the buffer holds up to F - 1.
    spec_frames = num_frames - 1
    x_bands = _band_envelopes(clean, spec_frames)               # [B, F-1, bands]
    y_bands = _band_envelopes(processed, spec_frames)
    # Sliding 30-frame segments by indexing (vmap-friendly, unlike unfold's backward).
    starts = torch.arange(spec_frames - SEGMENT + 1, device=keep.device)
    window = starts[:, None] + torch.arange(SEGMENT, device=keep.device)
    x_seg = x_bands[:, window].transpose(-1, -2)               # [B, S, bands, SEGMENT]
    y_seg = y_bands[:, window].transpose(-1, -2)
    num_segments = kept - SEGMENT                              # valid segments: (k - 1) - 30 + 1
    valid = torch.arange(x_seg.shape[1], device=keep.device) < num_segments[:, None]   # [B, S]

    # Scale the processed envelope to the clean one's energy, clip at BETA dB SDR, correlate.
    y_seg = y_seg * (_norm(x_seg, -1) / (_norm(y_seg, -1) + EPS))
    y_seg = torch.minimum(y_seg, x_seg * (1 + 10 ** (-BETA / 20)))
    y_seg = y_seg - y_seg.mean(dim=-1, keepdim=True)
    x_seg = x_seg - x_seg.mean(dim=-1, keepdim=True)
    y_seg = y_seg / (_norm(y_seg, -1) + EPS)
    x_seg = x_seg / (_norm(x_seg, -1) + EPS)
    correlation = (y_seg * x_seg).sum(dim=(-2, -1))            # [B, S]: summed over bands
    total = torch.where(valid, correlation, torch.zeros_like(correlation)).sum(dim=-1)
    count = (num_segments.clamp(min=1) * NUM_BANDS).to(total.dtype)
    score = torch.where(num_segments > 0, total / count, torch.full_like(total, TOO_SHORT))
    return score.reshape(lead)
