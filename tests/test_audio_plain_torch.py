"""fbrain.audio and the recipes in plain torch: the same results as torchaudio's functions (where
torchaudio loads) and scipy's filters, and nothing imports torchaudio."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fbrain import audio
from conftest import REPO


def torchaudio_functional():
    """torchaudio.functional, or a skip saying why (it loads only beside torch 2.11)."""
    if importlib.util.find_spec("torchaudio") is None:
        pytest.skip("torchaudio is not installed (the reference for this comparison)")
    try:
        import torchaudio.functional as AF
    except Exception as err:  # noqa: BLE001 - a torchaudio built for another torch fails in many ways
        pytest.skip(f"torchaudio does not load beside torch {torch.__version__}: {err}")
    return AF


@pytest.mark.parametrize("with_lengths", [False, True])
def test_mix_at_snr_equals_torchaudio_add_noise(with_lengths):
    AF = torchaudio_functional()
    g = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(3, 4000, generator=g), torch.randn(3, 4000, generator=g)
    snr = torch.tensor([0.0, 7.5, -3.0])
    lengths = torch.tensor([4000, 2500, 100]) if with_lengths else None
    ours = audio.mix_at_snr(clean, noise, snr, lengths)
    theirs = AF.add_noise(clean, noise, snr, lengths=lengths)
    assert torch.equal(ours, theirs)  # the same operations in the same order


def test_fftconvolve_equals_torchaudio_and_numpy():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 1000, generator=g, dtype=torch.float64), torch.randn(2, 300, generator=g, dtype=torch.float64)
    ours = audio.fftconvolve(x, y)
    for row in range(2):
        assert np.allclose(ours[row].numpy(), np.convolve(x[row].numpy(), y[row].numpy()), atol=1e-10)
    AF = torchaudio_functional()
    assert torch.allclose(ours, AF.fftconvolve(x, y), atol=1e-10)


def tone(freq: float, rate: int, seconds: float = 0.5) -> torch.Tensor:
    return torch.sin(2 * math.pi * freq * torch.arange(int(seconds * rate), dtype=torch.float64) / rate)


def peak_hz(signal: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(signal * torch.hann_window(signal.shape[-1], dtype=signal.dtype)).abs()
    return float(spectrum.argmax()) * rate / signal.shape[-1]


def test_resample_keeps_a_tone_and_matches_scipy_resample_poly():
    signal = tone(1000.0, 44100)
    out = audio.resample(signal, 44100, 16000)
    assert out.shape[-1] == math.ceil(signal.shape[-1] * 16000 / 44100)
    assert abs(peak_hz(out, 16000) - 1000.0) < 4.0
    middle = slice(200, -200)  # away from the edges the filter's transients reach
    rms = lambda x: float(x[middle].pow(2).mean().sqrt())  # noqa: E731
    assert abs(rms(out) - rms(signal)) < 1e-3
    scipy_signal = pytest.importorskip("scipy.signal", reason="scipy (from pystoi) gives the reference")
    up, down = 160, 441
    theirs = scipy_signal.resample_poly(signal.numpy(), up, down, window=("kaiser", 0.1102 * (60 - 8.7)))
    assert np.abs(out.numpy()[middle] - theirs[middle]).max() < 2e-3  # two designs of one 60 dB filter


def test_speed_perturbation_raises_the_pitch_by_its_factor():
    fast = audio.speed_perturb(tone(1000.0, 16000).unsqueeze(0), 16000, [1.1], torch.Generator().manual_seed(0))
    playing = fast[0, :int(0.5 * 16000 / 1.1) - 50]
    assert abs(peak_hz(playing, 16000) - 1100.0) < 5.0


def test_the_recipes_resonator_equals_the_recursive_filter():
    scipy_signal = pytest.importorskip("scipy.signal", reason="scipy (from pystoi) gives the reference")
    from fbrain.recipes.default_data import _resonator
    g = torch.Generator().manual_seed(2)
    pulses = torch.randn(8000, generator=g, dtype=torch.float64)
    ours = _resonator(pulses, 700.0, 116.0, 16000)
    r = math.exp(-math.pi * 116.0 / 16000)
    theta = 2 * math.pi * 700.0 / 16000
    theirs = scipy_signal.lfilter([1 - r, 0, 0], [1, -2 * r * math.cos(theta), r * r], pulses.numpy())
    assert np.abs(ours.numpy() - theirs).max() < 1e-9


NO_TORCHAUDIO = textwrap.dedent("""
    import importlib.abc, sys
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torchaudio" or name.startswith("torchaudio."):
                raise ImportError("torchaudio is blocked in this test")
    sys.meta_path.insert(0, Refuse())
    import torch, fbrain, fbrain.audio, fbrain.checkpoint, fbrain.recipes.enhancement, fbrain.recipes.separation
    from fbrain import optim
    model = torch.nn.Linear(4, 1)
    state = fbrain.TrainState.create(model, optim.adam(1e-2))
    def loss_fn(params, buffers, batch, rng):
        out, _ = fbrain.apply_module(model, params, buffers, batch[0])
        return torch.nn.functional.mse_loss(out, batch[1])
    step = fbrain.make_train_step(loss_fn, optim.adam(1e-2))
    state, metrics = step(state, (torch.randn(8, 4), torch.randn(8, 1)))
    print("OK", "torchaudio" in sys.modules)
""")


def test_fbrain_and_its_recipes_never_import_torchaudio():
    done = subprocess.run([sys.executable, "-c", NO_TORCHAUDIO], capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["OK", "False"]
