"""Spectral features and resynthesis of the speech-enhancement template.

The template analyses 16 kHz audio with a 32 ms Hamming window (512 samples), a 16 ms hop (256),
n_fft 512, ``center=True`` and constant padding; its features are ``log1p(|STFT|)``, and the
enhanced magnitude is turned back into audio with the noisy signal's phase.

Example::

    >>> import torch
    >>> from fbrain.models.features import Spectral
    >>> spectral = Spectral()
    >>> wavs = torch.randn(2, 16000)
    >>> feats = spectral.log_magnitude(wavs)           # [batch, frames, 257]
    >>> feats.shape
    torch.Size([2, 63, 257])
    >>> spectral.resynthesize(torch.expm1(feats), wavs, normalize=False).shape
    torch.Size([2, 16000])
"""

from __future__ import annotations

import torch
from torch import nn


class Spectral(nn.Module):
    """STFT analysis, magnitude features and inverse STFT with the template's settings."""

    def __init__(self, sample_rate: int = 16000, win_ms: float = 32.0, hop_ms: float = 16.0, n_fft: int = 512,
                 magnitude_eps: float = 1e-14):
        super().__init__()
        self.win_length = round(sample_rate / 1000.0 * win_ms)
        self.hop_length = round(sample_rate / 1000.0 * hop_ms)
        if n_fft < self.win_length:
            raise ValueError(f"n_fft: expected at least the window length {self.win_length}, got {n_fft}")
        self.n_fft = n_fft
        self.magnitude_eps = magnitude_eps
        # A buffer so the window follows the module across devices; not trained, not saved.
        self.register_buffer("window", torch.hamming_window(self.win_length), persistent=False)

    def stft(self, wavs: torch.Tensor) -> torch.Tensor:
        """Complex STFT, ``[batch, time] -> [batch, frames, n_fft // 2 + 1]``."""
        if wavs.ndim != 2:
            raise ValueError(f"wavs: expected [batch, time], got shape {tuple(wavs.shape)}")
        # torch.stft itself (what torchaudio.functional.spectrogram wraps): torchaudio's wrapper calls
        # torch.jit.isinstance, which torch.compile cannot trace, and compiled steps include these features.
        spec = torch.stft(wavs, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                          window=self.window.to(wavs.dtype), center=True, pad_mode="constant", normalized=False,
                          onesided=True, return_complex=True)
        return spec.transpose(1, 2)

    def magnitude(self, wavs: torch.Tensor) -> torch.Tensor:
        """``sqrt(re^2 + im^2 + eps)``: the eps keeps the gradient finite at silent bins."""
        spec = torch.view_as_real(self.stft(wavs))
        return (spec.pow(2).sum(-1) + self.magnitude_eps).sqrt()

    def log_magnitude(self, wavs: torch.Tensor) -> torch.Tensor:
        """The template's features: ``log1p(|STFT|)``, ``[batch, frames, freq]``."""
        return torch.log1p(self.magnitude(wavs))

    def istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        """Inverse of :meth:`stft`: ``[batch, frames, freq]`` complex -> ``[batch, length]``."""
        return torch.istft(spec.transpose(1, 2), n_fft=self.n_fft, hop_length=self.hop_length,
                           win_length=self.win_length, window=self.window.to(spec.real.dtype), center=True,
                           normalized=False, onesided=True, length=length)

    def resynthesize(self, magnitude: torch.Tensor, noisy: torch.Tensor, normalize: bool = True,
                     eps: float = 1e-14) -> torch.Tensor:
        """Audio from an enhanced magnitude and the noisy signal's phase (peak-normalised by default)."""
        phase = torch.angle(self.stft(noisy))
        if magnitude.shape != phase.shape:
            raise ValueError(f"magnitude: expected shape {tuple(phase.shape)} (the noisy STFT's), "
                             f"got {tuple(magnitude.shape)}")
        wavs = self.istft(torch.polar(magnitude, phase), length=noisy.shape[-1])
        if normalize:
            wavs = wavs / (wavs.abs().amax(dim=1, keepdim=True) + eps)
        return wavs
