"""Audio files and augmentation.

Files are read and written with soundfile (torchaudio's own loader needs FFmpeg). Augmentations
take an explicit ``torch.Generator``: the same generator state gives the same noise, room and
speed, so an augmented epoch can be replayed exactly (the global RNG is never touched). Everything
here is plain torch (no torchaudio, which loads only with one torch release): scaling noise to an
SNR, FFT convolution, and polyphase resampling with a Kaiser-windowed sinc filter.

Example::

    >>> import torch
    >>> from fbrain import audio
    >>> g = torch.Generator().manual_seed(0)
    >>> clean = torch.randn(2, 16000)
    >>> noisy = audio.add_noise(clean, [torch.randn(8000)], snr_db=(0, 10), generator=g)
    >>> noisy.shape
    torch.Size([2, 16000])
"""

from __future__ import annotations

import os
from typing import Sequence

import soundfile
import torch

from fbrain.losses.resample import resample_poly_octave


class AudioFileError(OSError):
    """An audio file that is missing or cannot be decoded."""


def read_audio(path: str | os.PathLike, *, context: str = "") -> tuple[torch.Tensor, int]:
    """``(waveform, sample_rate)``: mono ``[time]`` or multichannel ``[time, channels]``, float32.

    ``context`` (e.g. "manifest train.csv, row 'utt3'") is added to errors so a bad row is easy to find.
    """
    where = f" ({context})" if context else ""
    if not os.path.isfile(path):
        raise AudioFileError(f"{path}: audio file not found{where}")
    try:
        data, rate = soundfile.read(os.fspath(path), dtype="float32", always_2d=False)
    except Exception as err:  # soundfile raises its own error types for corrupt/unsupported files
        raise AudioFileError(f"{path}: cannot read audio ({err}){where}") from err
    return torch.from_numpy(data), rate


def write_audio(path: str | os.PathLike, waveform: torch.Tensor, sample_rate: int) -> None:
    """Write ``[time]`` or ``[time, channels]`` audio as a WAV (float32 PCM)."""
    if waveform.ndim not in (1, 2):
        raise ValueError(f"waveform: expected [time] or [time, channels], got shape {tuple(waveform.shape)}")
    soundfile.write(os.fspath(path), waveform.detach().to("cpu", torch.float32).numpy(), sample_rate,
                    subtype="FLOAT")


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """``[..., time]`` audio at ``orig_rate`` Hz, resampled to ``new_rate`` Hz (polyphase, with the
    anti-aliasing filter of Octave's ``resample``: 60 dB stop band, as ``scipy.signal.resample_poly``
    aligns its output); ``ceil(time * new_rate / orig_rate)`` samples."""
    return resample_poly_octave(waveform, orig_rate, new_rate)


def fftconvolve(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The full linear convolution of ``x`` and ``y`` along their last dimension (broadcast over the
    others), ``x.shape[-1] + y.shape[-1] - 1`` samples long, computed with real FFTs."""
    n = x.shape[-1] + y.shape[-1] - 1
    return torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(y, n=n), n=n)


def mix_at_snr(clean: torch.Tensor, noise: torch.Tensor, snr_db: torch.Tensor,
               lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``clean + g * noise`` for ``[..., time]`` signals, each gain ``g`` chosen so the mixture's SNR
    is ``snr_db`` (one value per signal). With ``lengths`` (samples per signal), the energies count
    only the first ``lengths`` samples (the noise is still added everywhere). The same arithmetic
    as ``torchaudio.functional.add_noise``."""
    clean_part, noise_part = clean, noise
    if lengths is not None:
        mask = torch.arange(clean.shape[-1], device=clean.device) < lengths.to(clean.device).unsqueeze(-1)
        clean_part, noise_part = clean * mask, noise * mask
    clean_energy = torch.linalg.vector_norm(clean_part, ord=2, dim=-1) ** 2
    noise_energy = torch.linalg.vector_norm(noise_part, ord=2, dim=-1) ** 2
    present_snr_db = 10 * (torch.log10(clean_energy) - torch.log10(noise_energy))
    gain = 10 ** ((present_snr_db - snr_db) / 20.0)
    return clean + gain.unsqueeze(-1) * noise


def _uniform(low: float, high: float, n: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _crop_or_tile(noise: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    if noise.shape[-1] < length:
        noise = noise.repeat(-(-length // noise.shape[-1]))
    start = int(torch.randint(0, noise.shape[-1] - length + 1, (1,), generator=generator))
    return noise[start:start + length]


def add_noise(clean: torch.Tensor, noises: Sequence[torch.Tensor], snr_db: tuple[float, float],
              generator: torch.Generator, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Add a randomly chosen, randomly placed noise to every waveform of ``[batch, time]`` at a
    random SNR drawn uniformly from ``snr_db`` (scaled by :func:`mix_at_snr`)."""
    if clean.ndim != 2:
        raise ValueError(f"clean: expected [batch, time], got shape {tuple(clean.shape)}")
    if not noises:
        raise ValueError("noises: expected at least one noise recording")
    batch, length = clean.shape
    picks = torch.randint(0, len(noises), (batch,), generator=generator)
    noise = torch.stack([_crop_or_tile(noises[int(i)].to(clean.dtype), length, generator) for i in picks])
    snr = _uniform(snr_db[0], snr_db[1], batch, generator).to(clean.dtype)
    if lengths is not None:
        lengths = (lengths * length).round().long()  # relative lengths (SpeechBrain) -> samples
    return mix_at_snr(clean, noise.to(clean.device), snr.to(clean.device), lengths=lengths)


def reverberate(clean: torch.Tensor, rirs: Sequence[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """Convolve every waveform of ``[batch, time]`` with a randomly chosen room impulse response.

    The response is normalised to unit peak and aligned on its direct path, so the reverberant
    speech keeps the clean one's timing and level.
    """
    if not rirs:
        raise ValueError("rirs: expected at least one room impulse response")
    out = []
    for wav, pick in zip(clean, torch.randint(0, len(rirs), (clean.shape[0],), generator=generator)):
        rir = rirs[int(pick)].to(wav.dtype)
        rir = rir / rir.abs().max().clamp_min(1e-12)
        direct = int(rir.abs().argmax())
        out.append(fftconvolve(wav, rir.to(wav.device))[direct:direct + wav.shape[-1]])
    return torch.stack(out)


def speed_perturb(clean: torch.Tensor, sample_rate: int, factors: Sequence[float],
                  generator: torch.Generator) -> torch.Tensor:
    """Change the speed of the whole ``[batch, time]`` batch by a factor chosen from ``factors``
    (played ``factor`` times faster: resampled from ``factor * sample_rate`` to ``sample_rate``); the
    result is cropped or zero-padded to the input length."""
    factor = factors[int(torch.randint(0, len(factors), (1,), generator=generator))]
    changed = resample(clean, int(round(float(factor) * sample_rate)), sample_rate)
    length = clean.shape[-1]
    if changed.shape[-1] >= length:
        return changed[..., :length]
    return torch.nn.functional.pad(changed, (0, length - changed.shape[-1]))
