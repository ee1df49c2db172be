"""Audio files, manifests and augmentation on the shared real speech."""

from __future__ import annotations

import pytest
import torch

from fbrain import audio
from fbrain.manifest import ManifestDataset, ManifestError, load_manifest


def test_read_and_write_round_trip(samples, tmp_path):
    wav, rate = audio.read_audio(samples / "single-mic" / "example1.wav")
    assert rate == 16000 and wav.ndim == 1 and wav.dtype == torch.float32 and wav.abs().max() > 0.01
    audio.write_audio(tmp_path / "copy.wav", wav, rate)
    back, rate2 = audio.read_audio(tmp_path / "copy.wav")
    assert rate2 == rate and torch.equal(back, wav)


def test_missing_and_broken_audio_are_named(tmp_path):
    with pytest.raises(audio.AudioFileError, match="nope.wav: audio file not found"):
        audio.read_audio(tmp_path / "nope.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(audio.AudioFileError, match="bad.wav: cannot read audio"):
        audio.read_audio(bad)


def test_shared_manifests_load_with_placeholders(samples):
    folder = samples / "annotation"
    sep = load_manifest(folder / "separation_train.csv", {"data_root": str(samples / "separation")})
    first = next(iter(sep.values()))
    assert first["mix_wav"].startswith(str(samples / "separation")) and isinstance(first["duration"], float)
    enh = load_manifest(folder / "enhance_train.json", {"data_root": str(samples / "separation")})
    assert all(row["clean_wav"].endswith(".wav") and "{" not in row["clean_wav"] for row in enh.values())
    with pytest.raises(ManifestError, match=r"placeholder '\$data_root' has no replacement"):
        load_manifest(folder / "separation_train.csv", {})


def test_manifest_dataset_reads_audio_and_names_a_bad_row(samples, tmp_path):
    rows = load_manifest(samples / "annotation" / "separation_train.csv", {"data_root": str(samples / "separation")})
    items = {"mix": lambda row: audio.read_audio(row["mix_wav"])[0]}
    ds = ManifestDataset(rows, items, ["id", "mix"], name="separation_train.csv")
    example = ds[0]
    assert example["mix"].ndim == 1 and example["id"] in rows
    rows["broken"] = {**rows[example["id"]], "mix_wav": str(tmp_path / "gone.wav")}
    broken = ManifestDataset(rows, items, ["id", "mix"], name="separation_train.csv")
    with pytest.raises(ManifestError, match=r"separation_train.csv, row 'broken', item 'mix': .*gone.wav"):
        broken[len(broken) - 1]
    assert [ds.rows[i]["duration"] for i in ds.sorted_by("duration").ids] == sorted(r["duration"] for r in ds.rows.values())


def test_manifest_errors_are_named(tmp_path):
    (tmp_path / "no_id.csv").write_text("name, wav\nx, a.wav\n")
    with pytest.raises(ManifestError, match="needs an 'ID' column"):
        load_manifest(tmp_path / "no_id.csv")
    (tmp_path / "dup.csv").write_text("ID, wav\nx, a.wav\nx, b.wav\n")
    with pytest.raises(ManifestError, match="line 3: duplicate ID 'x'"):
        load_manifest(tmp_path / "dup.csv")
    with pytest.raises(ManifestError, match=r"output_keys \['sig'\]"):
        ManifestDataset({"a": {"wav": "x"}}, {}, ["id", "sig"])


def speech(samples, n=2, length=16000):
    wavs = [audio.read_audio(samples / "ASR" / f"spk1_snt{i + 1}.wav")[0][:length] for i in range(n)]
    return torch.stack(wavs)


def noises(samples):
    return [audio.read_audio(samples / "noise" / f"noise{i}.wav")[0] for i in (1, 2, 3)]


def test_add_noise_hits_the_requested_snr_and_is_reproducible(samples):
    clean = speech(samples)
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    noisy = audio.add_noise(clean, noises(samples), snr_db=(5.0, 5.0), generator=torch.Generator().manual_seed(1))
    again = audio.add_noise(clean, noises(samples), snr_db=(5.0, 5.0), generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global generator was not used
    added = noisy - clean
    snr = 10 * torch.log10(clean.pow(2).sum(-1) / added.pow(2).sum(-1))
    assert torch.allclose(snr, torch.full_like(snr, 5.0), atol=1e-3)


def test_reverberation_and_speed_perturbation(samples):
    clean = speech(samples)
    rirs = [audio.read_audio(samples / "RIRs" / f"rir{i}.wav")[0] for i in (1, 2)]
    g = torch.Generator().manual_seed(0)
    wet = audio.reverberate(clean, rirs, g)
    assert wet.shape == clean.shape and not torch.allclose(wet, clean)
    fast = audio.speed_perturb(clean, 16000, [1.1], g)
    assert fast.shape == clean.shape
    assert float(fast[:, -500:].abs().max()) == 0.0  # 10% faster leaves the tail empty
