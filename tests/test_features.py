"""STFT features and resynthesis against SpeechBrain's compute_STFT / spectral_magnitude / resynthesize."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import soundfile as sf
import torch

from fbrain.models.features import Spectral

REFERENCE = textwrap.dedent("""
    import sys, torch, soundfile as sf
    from speechbrain.processing.features import STFT, ISTFT, spectral_magnitude
    from speechbrain.processing.signal_processing import resynthesize
    wav_path, out_path = sys.argv[1], sys.argv[2]
    wav = torch.tensor(sf.read(wav_path, dtype="float32")[0]).unsqueeze(0)
    stft = STFT(sample_rate=16000, win_length=32, hop_length=16, n_fft=512, window_fn=torch.hamming_window)
    istft = ISTFT(sample_rate=16000, win_length=32, hop_length=16, n_fft=512, window_fn=torch.hamming_window)
    feats = torch.log1p(spectral_magnitude(stft(wav), power=0.5))
    enhanced = torch.expm1(feats) * torch.linspace(0.2, 1.0, feats.shape[-1])
    torch.save({"feats": feats, "resynth": resynthesize(enhanced, wav, stft, istft),
                "raw": resynthesize(enhanced, wav, stft, istft, normalize_wavs=False)}, out_path)
""")


@pytest.mark.speechbrain
def test_features_and_resynthesis_match_speechbrain(samples, tmp_path):
    wav_path = samples / "single-mic" / "example1.wav"
    done = subprocess.run([sys.executable, "-c", REFERENCE, str(wav_path), str(tmp_path / "ref.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = torch.load(tmp_path / "ref.pt")
    wav = torch.tensor(sf.read(wav_path, dtype="float32")[0]).unsqueeze(0)
    spectral = Spectral()
    feats = spectral.log_magnitude(wav)
    assert feats.shape == ref["feats"].shape
    assert float((feats - ref["feats"]).abs().max()) <= 1e-5
    enhanced = torch.expm1(feats) * torch.linspace(0.2, 1.0, feats.shape[-1])
    assert float((spectral.resynthesize(enhanced, wav) - ref["resynth"]).abs().max()) <= 1e-5
    assert float((spectral.resynthesize(enhanced, wav, normalize=False) - ref["raw"]).abs().max()) <= 1e-5


def test_resynthesis_with_the_noisy_magnitude_gives_the_signal_back(samples):
    wav = torch.tensor(sf.read(samples / "single-mic" / "example5.wav", dtype="float32")[0]).unsqueeze(0)
    spectral = Spectral()
    back = spectral.resynthesize(spectral.magnitude(wav), wav, normalize=False)
    assert float((back - wav).abs().max()) <= 1e-4


def test_features_are_differentiable_and_checked():
    spectral = Spectral()
    wav = torch.randn(2, 4000, requires_grad=True)
    spectral.log_magnitude(wav).sum().backward()
    assert torch.isfinite(wav.grad).all()
    silent = torch.zeros(1, 1000, requires_grad=True)
    spectral.log_magnitude(silent).sum().backward()
    assert torch.isfinite(silent.grad).all()  # the eps keeps |STFT| differentiable at 0
    with pytest.raises(ValueError, match=r"wavs: expected \[batch, time\]"):
        spectral.log_magnitude(torch.randn(4000))
    with pytest.raises(ValueError, match="magnitude: expected shape"):
        spectral.resynthesize(torch.ones(1, 3, 257), torch.randn(1, 4000))
