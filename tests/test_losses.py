"""fbrain.losses against SpeechBrain, torchmetrics and pystoi on the shared real speech.

SpeechBrain runs in a subprocess (importing it turns on TF32 and patches the DataLoader for the
whole process); tensors travel through files. torchmetrics and pystoi run in-process.
"""

from __future__ import annotations

import doctest
import importlib
import itertools
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.func import grad, vmap

from conftest import NO_SPEECHBRAIN, bitwise_equal, speech_samples, speechbrain_installed
from fbrain.losses import (get_si_snr_with_pitwrapper, l1_loss, mse_loss, pairwise_neg_si_snr, pit,
                           reorder_sources, si_snr, si_snr_improvement, stoi)

DTYPES = [torch.float32, torch.float64]
# Agreement asked of SpeechBrain's get_si_snr_with_pitwrapper.
PIT_TOL = {torch.float32: 1e-5, torch.float64: 1e-8}
SNRS_DB = [-5, 0, 5, 10, 20]
SEGMENT = 48000  # 3 s at 16 kHz: every separation utterance is longer


# ---------------------------------------------------------------- real speech ---------------------

def _read(path) -> np.ndarray:
    audio, rate = sf.read(str(path), dtype="float64")
    assert rate == 16000, f"{path}: expected 16 kHz, got {rate}"
    return audio


def _separation(folder, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    base = folder / "separation"
    return tuple(_read(base / f"{name}_{k}.wav") for name in ("source1", "source2", "mixture"))


def _at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    noise = np.resize(noise, clean.shape)  # tiles short noise, cuts long noise
    gain = np.sqrt((clean ** 2).sum() / ((noise ** 2).sum() * 10 ** (snr_db / 10)))
    return clean + gain * noise


def _real_separation_batch(folder, num_sources: int):
    """Targets ``[4, C, SEGMENT]`` from the shared separation set, and imperfect estimates of them,
    each example's estimates shuffled by a different, known permutation."""
    rng = np.random.default_rng(0)
    noise = _read(folder / "noise" / "noise2.wav")
    targets, estimates, perms = [], [], []
    all_perms = list(itertools.permutations(range(num_sources)))
    for k in range(4):
        s1, s2, _ = _separation(folder, k)
        third = _separation(folder, (k + 1) % 4)[0]
        sources = np.stack([x[:SEGMENT] for x in (s1, s2, third)][:num_sources])
        # Leak some of the next source and some noise into each estimate, at different levels.
        leak = 0.1 + 0.1 * rng.random(num_sources)[:, None]
        est = sources + leak * np.roll(sources, 1, axis=0)
        est = np.stack([_at_snr(e, noise[1000 * i:], 15 + 5 * i) for i, e in enumerate(est)])
        perm = all_perms[(3 * k + 1) % len(all_perms)]
        targets.append(sources)
        estimates.append(est[list(perm)])           # estimate j is target perm[j]
        perms.append(np.argsort(perm))              # estimate assigned to each target
    as_tensor = lambda x: torch.from_numpy(np.stack(x))
    return as_tensor(targets), as_tensor(estimates), torch.from_numpy(np.stack(perms))


def _speech_frames(folder) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and noisy real speech as ``[4, 400, 40]`` blocks (``[batch, time, features]``)."""
    clean = np.stack([_separation(folder, k)[0][:16000] for k in range(4)])
    noise = _read(folder / "noise" / "noise3.wav")
    noisy = np.stack([_at_snr(c, noise[4000 * i:], 5) for i, c in enumerate(clean)])
    shape = (4, 400, 40)
    return torch.from_numpy(noisy).reshape(shape), torch.from_numpy(clean).reshape(shape)


# ---------------------------------------------------------------- SpeechBrain in a subprocess ----

SPEECHBRAIN_SCRIPT = r"""
import sys, torch
from speechbrain.nnet import losses as L
inputs = torch.load(sys.argv[1])
out = {}
for dtype in ("float32", "float64"):
    for c in (2, 3):
        src, est = inputs[f"target{c}_{dtype}"], inputs[f"estimate{c}_{dtype}"]
        # SpeechBrain layout [B, T, C]; clones because cal_si_snr writes into its argument.
        out[f"pit{c}_{dtype}"] = L.get_si_snr_with_pitwrapper(src.transpose(1, 2).clone(),
                                                              est.transpose(1, 2).clone())
        # cal_si_snr takes [T, B, C]: every (example, source) pair, no permutation.
        out[f"cal{c}_{dtype}"] = -L.cal_si_snr(src.permute(2, 0, 1).clone(),
                                               est.permute(2, 0, 1).clone())[0]
    pred, tgt, length = inputs[f"pred_{dtype}"], inputs[f"tgt_{dtype}"], inputs[f"length_{dtype}"]
    for name, fn in (("mse", L.mse_loss), ("l1", L.l1_loss)):
        for reduction in ("mean", "batch", "batchmean", "none"):
            out[f"{name}_{reduction}_{dtype}"] = fn(pred, tgt, length=length, reduction=reduction)
            out[f"{name}_{reduction}_nolen_{dtype}"] = fn(pred, tgt, reduction=reduction)
        # A prediction two steps longer than its target: SpeechBrain truncates.
        out[f"{name}_trunc_{dtype}"] = fn(inputs[f"long_pred_{dtype}"], tgt, length=length)
torch.save(out, sys.argv[2])
"""


def _lengths(dtype):
    # k / 400 computed in `dtype`: for 107 and 213 (float32) and 218 (float64), length * 400 rounds
    # to just above k. In float64 SpeechBrain's -1e-6 then keeps step k out of the mask; in float32
    # the -1e-6 is below the rounding step there, so step k counts. Both quirks are matched.
    return torch.tensor([400.0, 107.0, 213.0, 218.0], dtype=dtype) / 400


@pytest.fixture(scope="module")
def inputs():
    """Inputs built from the real speech (the same for fbrain and the references)."""
    folder = speech_samples()
    if folder is None:
        pytest.skip("real speech samples not found: set FBRAIN_SAMPLES or put shared/ beside the repository")
    data = {}
    for c in (2, 3):
        target, estimate, perm = _real_separation_batch(folder, c)
        data[f"perm{c}"] = perm
        for dtype in DTYPES:
            name = str(dtype).split(".")[-1]
            data[f"target{c}_{name}"], data[f"estimate{c}_{name}"] = target.to(dtype), estimate.to(dtype)
    noisy, clean = _speech_frames(folder)
    for dtype in DTYPES:
        name = str(dtype).split(".")[-1]
        data[f"pred_{name}"], data[f"tgt_{name}"] = noisy.to(dtype), clean.to(dtype)
        data[f"length_{name}"] = _lengths(dtype)
        data[f"long_pred_{name}"] = torch.cat([noisy, noisy[:, :2]], dim=1).to(dtype)
    return data


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The inputs, and SpeechBrain's results on them (run in a subprocess)."""
    if not speechbrain_installed():
        pytest.skip(NO_SPEECHBRAIN)
    tmp = tmp_path_factory.mktemp("speechbrain")
    torch.save(inputs, tmp / "in.pt")
    subprocess.run([sys.executable, "-c", SPEECHBRAIN_SCRIPT, str(tmp / "in.pt"), str(tmp / "out.pt")],
                   check=True)
    return inputs, torch.load(tmp / "out.pt")


def _name(dtype):
    return str(dtype).split(".")[-1]


# ---------------------------------------------------------------- SI-SNR and PIT -----------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_sources", [2, 3])
def test_si_snr_matches_speechbrain_cal_si_snr(reference, dtype, num_sources):
    data, sb = reference
    d = _name(dtype)
    ours = si_snr(data[f"estimate{num_sources}_{d}"], data[f"target{num_sources}_{d}"])
    expected = sb[f"cal{num_sources}_{d}"]
    assert ours.dtype == dtype and ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=0, atol=PIT_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_sources", [2, 3])
def test_pitwrapper_matches_speechbrain(reference, dtype, num_sources):
    data, sb = reference
    d = _name(dtype)
    target, estimate = data[f"target{num_sources}_{d}"], data[f"estimate{num_sources}_{d}"]
    ours = get_si_snr_with_pitwrapper(target.transpose(1, 2), estimate.transpose(1, 2))
    expected = sb[f"pit{num_sources}_{d}"]
    assert ours.dtype == dtype and ours.shape == (4,)
    # Sanity: the estimates are good but not perfect (roughly 8-20 dB), so this is a real comparison.
    assert bool(((-expected > 5) & (-expected < 30)).all()), expected
    torch.testing.assert_close(ours, expected, rtol=0, atol=PIT_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_pitwrapper_perfect_estimate_matches_speechbrain_doc_example(dtype):
    # SpeechBrain's own example: a swapped perfect estimate scores 135.2284 dB (eps-limited).
    x = torch.arange(600, dtype=dtype).reshape(3, 100, 2)
    torch.testing.assert_close(get_si_snr_with_pitwrapper(x, x[:, :, (1, 0)]),
                               torch.full((3,), -135.2284, dtype=dtype), rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_sources", [2, 3])
def test_pit_matches_torchmetrics_and_finds_the_permutation(inputs, dtype, num_sources):
    from torchmetrics.functional.audio import (permutation_invariant_training,
                                               scale_invariant_signal_noise_ratio)
    data = inputs
    d = _name(dtype)
    target, estimate = data[f"target{num_sources}_{d}"], data[f"estimate{num_sources}_{d}"]
    loss, perm = pit(pairwise_neg_si_snr, estimate, target)
    tm_best, tm_perm = permutation_invariant_training(
        estimate, target, scale_invariant_signal_noise_ratio, mode="speaker-wise", eval_func="max")
    # torchmetrics uses eps = machine epsilon, SpeechBrain's formula 1e-8: tiny differences.
    torch.testing.assert_close(-loss, tm_best, rtol=0, atol={torch.float32: 1e-4, torch.float64: 1e-7}[dtype])
    assert torch.equal(perm, tm_perm)
    assert torch.equal(perm, data[f"perm{num_sources}"])
    # The permutations differ across the batch, so a batch-wide choice would fail here.
    assert len({tuple(p) for p in perm.tolist()}) > 1
    torch.testing.assert_close(reorder_sources(estimate, perm)[:, :, :100],
                               torch.stack([estimate[b, perm[b]] for b in range(4)])[:, :, :100])


def test_pit_three_sources_every_permutation():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(6, 3, 1000, generator=g, dtype=torch.float64)
    table = list(itertools.permutations(range(3)))
    estimate = torch.stack([target[b, list(p)] for b, p in enumerate(table)])
    estimate = estimate + 0.3 * torch.randn(estimate.shape, generator=g, dtype=torch.float64)
    loss, perm = pit(pairwise_neg_si_snr, estimate, target)
    for b, p in enumerate(table):
        # estimate j holds target p[j]; the assignment must send each target to that estimate.
        assert [p[j] for j in perm[b].tolist()] == [0, 1, 2]
    aligned = reorder_sources(estimate, perm)
    torch.testing.assert_close(loss, -si_snr(aligned, target).mean(dim=1))
    # And it really is the minimum over all assignments.
    for b in range(6):
        best = min(-si_snr(estimate[b, list(p)], target[b]).mean() for p in table)
        torch.testing.assert_close(loss[b], best)


def test_si_snr_improvement_on_real_mixtures(samples):
    s1, s2, mix = (torch.from_numpy(x[:SEGMENT]) for x in _separation(samples, 0))
    targets = torch.stack([s1, s2])[None]
    mixture = mix[None, None]
    # The mixture itself improves nothing; the clean sources improve by exactly -SI-SNR(mixture).
    torch.testing.assert_close(si_snr_improvement(mixture.expand_as(targets), targets, mixture),
                               torch.zeros(1, 2, dtype=torch.float64))
    improvement = si_snr_improvement(targets + 1e-3 * targets.roll(1, dims=1), targets, mixture)
    assert bool((improvement > 20).all()), improvement
    torch.testing.assert_close(improvement, si_snr(targets + 1e-3 * targets.roll(1, dims=1), targets)
                               - si_snr(mixture, targets))


# ---------------------------------------------------------------- masked MSE / L1 ----------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["mse", "l1"])
@pytest.mark.parametrize("reduction", ["mean", "batch", "batchmean", "none"])
def test_masked_losses_match_speechbrain(reference, dtype, name, reduction):
    data, sb = reference
    d = _name(dtype)
    fn = {"mse": mse_loss, "l1": l1_loss}[name]
    pred, tgt, length = data[f"pred_{d}"], data[f"tgt_{d}"], data[f"length_{d}"]
    tol = {torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    for suffix, kwargs in (("", {"length": length}), ("_nolen", {})):
        ours = fn(pred, tgt, reduction=reduction, **kwargs)
        expected = sb[f"{name}_{reduction}{suffix}_{d}"]
        assert ours.shape == expected.shape and ours.dtype == dtype
        torch.testing.assert_close(ours, expected, rtol=tol, atol=tol)
    if reduction == "none":  # padding is zero, real steps carry the loss
        masked = fn(pred, tgt, length=length, reduction="none")
        assert bool((masked[1, 108:] == 0).all()) and bool((masked[1, :107] != 0).any())
    if reduction == "mean":
        torch.testing.assert_close(fn(data[f"long_pred_{d}"], tgt, length=length), sb[f"{name}_trunc_{d}"],
                                   rtol=tol, atol=tol)


def test_masked_loss_padding_gets_no_gradient():
    pred = torch.randn(2, 10, 3, dtype=torch.float64)
    tgt = torch.randn(2, 10, 3, dtype=torch.float64)
    g = grad(lambda p: mse_loss(p, tgt, length=torch.tensor([1.0, 0.4], dtype=torch.float64)))(pred)
    assert bool((g[1, 4:] == 0).all()) and bool((g[1, :4] != 0).all()) and bool((g[0] != 0).all())
    # mean over the 10*3 + 4*3 real elements
    torch.testing.assert_close(g[0], 2 * (pred[0] - tgt[0]) / 42)


# ---------------------------------------------------------------- STOI ---------------------------

def _noisy_versions(folder):
    """Clean utterance repeated, and noisy versions at several SNRs with two real noises."""
    clean = _separation(folder, 0)[0]
    noisy = [_at_snr(clean, _read(folder / "noise" / f"noise{n}.wav"), snr) for n in (1, 4) for snr in SNRS_DB]
    return np.stack([clean] * len(noisy)), np.stack(noisy)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stoi_matches_pystoi_on_noisy_speech(samples, dtype):
    from pystoi import stoi as pystoi
    clean, noisy = _noisy_versions(samples)
    expected = np.array([pystoi(c, n, 16000) for c, n in zip(clean, noisy)])
    ours = stoi(torch.from_numpy(noisy).to(dtype), torch.from_numpy(clean).to(dtype), 16000)
    assert ours.dtype == dtype and ours.shape == (len(noisy),)
    # The SNRs span the useful range of STOI: the comparison covers low and high scores.
    assert expected.min() < 0.5 and expected.max() > 0.8
    # 1e-3 is what an STOI port is usually held to; every step here follows pystoi, so far tighter holds.
    assert np.abs(ours.numpy() - expected).max() < {torch.float32: 1e-4, torch.float64: 1e-10}[dtype]


def test_stoi_matches_pystoi_on_separation_mixtures_with_silence(samples):
    """Mixtures against each source, with quiet noise before the speech and digital silence after
    it, so that pystoi's silent-frame removal drops different numbers of frames per example. The
    quiet parts sit 30 to 65 dB below the loudest frame: some are kept, most are dropped."""
    from pystoi import stoi as pystoi
    rng = np.random.default_rng(1)
    refs, ests = [], []
    for k in range(4):
        s1, s2, mix = _separation(samples, k)
        for i, src in enumerate((s1, s2)):
            loudest = np.sqrt((src[: len(src) // 256 * 256].reshape(-1, 256) ** 2).mean(axis=1)).max()
            level = loudest * 10 ** (-(30 + 5 * (2 * k + i)) / 20)
            pad_front, pad_back, length = 4000 * (k + 1), 3000 * (2 - k % 2), 64000
            ref = np.concatenate([level * rng.standard_normal(pad_front), src])[:length]
            est = np.concatenate([level * rng.standard_normal(pad_front), mix])[:length]
            ref[length - pad_back:] = 0.0
            refs.append(ref)
            ests.append(est)
    refs, ests = np.stack(refs), np.stack(ests)
    expected = np.array([pystoi(r, e, 16000) for r, e in zip(refs, ests)])
    ours = stoi(torch.from_numpy(ests), torch.from_numpy(refs), 16000).numpy()
    assert np.abs(ours - expected).max() < 1e-10
    # The same clean utterance always scores 1.
    torch.testing.assert_close(stoi(torch.from_numpy(refs), torch.from_numpy(refs), 16000),
                               torch.ones(len(refs), dtype=torch.float64))


def test_resampler_matches_pystoi(samples):
    from pystoi.utils import resample_oct
    from fbrain.losses.resample import resample_poly_octave
    speech = _separation(samples, 3)[0]
    for rate, length in ((16000, 48000), (16000, 48007), (8000, 24001), (44100, 44100), (10000, 500)):
        expected = resample_oct(speech[:length], 10000, rate)
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            ours = resample_poly_octave(torch.from_numpy(speech[:length]).to(dtype), rate, 10000)
            assert ours.shape == expected.shape and ours.dtype == dtype
            assert np.abs(ours.double().numpy() - expected).max() < tol, (rate, length, dtype)


def test_stoi_at_10khz_and_leading_axes(samples):
    from pystoi import stoi as pystoi
    clean, noisy = _noisy_versions(samples)
    clean, noisy = clean[:4, :40000], noisy[:4, :40000]
    expected = np.array([pystoi(c, n, 10000) for c, n in zip(clean, noisy)]).reshape(2, 2)
    ours = stoi(torch.from_numpy(noisy).reshape(2, 2, -1), torch.from_numpy(clean).reshape(2, 2, -1), 10000)
    assert ours.shape == (2, 2)
    assert np.abs(ours.numpy() - expected).max() < 1e-10


def test_stoi_too_few_frames_scores_like_pystoi(samples):
    from pystoi import stoi as pystoi
    speech = _separation(samples, 1)[0]
    burst = np.zeros(16000)
    burst[6000:9000] = speech[20000:23000]  # 0.19 s of speech in 1 s of silence: < 30 frames survive
    short = speech[:4000]                   # 0.25 s: < 30 frames to begin with
    with pytest.warns(RuntimeWarning):
        expected = [pystoi(burst, burst + 0.01, 16000), pystoi(short, short + 0.01, 16000)]
    assert expected == [1e-5, 1e-5]
    assert float(stoi(torch.from_numpy(burst + 0.01), torch.from_numpy(burst), 16000)) == 1e-5
    assert float(stoi(torch.from_numpy(short + 0.01), torch.from_numpy(short), 16000)) == 1e-5


def test_stoi_gradient_matches_finite_differences(samples):
    clean = torch.from_numpy(_separation(samples, 2)[0][20000:44000])
    noisy = torch.from_numpy(_at_snr(clean.numpy(), _read(samples / "noise" / "noise5.wav"), 0))
    g = grad(lambda y: stoi(y, clean, 16000))(noisy)
    assert bool(torch.isfinite(g).all()) and float(g.abs().max()) > 0
    direction = torch.randn(noisy.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = 1e-6
    numeric = (stoi(noisy + h * direction, clean, 16000) - stoi(noisy - h * direction, clean, 16000)) / (2 * h)
    torch.testing.assert_close((g * direction).sum(), numeric, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- torch.func, purity -------------

def test_gradients_flow_under_torch_func(inputs):
    data = inputs
    target, estimate = data["target3_float64"][:, :, :8000], data["estimate3_float64"][:, :, :8000]
    for fn in (lambda e: pit(pairwise_neg_si_snr, e, target)[0].mean(),
               lambda e: get_si_snr_with_pitwrapper(target.transpose(1, 2), e.transpose(1, 2)).mean(),
               lambda e: -si_snr_improvement(e, target, target.sum(1, keepdim=True)).mean(),
               lambda e: l1_loss(e.transpose(1, 2), target.transpose(1, 2), length=data["length_float64"])):
        g = grad(fn)(estimate)
        assert g.shape == estimate.shape and bool(torch.isfinite(g).all()) and float(g.abs().max()) > 0
    # The PIT gradient equals the gradient of the loss with the best assignment fixed.
    _, perm = pit(pairwise_neg_si_snr, estimate, target)
    fixed = grad(lambda e: -si_snr(reorder_sources(e, perm), target).mean(dim=1).mean())(estimate)
    torch.testing.assert_close(grad(lambda e: pit(pairwise_neg_si_snr, e, target)[0].mean())(estimate), fixed)


def test_vmap_per_example(inputs):
    data = inputs
    target, estimate = data["target3_float32"][:, :, :8000], data["estimate3_float32"][:, :, :8000]

    def example_loss(e, t):  # one example, no batch axis
        return pit(pairwise_neg_si_snr, e[None], t[None])[0][0]

    per_example = vmap(example_loss)(estimate, target)
    torch.testing.assert_close(per_example, pit(pairwise_neg_si_snr, estimate, target)[0])
    per_example_grads = vmap(grad(example_loss))(estimate, target)
    looped = torch.stack([grad(example_loss)(estimate[b], target[b]) for b in range(4)])
    torch.testing.assert_close(per_example_grads, looped)
    torch.testing.assert_close(vmap(si_snr)(estimate, target), si_snr(estimate, target))
    # STOI per example, and its per-example gradients.
    clean, noisy = target[:, 0, :].double(), estimate[:, 0, :].double()
    clean = torch.cat([clean, clean], dim=-1)  # 1 s: enough frames for STOI segments
    noisy = torch.cat([noisy, noisy], dim=-1)
    torch.testing.assert_close(vmap(lambda y, x: stoi(y, x, 16000))(noisy, clean), stoi(noisy, clean, 16000))
    vg = vmap(grad(lambda y, x: stoi(y, x, 16000)))(noisy, clean)
    torch.testing.assert_close(vg, grad(lambda y: stoi(y, clean, 16000).sum())(noisy))
    # Masked MSE per example via a batch of one.
    pred, tgt = data["pred_float64"], data["tgt_float64"]
    length = data["length_float64"]
    per = vmap(lambda p, t, n: mse_loss(p[None], t[None], length=n[None]))(pred, tgt, length)
    torch.testing.assert_close(per, mse_loss(pred, tgt, length=length, reduction="batch"))


def test_inputs_are_not_modified(inputs):
    data = inputs
    target, estimate = data["target2_float32"], data["estimate2_float32"]
    source_btc, estimate_btc = target.transpose(1, 2), estimate.transpose(1, 2)
    pred, tgt, length = data["pred_float32"], data["tgt_float32"], data["length_float32"]
    inputs = [target, estimate, pred, tgt, length]
    before = [x.clone() for x in inputs]
    versions = [x._version for x in inputs]
    get_si_snr_with_pitwrapper(source_btc, estimate_btc)
    pit(pairwise_neg_si_snr, estimate, target)
    si_snr_improvement(estimate, target, target.sum(1, keepdim=True))
    for fn in (mse_loss, l1_loss):
        for reduction in ("mean", "batch", "batchmean", "none"):
            fn(pred, tgt, length=length, reduction=reduction)
    stoi(estimate[:, 0], target[:, 0], 16000)
    for x, b, v in zip(inputs, before, versions):
        assert bitwise_equal(x, b) and x._version == v  # not even an in-place write of equal values


# ---------------------------------------------------------------- errors -------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: si_snr(torch.zeros(2, 100), torch.zeros(2, 99)), r"same number of samples.*\(2, 100\).*\(2, 99\)"),
    (lambda: si_snr(torch.zeros(3, 100), torch.zeros(2, 100)), r"do not broadcast"),
    (lambda: si_snr_improvement(torch.zeros(2, 2, 10), torch.zeros(2, 2, 10), torch.zeros(2, 3, 10)),
     r"mixture \(2, 3, 10\) and target \(2, 2, 10\) do not broadcast"),
    (lambda: pit(pairwise_neg_si_snr, torch.zeros(2, 3, 10), torch.zeros(2, 2, 10)),
     r"estimate and target must have the same shape, got \(2, 3, 10\) and \(2, 2, 10\)"),
    (lambda: pit(lambda e, t: torch.zeros(2, 3), torch.zeros(2, 3, 10), torch.zeros(2, 3, 10)),
     r"pairwise_loss must return shape \(2, 3, 3\).*got \(2, 3\)"),
    (lambda: reorder_sources(torch.zeros(2, 3, 10), torch.zeros(2, 2, dtype=torch.long)),
     r"perm must have shape \[batch, sources\] = \(2, 3\), got \(2, 2\)"),
    (lambda: get_si_snr_with_pitwrapper(torch.zeros(2, 100, 2), torch.zeros(2, 2, 100)),
     r"\[batch, time, sources\], got \(2, 100, 2\) and \(2, 2, 100\)"),
    (lambda: mse_loss(torch.zeros(2, 10), torch.zeros(2, 20)), r"allowed_len_diff=3.*\(2, 10\) and \(2, 20\)"),
    (lambda: mse_loss(torch.zeros(2, 10, 4), torch.zeros(2, 10, 5)), r"same shape after truncation"),
    (lambda: l1_loss(torch.zeros(2, 10), torch.zeros(2, 10), length=torch.ones(3)),
     r"length must have shape \[batch\] = \(2,\).*got \(3,\)"),
    (lambda: l1_loss(torch.zeros(2, 10), torch.zeros(2, 10), reduction="sum"), r"reduction must be one of"),
    (lambda: stoi(torch.zeros(2, 16000), torch.zeros(16000), 16000),
     r"same shape \[\.\.\., time\], got \(2, 16000\) and \(16000,\)"),
    (lambda: stoi(torch.zeros(16000), torch.zeros(16000), 0), r"sample rates must be positive"),
])
def test_bad_arguments_give_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------- docstring examples -------------

# pytest's testpaths do not include losses/, so the examples in the docstrings are checked here.
@pytest.mark.parametrize("module", ["masked", "pit", "pit_si_snr", "resample", "si_snr", "stoi"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(f"fbrain.losses.{module}"), verbose=False)
    assert result.failed == 0
    assert result.attempted > 0, f"{module} has no examples"
