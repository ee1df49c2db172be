"""SpeechBrain's own, unmodified training scripts run twice: with speechbrain.Brain and with fbrain.Brain.

Each script (the enhancement and speaker-id templates, the LibriMix SepFormer recipe) runs in a
subprocess through tests/scripts/speechbrain_script.py, which swaps only the Brain class. Everything
else is the script's: its YAML (shrunk and pointed at the real speech in shared/ by command-line
overrides alone), data pipeline, augmentation, metrics, FileTrainLogger, Checkpointer, schedulers and
its own ``fit_batch`` where it has one. Every number in the two train_log.txt files (each epoch's fp32
train and valid stats, then the test stats of the checkpoint ``evaluate(min_key/max_key=...)`` picks)
must agree to 1e-5. Both runs are then started again in their folders with one more epoch: fbrain's
must resume from its checkpoint, not restart, end with the test stats of the best checkpoint, and log
what SpeechBrain's resumed run logs.

The manifests are written into tmp_path, so the scripts' prepare steps skip and nothing is
downloaded (the templates' ``prepare_noise_data`` finds its archive, an empty placeholder, and the
noise CSV already there).

Randomness: fbrain's Brain runs each step's random ops on its own key (seeded from the YAML's
``seed``), never on the global generator, which SpeechBrain's Brain also draws from (each DataLoader
iterator takes a seed from it). So the same seed gives different augmentation draws, and the overrides
reduce each random augmentation to one choice (what no override reaches is noted at its test).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest
import soundfile
import torch

from conftest import REPO, speech_samples

pytestmark = pytest.mark.speechbrain

SB_ROOT = REPO.parent / "shared" / "speechbrain-v1.1.0"
RUNNER = REPO / "tests" / "scripts" / "speechbrain_script.py"
RTOL = 1e-5
TIMEOUT = 900


@pytest.fixture
def sources():
    samples = speech_samples()
    if samples is None or not SB_ROOT.is_dir():
        pytest.skip(f"SpeechBrain's scripts ({SB_ROOT}) or the speech samples (shared/data/speech-samples) are "
                    "not there: put shared/ beside the repository")
    return samples


def run(brain: str, script: str, hparams: str, overrides: list[str], env: dict | None = None) -> None:
    """Runs SCRIPT with HPARAMS under BRAIN ("speechbrain" or "fbrain"), asserting it succeeded."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(RUNNER), brain, str(SB_ROOT / script), str(SB_ROOT / hparams),
                           "--device=cpu", "--noprogressbar", *overrides],
                          capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, **(env or {})})
    epochs = [arg for arg in overrides if "epochs=" in arg.lower()]
    print(f"{brain} {script} {' '.join(epochs)}: {time.perf_counter() - start:.1f} s")
    assert done.returncode == 0, f"{brain} {script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def train_log(folder) -> list[dict]:
    """The lines of a FileTrainLogger's file: [{"meta": {"Epoch": "1", ..}, "train": {"loss": 1.5}, "valid": ..}]."""
    lines = []
    for line in (folder / "train_log.txt").read_text().splitlines():
        meta, *parts = line.split(" - ")
        entry = {"meta": dict(item.split(": ", 1) for item in meta.split(", "))}
        for part in parts:
            stage = part.split(" ", 1)[0]
            entry[stage] = {k.split(" ", 1)[1]: float(v) for k, v in (item.split(": ", 1) for item in part.split(", "))}
        lines.append(entry)
    return lines


def compare(reference: list[dict], ours: list[dict]) -> list[float]:
    """Each line's largest relative difference over all its stats, asserted to be within RTOL."""
    assert len(reference) == len(ours) and all(a.keys() == b.keys() for a, b in zip(reference, ours)), (reference, ours)
    worst = []
    for ref, got in zip(reference, ours):
        assert ref["meta"] == got["meta"], (ref, got)  # the epoch (or the epoch loaded) and the lr
        worst.append(max(abs(ref[stage][k] - got[stage][k]) / max(abs(ref[stage][k]), 1e-12)
                         for stage in ref if stage != "meta" for k in ref[stage]))
    print("  max relative difference per line (epochs, then test):", ", ".join(f"{d:.1e}" for d in worst))
    assert max(worst) <= RTOL, (worst, reference, ours)
    return worst


def best_epoch(lines: list[dict], key: str, lower_is_better: bool) -> int:
    """The epoch whose checkpoint evaluate(min_key/max_key=KEY) loads: the best valid KEY, the newest on ties."""
    scored = [(line["valid"][key], int(next(iter(line["meta"].values())))) for line in lines if "valid" in line]
    sign = 1 if lower_is_better else -1
    return min(scored, key=lambda score_epoch: (sign * score_epoch[0], -score_epoch[1]))[1]


def both_ways_then_resume(tmp_path, script, hparams, overrides, epochs, best, env=None, prepare=None) -> None:
    """Runs SCRIPT with each Brain for EPOCHS epochs and compares their logs, then runs each again for
    EPOCHS + 1 in its folder and compares again. BEST: (valid key, lower_is_better) of its evaluate()."""
    folders = {brain: tmp_path / brain for brain in ("speechbrain", "fbrain")}
    for brain, folder in folders.items():
        if prepare:
            prepare(folder)
        run(brain, script, hparams, [f"--output_folder={folder}", *overrides(epochs)], env)
    reference, ours = train_log(folders["speechbrain"]), train_log(folders["fbrain"])
    assert len(reference) == epochs + 1 and "test" in reference[-1], reference
    assert reference[-1]["meta"] == {"Epoch loaded": str(best_epoch(reference, *best))}, reference  # the helper's rule
    compare(reference, ours)

    # Resumed from the last checkpoint: one more epoch (epoch 1 again would mean a restart), then
    # evaluate() on the best checkpoint, each number as in SpeechBrain's resumed run.
    for brain, folder in folders.items():
        run(brain, script, hparams, [f"--output_folder={folder}", *overrides(epochs + 1)], env)
    resumed = train_log(folders["fbrain"])
    assert resumed[:epochs + 1] == ours, resumed  # the first run's lines are kept
    new_epoch, test = resumed[epochs + 1:]
    assert next(iter(new_epoch["meta"].values())) == str(epochs + 1) and "train" in new_epoch, resumed
    assert "test" in test and test["meta"] == {"Epoch loaded": str(best_epoch(resumed, *best))}, resumed
    compare(train_log(folders["speechbrain"])[epochs + 1:], resumed[epochs + 1:])


# ---- the templates: JSON manifests over ASR/ (2 speakers), the noise files for AddNoise

TRAIN = [f"spk{s}_snt{i}" for s in (1, 2) for i in (1, 2, 3, 4)]
VALID = ["spk1_snt5", "spk2_snt5"]
TEST = ["spk1_snt6", "spk2_snt6"]


def template_manifests(samples, folder, **fields) -> list[str]:
    """train/valid/test.json as mini_librispeech_prepare writes them: wav (under the script's {data_root}),
    length, and FIELDS (name -> value), e.g. spk_id."""
    args = [f"--data_folder={samples / 'ASR'}"]
    for split, names in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        rows = {}
        for name in names:
            info = soundfile.info(samples / "ASR" / f"{name}.wav")
            rows[name] = {"wav": f"{{data_root}}/{name}.wav", "length": info.frames / info.samplerate,
                          **{key: make(name) for key, make in fields.items()}}
        (folder / f"{split}.json").write_text(json.dumps(rows, indent=1))
        args.append(f"--{split}_annotation={folder / f'{split}.json'}")
    return args


def noise_data(samples, folder) -> list[str]:
    """The noise CSV AddNoise reads, and in the noise folder the archive prepare_noise_data would
    download (an empty placeholder): finding both, it neither downloads nor writes anything."""
    (folder / "noise").mkdir()
    (folder / "noise" / "data.zip").write_bytes(b"")
    with open(folder / "noise.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "duration", "wav", "wav_format", "wav_opts"])
        for wav in sorted((samples / "noise").glob("*.wav")):
            info = soundfile.info(wav)
            writer.writerow([wav.stem, info.frames / info.samplerate, str(wav), "wav", ""])
    return [f"--data_folder_noise={folder / 'noise'}", f"--noise_annotation={folder / 'noise.csv'}"]


# AddNoise draws the SNR, the order of the noise files and where in them to start: one SNR, the CSV's
# order, each from its start.
FIXED_NOISE = ["--snr_low=5", "--snr_high=5", "--add_noise={sorting: original, start_index: 0}"]


def template_overrides(samples, tmp_path, epochs_key, **fields):
    data = tmp_path / "data"
    data.mkdir()
    common = [*template_manifests(samples, data, **fields), *noise_data(samples, data), *FIXED_NOISE,
              "--num_workers=0", "--batch_size=4", "--train_logger={precision: 10}"]
    return lambda epochs: [*common, f"--{epochs_key}={epochs}"]


def test_enhancement_template(sources, tmp_path):
    both_ways_then_resume(tmp_path, "templates/enhancement/train.py", "templates/enhancement/train.yaml",
                          template_overrides(sources, tmp_path, "number_of_epochs"), 2, ("stoi", False))


def test_enhancement_template_ported_by_changing_its_import_to_import_fbrain_as_sb(sources, tmp_path):
    # The README's claim as written: the template's `import speechbrain as sb` read as `import fbrain as sb`
    # (sb.dataio, sb.utils.data_pipeline, sb.nnet.losses, sb.processing.features ... then resolve through
    # fbrain: SpeechBrain's objects, or fbrain's own where it has one, MetricStats included).
    overrides = template_overrides(sources, tmp_path, "number_of_epochs")
    for brain in ("speechbrain", "import-fbrain"):
        run(brain, "templates/enhancement/train.py", "templates/enhancement/train.yaml",
            [f"--output_folder={tmp_path / brain}", *overrides(2)])
    compare(train_log(tmp_path / "speechbrain"), train_log(tmp_path / "import-fbrain"))


# The speaker-id template's other augmentations, each reduced to one choice: speed 105 %, one notch at
# 0.3 of Nyquist, one 1000-sample chunk dropped at sample 8000.
FIXED_AUGMENTATION = ["--speed_changes=[105]", "--drop_freq_low=0.3", "--drop_freq_high=0.3",
                      "--drop_freq_count_high=1", "--drop_chunk_count_high=1", "--drop_chunk_length_high=1000",
                      "--drop_chunk={drop_start: 8000, drop_end: 9000}"]


def label_encoder(folder) -> None:
    """The template expects 28 speakers (expect_len(28)), the samples have 2: its label_encoder.txt, in the
    save folder where load_or_create finds it, lists those 2 and 26 speakers without utterances."""
    (folder / "save").mkdir(parents=True)
    labels = ["spk1", "spk2", *(f"absent{i}" for i in range(26))]
    (folder / "save" / "label_encoder.txt").write_text(
        "".join(f"'{label}' => {i}\n" for i, label in enumerate(labels)) + "================\n'starting_index' => 0\n")


def test_speaker_id_template(sources, tmp_path):
    # Its Xvector's StatisticsPooling adds Gaussian noise (1e-5 to 9e-5) to the pooled means, drawn from
    # the global generator in train and eval (fbrain's Brain gives it the state's key): no override
    # reaches it, so the runner makes it one constant in both runs.
    overrides = template_overrides(sources, tmp_path, "number_of_epochs", spk_id=lambda name: name.split("_")[0])
    both_ways_then_resume(tmp_path, "templates/speaker_id/train.py", "templates/speaker_id/train.yaml",
                          lambda epochs: [*overrides(epochs), *FIXED_AUGMENTATION], 3, ("error", True),
                          # with `feats_cache_dir` in its YAML (as it is) it caches features in HDF5 on "cuda"
                          env={"SPEECHBRAIN_SCRIPT_DROP": "feats_cache_dir", "SPEECHBRAIN_SCRIPT_CONSTANT_POOLING_NOISE": "1"},
                          prepare=label_encoder)


# ---- the LibriMix SepFormer recipe: Libri2Mix CSVs over separation/ (its own fit_batch)

def librimix_manifests(samples, folder) -> list[str]:
    """Libri2Mix CSVs, as the recipe's prepare_librimix writes them, over the two-speaker mixtures."""
    columns = ["ID", "duration"] + [f"{s}_wav{x}" for s in ("mix", "s1", "s2") for x in ("", "_format", "_opts")]
    args = [f"--data_folder={samples / 'separation'}", "--skip_prep=True"]
    for split, ids in (("train", [0, 1]), ("valid", [2]), ("test", [3])):
        with open(folder / f"libri2mix_{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for i in ids:
                files = [f"$data_root/{name}_{i}.wav" for name in ("mixture", "source1", "source2")]
                writer.writerow([i, 1.0, *(x for file in files for x in (file, "wav", ""))])
        args.append(f"--{split}_data={folder / f'libri2mix_{split}.csv'}")
    return args


def librimix_prepare_data() -> dict:
    """The recipe imports prepare_data from its folder, where SpeechBrain's repository has a symlink to
    ../prepare_data.py; shared/'s copy keeps that link as a text file (``../prepare_data.py``, not
    Python). So the folder the link points to goes first on sys.path: the recipe imports SpeechBrain's
    own recipes/LibriMix/prepare_data.py, the link's target, whichever way the link is stored."""
    target = SB_ROOT / "recipes" / "LibriMix" / "prepare_data.py"
    if not target.is_file():
        pytest.skip(f"SpeechBrain's {target} (the target of the LibriMix separation folder's prepare_data.py "
                    "link) is not there: put shared/ (with speechbrain-v1.1.0's recipes) beside the repository")
    return {"SPEECHBRAIN_SCRIPT_SHIMS": str(target.parent)}


# One dual-path block of one intra and one inter transformer layer, 16 channels, 100-frame chunks, in
# place of 2 x 8 layers of 256: the recipe's code paths, at a size that trains in seconds. Speed
# perturbation at one speed (95 %); whole mixtures (cutting segments would start at random places).
SMALL_SEPFORMER = ["--N_encoder_out=16", "--out_channels=16", "--d_ffn=32", "--SBtfintra={num_layers: 1, nhead: 2}",
                   "--SBtfinter={num_layers: 1, nhead: 2}", "--MaskNet={num_layers: 1, K: 100}",
                   "--speed_changes=[95]", "--limit_training_signal_len=False"]


def test_librimix_sepformer_recipe(sources, tmp_path):
    env = librimix_prepare_data()
    data = tmp_path / "data"
    data.mkdir()
    # pretrained_separator would fetch SepFormer-WSJ0-2mix from a model hub: it "pretrains" from an empty
    # state dict instead (a non-strict load that changes nothing).
    empty = data / "empty.ckpt"
    torch.save({}, empty)
    pretrained = "--pretrained_separator={paths: {encoder: %s, decoder: %s, masknet: %s}}" % ((empty,) * 3)
    common = [*librimix_manifests(sources, data), *SMALL_SEPFORMER, pretrained, "--precision=fp32",
              "--train_logger={precision: 10}"]
    both_ways_then_resume(tmp_path, "recipes/LibriMix/separation/train.py",
                          "recipes/LibriMix/separation/hparams/sepformer-libri2mix.yaml",
                          lambda epochs: [*common, f"--N_epochs={epochs}"], 2, ("si-snr", True),
                          env=env)
    with open(tmp_path / "fbrain" / "test_results.csv") as f:  # save_results' SDR (mir_eval), after evaluate()
        assert [row["snt_id"] for row in csv.DictReader(f)] == ["3", "avg"]
