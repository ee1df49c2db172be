"""Speech enhancement by spectral masking: SpeechBrain's enhancement template (``SEBrain``) on fbrain.

    python -m fbrain.recipes.enhancement [enhancement.yaml] [--data_folder PATH] [--device cpu] [--lr 0.0005 ...]

``log1p(|STFT|)`` features of noisy speech go through a BiLSTM masker (2.04 M parameters); the
masked spectrum is trained towards the clean one with MSE over the real frames (relative lengths);
validation also resynthesises audio with the noisy phase and scores it with STOI, and the
checkpoint with the best STOI is kept (``save_and_keep_only(max_keys=["stoi"])``).

Noise augmentation happens in the data pipeline: each training example is a random crop of a clean
utterance plus a random segment of a noise recording at a random SNR, all drawn from a generator
seeded by (seed, epoch, example), so a resumed run sees the data a straight run would and the pure
train step stays free of random data handling. Held-out utterances are mixed once, at ``test_snr``,
with noise segments the training never hears.

Outputs in ``output_folder``: ``train_log.txt``, ``log.txt``, ``hyperparams.yaml``, checkpoints in
``save/``, ``enhanced/`` (enhanced, noisy and clean audio of the test utterances),
``test_results.csv`` (STOI and MSE of enhanced and noisy speech) and ``curves.png``.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import sys

import torch

import fbrain as sb
from fbrain.audio import add_noise, read_audio, resample, write_audio
from fbrain.losses import mse_loss, stoi
from fbrain.recipes.common import Curves, TimeBudget, mean_of, setup_run
from fbrain.recipes.default_data import make_enhancement_data, wav_files

logger = logging.getLogger(__name__)

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "enhancement.yaml")


class SEBrain(sb.Brain):
    def compute_forward(self, batch, stage):
        """The masked noisy spectrum, ``[batch, frames, 257]``."""
        batch = batch.to(self.device)
        noisy_wavs, lens = batch.noisy_sig
        noisy_feats = self.hparams.spectral.log_magnitude(noisy_wavs)
        mask = self.modules.model(noisy_feats)
        return torch.mul(mask, noisy_feats)

    def compute_objectives(self, predictions, batch, stage):
        """MSE against the clean spectrum over the real frames; STOI of the resynthesis when evaluating."""
        clean_wavs, lens = batch.clean_sig
        clean_spec = self.hparams.spectral.log_magnitude(clean_wavs)
        loss = mse_loss(predictions, clean_spec, lens)
        if stage != sb.Stage.TRAIN:
            noisy_wavs, _ = batch.noisy_sig
            enhanced = self.hparams.spectral.resynthesize(torch.expm1(predictions), noisy_wavs)
            self.record(batch, enhanced, predictions, clean_spec, lens, stage)
        return loss

    def record(self, batch, enhanced, predictions, clean_spec, lens, stage):
        """Per-utterance MSE and STOI (of the enhanced and of the noisy speech), cropped to each length."""
        clean_wavs, _ = batch.clean_sig
        noisy_wavs, _ = batch.noisy_sig
        noisy_spec = self.hparams.spectral.log_magnitude(noisy_wavs)
        mse = mse_loss(predictions, clean_spec, lens, reduction="batch")
        mse_noisy = mse_loss(noisy_spec, clean_spec, lens, reduction="batch")
        rate = self.hparams.sample_rate
        for i, ident in enumerate(batch.id):
            n = int(round(float(lens[i]) * clean_wavs.shape[1]))
            clean, noisy, out = clean_wavs[i, :n], noisy_wavs[i, :n], enhanced[i, :n]
            self.scores.append({
                "id": ident, "mse": float(mse[i]), "mse_noisy": float(mse_noisy[i]),
                "stoi": float(stoi(out.double(), clean.double(), rate)),
                "stoi_noisy": float(stoi(noisy.double(), clean.double(), rate)),
            })
            if stage == sb.Stage.TEST and not self.measuring_untrained and sb.distributed.is_main_process():
                folder = self.hparams.enhanced_folder
                os.makedirs(folder, exist_ok=True)
                for name, wav in (("enhanced", out), ("noisy", noisy), ("clean", clean)):
                    write_audio(os.path.join(folder, f"{ident}_{name}.wav"), wav, rate)

    def on_stage_start(self, stage, epoch=None):
        self.scores = []
        if stage == sb.Stage.TRAIN:
            self.train_data.set_epoch(epoch)  # this epoch's crops, noises and SNRs
            self.step_losses = []

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        self.step_losses.append(loss.detach())  # read once, at the end of the epoch

    def _mean(self, key: str) -> float:
        return mean_of(self.scores, key)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            self.train_loss = stage_loss
            if self.step_losses:
                self.curves.add_steps(epoch, torch.stack(self.step_losses).tolist())
            if self.budget.spent():
                logger.info("train_minutes=%s reached after epoch %d: stopping", self.budget.minutes, epoch)
                self.hparams.epoch_counter.limit = epoch
            return
        stats = {"loss": stage_loss, "stoi": self._mean("stoi")}
        if self.measuring_untrained:  # the starting point of the curves (epoch 0)
            self.curves.add(0, minutes=0.0, valid_mse=stage_loss, valid_stoi=stats["stoi"],
                            noisy_mse=self._mean("mse_noisy"), noisy_stoi=self._mean("stoi_noisy"))
            return
        if stage == sb.Stage.VALID:
            self.hparams.train_logger.log_stats({"Epoch": epoch}, train_stats={"loss": self.train_loss},
                                                valid_stats=stats)
            self.curves.add(epoch, minutes=self.budget.elapsed_minutes(), train_loss=self.train_loss,
                            valid_mse=stage_loss, valid_stoi=stats["stoi"], noisy_mse=self._mean("mse_noisy"),
                            noisy_stoi=self._mean("stoi_noisy"), lr=self.optimizer.param_groups[0]["lr"])
            self.checkpointer.save_and_keep_only(meta=stats, max_keys=["stoi"])
            self.plot()
        if stage == sb.Stage.TEST:
            stats["stoi_noisy"] = self._mean("stoi_noisy")
            self.hparams.train_logger.log_stats({"Epoch loaded": self.hparams.epoch_counter.current},
                                                test_stats=stats)
            self.save_results(os.path.join(self.hparams.output_folder, "test_results.csv"))

    def plot(self) -> None:
        self.curves.plot(os.path.join(self.hparams.output_folder, "curves.png"),
                         [("MSE of log spectra", ["train_loss", "valid_mse"], ["noisy_mse"]),
                          ("STOI", ["valid_stoi"], ["noisy_stoi"])], "Spectral-masking enhancement", best="valid_stoi")

    def measure_untrained(self, valid_set, **loader_kwargs) -> None:
        """Validation figures of the model before any training (epoch 0 of the curves)."""
        self.measuring_untrained = True
        try:
            self.evaluate(valid_set, test_loader_kwargs=loader_kwargs)
        finally:
            self.measuring_untrained = False

    def save_results(self, path: str) -> None:
        if not sb.distributed.is_main_process():
            return
        fields = ["id", "stoi", "stoi_noisy", "mse", "mse_noisy"]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.scores)
            writer.writerow({"id": "avg", **{k: self._mean(k) for k in fields[1:]}})


# -- data ------------------------------------------------------------------------------------------

class NoisySpeech(torch.utils.data.Dataset):
    """Clean utterances with noise added: ``{"id", "noisy_sig", "clean_sig"}`` examples.

    Training sets (``crop`` set) draw a crop, a noise segment and an SNR from a generator seeded by
    (seed, epoch, position); held-out sets (``crop=None``, a fixed SNR range) are the same every epoch.
    """

    fbrain_padded_batch = True

    def __init__(self, utterances: dict[str, torch.Tensor], noises: list[torch.Tensor], snr: tuple[float, float],
                 seed: int, crop: int | None = None, repeats: int = 1):
        self.ids, self.clean = list(utterances), list(utterances.values())
        self.noises, self.snr, self.seed, self.crop, self.repeats, self.epoch = noises, snr, seed, crop, repeats, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.clean) * self.repeats

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + index)
        clean = self.clean[index % len(self.clean)]
        if self.crop is not None and clean.shape[0] > self.crop:
            start = int(torch.randint(0, clean.shape[0] - self.crop + 1, (1,), generator=g))
            clean = clean[start:start + self.crop]
        noisy = add_noise(clean.unsqueeze(0), self.noises, self.snr, generator=g)[0]
        return {"id": self.ids[index % len(self.clean)], "noisy_sig": noisy, "clean_sig": clean}


def _load(path: str, rate: int) -> torch.Tensor:
    wav, file_rate = read_audio(path)
    if wav.ndim == 2:
        wav = wav.mean(dim=1)  # a multichannel file: its mono mix
    return resample(wav, file_rate, rate) if file_rate != rate else wav


def dataio_prep(hparams: dict):
    """Train, valid and test sets from the clean and noise folders of ``data_folder``."""
    root, rate = hparams["data_folder"], hparams["sample_rate"]
    clean_paths = sorted({p for pattern in hparams["clean_globs"] for p in glob.glob(os.path.join(root, pattern))})
    noise_paths = wav_files(os.path.join(root, hparams["noise_dir"]))
    held_out = hparams["n_valid"] + hparams["n_test"]
    if len(clean_paths) <= held_out:
        raise FileNotFoundError(f"{root}: found {len(clean_paths)} clean WAV files matching {hparams['clean_globs']}, "
                                f"need more than n_valid + n_test = {held_out}")
    if not noise_paths:
        raise FileNotFoundError(f"{root}/{hparams['noise_dir']}: no noise WAV files")
    order = torch.randperm(len(clean_paths), generator=torch.Generator().manual_seed(hparams["seed"])).tolist()
    name = lambda p: os.path.splitext(os.path.relpath(p, root))[0].replace(os.sep, "-")  # noqa: E731
    utterances = [{name(clean_paths[i]): _load(clean_paths[i], rate)} for i in order]
    test = {k: v for u in utterances[:hparams["n_test"]] for k, v in u.items()}
    valid = {k: v for u in utterances[hparams["n_test"]:held_out] for k, v in u.items()}
    train = {k: v for u in utterances[held_out:] for k, v in u.items()}
    noises = [_load(p, rate) for p in noise_paths]
    cut = [int(n.shape[0] * hparams["train_noise_share"]) for n in noises]
    train_noises = [n[:c] for n, c in zip(noises, cut)]
    heard_never = [n[c:] for n, c in zip(noises, cut)]
    fixed = (hparams["test_snr"], hparams["test_snr"])
    seed = hparams["seed"]
    return (NoisySpeech(train, train_noises, (hparams["snr_low"], hparams["snr_high"]), seed,
                        crop=int(hparams["segment_seconds"] * rate), repeats=hparams["train_repeats"]),
            NoisySpeech(valid, heard_never, fixed, seed + 1),
            NoisySpeech(test, heard_never, fixed, seed + 2))


def main(argv=None) -> dict:
    hparams, run_opts = setup_run(CONFIG, argv, make_enhancement_data, recipe="enhancement")
    train, valid, test = dataio_prep(hparams)

    enhancer = SEBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                       run_opts=run_opts, checkpointer=hparams["checkpointer"])
    enhancer.train_data = train
    enhancer.curves = Curves(hparams["curves_file"])
    enhancer.budget = TimeBudget(hparams["train_minutes"])
    enhancer.measuring_untrained = False
    eval_loader = {"batch_size": hparams["valid_batch_size"]}
    if hparams["checkpointer"].find_checkpoint() is None:
        enhancer.measure_untrained(valid, **eval_loader)
    enhancer.fit(enhancer.hparams.epoch_counter, train, valid,
                 train_loader_kwargs={"batch_size": hparams["batch_size"], "shuffle": True},
                 valid_loader_kwargs=eval_loader)
    epochs = enhancer.hparams.epoch_counter.current  # before evaluate loads the best checkpoint
    enhancer.evaluate(test, max_key="stoi", test_loader_kwargs=eval_loader)
    enhancer.plot()
    start = enhancer.curves.rows()[0] if enhancer.curves.rows() else {}
    _, valid_mse = enhancer.curves.series("valid_mse")
    summary = {"stoi": enhancer._mean("stoi"), "stoi_noisy": enhancer._mean("stoi_noisy"),
               "mse": enhancer._mean("mse"), "valid_mse_start": start.get("valid_mse"),
               "valid_mse_best": min(valid_mse) if valid_mse else None,
               "epochs": epochs, "best_epoch": enhancer.hparams.epoch_counter.current,
               "minutes": enhancer.budget.elapsed_minutes()}
    if sb.distributed.is_main_process():
        drop = ("" if summary["valid_mse_start"] is None or summary["valid_mse_best"] is None else
                f"valid MSE {summary['valid_mse_start']:.3f} -> {summary['valid_mse_best']:.3f}; ")
        print(f"enhancement: {epochs} epochs trained ({summary['minutes']:.1f} min in this run); {drop}the best "
              f"checkpoint (epoch {summary['best_epoch']}): test STOI "
              f"{summary['stoi_noisy']:.3f} (noisy) -> {summary['stoi']:.3f} (enhanced); "
              f"outputs in {hparams['output_folder']}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
