"""The recipes' embedded default data: built here, never downloaded.

When a recipe is run without ``--data_folder`` it writes a small data set into its output folder:

- real speech from Debian's ``codec2-examples`` package (``apt-get install codec2-examples``
  puts 8 kHz recordings of several speakers in ``/usr/share/codec2/wav``) when it is installed;
- otherwise synthetic voiced signals: glottal pulse trains with vibrato through three formant
  resonators, cut into syllables. They are not speech, but they have its harmonic structure, so
  the recipes train and their figures move the right way.

The folder layouts are the ones the recipes read from a real ``--data_folder``:
``separation``: ``mixture_K.wav``, ``source1_K.wav``, ``source2_K.wav``;
``enhancement``: ``clean/*.wav`` and ``noise/*.wav``.

Example::

    >>> import os, tempfile
    >>> from fbrain.recipes.default_data import synthetic_speech
    >>> wav = synthetic_speech(f0=120.0, seconds=0.5, sample_rate=8000, seed=0)
    >>> tuple(wav.shape), bool(wav.abs().max() <= 1)
    ((4000,), True)
"""

from __future__ import annotations

import glob
import logging
import math
import os

import torch

from fbrain.audio import fftconvolve, read_audio, resample, write_audio

logger = logging.getLogger(__name__)

CODEC2_WAVS = "/usr/share/codec2/wav"
# Pairs of different speakers (file stems in codec2-examples), mixed for separation.
CODEC2_PAIRS = [("hts1a", "hts2a"), ("morig", "forig"), ("mmt1", "big_dog"), ("vk5qi", "david4")]
CODEC2_CLEAN = ["hts1a", "hts2a", "morig", "forig", "mmt1", "big_dog", "cross", "vk5qi", "david4", "vk2tpm_004"]
CODEC2_BABBLE = "all"  # a long file of many talkers: cut and overlapped into babble noise

# (f0 in Hz, formants in Hz) of the synthetic "speakers".
SYNTHETIC_VOICES = [(110.0, (700, 1220, 2600)), (210.0, (850, 1700, 2900)), (130.0, (400, 2000, 2550)),
                    (185.0, (300, 870, 2240)), (95.0, (640, 1190, 2390)), (240.0, (500, 1500, 2500))]


def codec2_available() -> bool:
    return all(os.path.isfile(os.path.join(CODEC2_WAVS, f"{name}.wav")) for name in CODEC2_CLEAN)


def _codec2(name: str, sample_rate: int, seconds: float | None = None, offset: float = 0.0) -> torch.Tensor:
    wav, rate = read_audio(os.path.join(CODEC2_WAVS, f"{name}.wav"))
    if rate != sample_rate:
        wav = resample(wav, rate, sample_rate)
    start = int(offset * sample_rate)
    stop = None if seconds is None else start + int(seconds * sample_rate)
    return wav[start:stop]


def _resonator(signal: torch.Tensor, freq: float, bandwidth: float, sample_rate: int) -> torch.Tensor:
    # The two-pole filter y[n] = (1 - r) x[n] + 2 r cos(theta) y[n-1] - r^2 y[n-2], applied as a
    # convolution with its impulse response (1 - r) r^k sin((k + 1) theta) / sin(theta), cut where
    # r^k < 1e-12: the same output to float64 rounding, without a loop over samples.
    r = math.exp(-math.pi * bandwidth / sample_rate)
    theta = 2 * math.pi * freq / sample_rate
    k = torch.arange(int(math.log(1e-12) / math.log(r)) + 1, dtype=torch.float64)
    response = (1 - r) * r ** k * torch.sin((k + 1) * theta) / math.sin(theta)
    return fftconvolve(signal.to(torch.float64), response)[..., :signal.shape[-1]].to(signal.dtype)


def synthetic_speech(f0: float, seconds: float, sample_rate: int, seed: int,
                     formants=(700, 1220, 2600)) -> torch.Tensor:
    """A voiced, syllabic signal with speech-like harmonics, peak 0.9."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * sample_rate)
    t = torch.arange(n, dtype=torch.float64) / sample_rate
    vibrato = 1 + 0.04 * torch.sin(2 * math.pi * (4 + torch.rand(1, generator=g, dtype=torch.float64)) * t)
    drift = 1 + 0.15 * torch.sin(2 * math.pi * 0.3 * t + 6.28 * torch.rand(1, generator=g, dtype=torch.float64))
    phase = torch.cumsum(2 * math.pi * f0 * vibrato * drift / sample_rate, 0)
    pulses = (torch.remainder(phase, 2 * math.pi) / math.pi - 1).float()      # sawtooth: rich in harmonics
    voiced = sum(_resonator(pulses, f, 60 + 0.08 * f, sample_rate) for f in formants)
    # Syllables of 120-300 ms with short pauses.
    envelope = torch.zeros(n)
    pos = 0
    while pos < n:
        length = int(sample_rate * (0.12 + 0.18 * float(torch.rand(1, generator=g))))
        window = torch.hann_window(min(length, n - pos) + 2)[1:-1]
        envelope[pos:pos + window.shape[0]] = window
        pos += length + int(sample_rate * 0.06 * float(torch.rand(1, generator=g)))
    wav = voiced * envelope
    return 0.9 * wav / wav.abs().max().clamp_min(1e-9)


def _voice(k: int, seconds: float, sample_rate: int, seed: int) -> torch.Tensor:
    f0, formants = SYNTHETIC_VOICES[k % len(SYNTHETIC_VOICES)]
    return synthetic_speech(f0, seconds, sample_rate, seed=seed, formants=formants)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().sqrt().clamp_min(1e-9)


def _fit(x: torch.Tensor, n: int) -> torch.Tensor:
    return x[:n] if x.shape[0] >= n else torch.nn.functional.pad(x, (0, n - x.shape[0]))


def make_separation_data(folder: str, seed: int = 0) -> dict:
    """Write ``mixture_K.wav``/``source1_K.wav``/``source2_K.wav`` into ``folder``; returns a summary."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    use_codec2 = codec2_available()
    rate = 8000
    for k in range(len(CODEC2_PAIRS)):
        if use_codec2:
            first, second = CODEC2_PAIRS[k]
            s1, s2 = _codec2(first, rate, 3.0), _codec2(second, rate, 3.0)
        else:
            s1, s2 = _voice(2 * k, 3.0, rate, seed + 2 * k), _voice(2 * k + 1, 3.0, rate, seed + 2 * k + 1)
        n = max(s1.shape[0], s2.shape[0])
        s1, s2 = _fit(s1, n), _fit(s2, n)
        gain_db = float(5 * torch.rand(1, generator=g) - 2.5)  # relative level of the two talkers
        s1 = 0.25 * s1 / _rms(s1)
        s2 = 0.25 * s2 / _rms(s2) * 10 ** (gain_db / 20)
        peak = float(torch.stack([s1.abs().max(), s2.abs().max(), (s1 + s2).abs().max()]).max())
        scale = 0.9 / peak if peak > 0.9 else 1.0
        for name, wav in (("source1", s1), ("source2", s2), ("mixture", s1 + s2)):
            write_audio(os.path.join(folder, f"{name}_{k}.wav"), wav * scale, rate)
    source = "codec2-examples speech" if use_codec2 else "synthetic voiced signals"
    logger.info("Built %d two-speaker mixtures from %s in %s", len(CODEC2_PAIRS), source, folder)
    return {"source": source, "mixtures": len(CODEC2_PAIRS), "sample_rate": rate}


def _pink_noise(n: int, generator: torch.Generator) -> torch.Tensor:
    spectrum = torch.fft.rfft(torch.randn(n, generator=generator))
    freqs = torch.arange(spectrum.shape[0], dtype=torch.float32).clamp_min(1)
    return torch.fft.irfft(spectrum / freqs.sqrt(), n)


def make_enhancement_data(folder: str, seed: int = 0, sample_rate: int = 16000) -> dict:
    """Write ``clean/*.wav`` and ``noise/*.wav`` into ``folder``; returns a summary."""
    clean_dir, noise_dir = os.path.join(folder, "clean"), os.path.join(folder, "noise")
    os.makedirs(clean_dir, exist_ok=True)
    os.makedirs(noise_dir, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    use_codec2 = codec2_available()
    if use_codec2:
        clean = {name: _codec2(name, sample_rate, 3.0) for name in CODEC2_CLEAN}
        talkers = [_codec2(CODEC2_BABBLE, sample_rate, 10.0, offset=o) for o in (0.0, 12.0, 24.0, 36.0)]
        babble = sum(t / _rms(t) for t in talkers)
    else:
        clean = {f"voice{k}_{take}": _voice(k, 2.5, sample_rate, seed + 10 * k + take)
                 for k in range(len(SYNTHETIC_VOICES)) for take in range(2)}
        babble = sum(_voice(k, 10.0, sample_rate, seed + 100 + k) for k in range(len(SYNTHETIC_VOICES)))
    for name, wav in clean.items():
        write_audio(os.path.join(clean_dir, f"{name}.wav"), 0.9 * wav / wav.abs().max().clamp_min(1e-9), sample_rate)
    n = 10 * sample_rate
    t = torch.arange(n) / sample_rate
    hum = sum(torch.sin(2 * math.pi * 50 * h * t) / h for h in range(1, 8)) + 0.1 * torch.randn(n, generator=g)
    noises = {"babble": babble[:n], "pink": _pink_noise(n, g), "hum": hum}
    for name, wav in noises.items():
        write_audio(os.path.join(noise_dir, f"{name}.wav"), 0.5 * wav / wav.abs().max().clamp_min(1e-9), sample_rate)
    source = "codec2-examples speech" if use_codec2 else "synthetic voiced signals"
    logger.info("Built %d clean utterances (%s) and %d noises in %s", len(clean), source, len(noises), folder)
    return {"source": source, "clean": len(clean), "noises": len(noises), "sample_rate": sample_rate}


def wav_files(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "*.wav")))
