"""Two-speaker separation with Conv-TasNet: the LibriMix recipe's ``Separation`` Brain on fbrain.

    python -m fbrain.recipes.separation [separation.yaml] [--data_folder PATH] [--device cpu] [--lr 0.0005 ...]

The Brain is SpeechBrain's LibriMix recipe with the import changed: an imperative ``fit_batch``
(``threshold_byloss``, ``loss_upper_lim``, ``self.scaler``, ``self.training_ctx``, gradient
clipping, ``self.nonfinite_count``) over fbrain's optimizer and scaler views. Two things differ:
training crops are drawn in the dataset from a generator seeded by (seed, epoch, example), not from
the global RNG, so a resumed run sees the crops a straight run would; and validation reports
SI-SNRi beside SI-SNR.

Outputs in ``output_folder``: ``train_log.txt``, ``log.txt``, ``hyperparams.yaml``, checkpoints in
``save/``, separated audio in ``save/audio_results/``, ``test_results.csv`` and ``curves.png``.
"""

from __future__ import annotations

import csv
import logging
import os
import sys

import torch

import fbrain as sb
from fbrain.audio import read_audio, write_audio
from fbrain.losses import si_snr
from fbrain.manifest import ManifestDataset, load_manifest
from fbrain.recipes.common import Curves, TimeBudget, mean_of, setup_run
from fbrain.recipes.default_data import make_separation_data

logger = logging.getLogger(__name__)

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "separation.yaml")


class Separation(sb.Brain):
    def compute_forward(self, mix, targets, stage, noise=None):
        """Estimates of every source, ``[batch, time, num_spks]``, and the targets stacked alike."""
        mix, mix_lens = mix
        mix, mix_lens = mix.to(self.device), mix_lens.to(self.device)
        targets = torch.cat([targets[i][0].unsqueeze(-1) for i in range(self.hparams.num_spks)], dim=-1).to(
            self.device)
        est_source = self.modules.separator(mix)
        # The decoder may give a few samples more or fewer than the mixture: match its length.
        T_origin, T_est = mix.size(1), est_source.size(1)
        if T_origin > T_est:
            est_source = torch.nn.functional.pad(est_source, (0, 0, 0, T_origin - T_est))
        else:
            est_source = est_source[:, :T_origin, :]
        return est_source, targets

    def compute_objectives(self, predictions, targets):
        """Negative SI-SNR of the best permutation, per example."""
        return self.hparams.loss(targets, predictions)

    def fit_batch(self, batch):
        """Trains one batch (the LibriMix recipe's fit_batch)."""
        mixture = batch.mix_sig
        targets = [batch.s1_sig, batch.s2_sig]
        with self.training_ctx:
            predictions, targets = self.compute_forward(mixture, targets, sb.Stage.TRAIN)
            loss = self.compute_objectives(predictions, targets)
            # Hard threshold the easy examples.
            if self.hparams.threshold_byloss:
                th = self.hparams.threshold
                loss = loss[loss > th]
                if loss.nelement() > 0:
                    loss = loss.mean()
            else:
                loss = loss.mean()

        if loss.nelement() > 0 and loss < self.hparams.loss_upper_lim:
            self.scaler.scale(loss).backward()
            if self.hparams.clip_grad_norm >= 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.modules.parameters(), self.hparams.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.nonfinite_count += 1
            logger.info("infinite loss or empty loss! it happened %d times so far - skipping this batch",
                        self.nonfinite_count)
            loss.data = torch.tensor(0.0).to(self.device)
        self.optimizer.zero_grad()
        self.step_losses.append(loss.detach())
        return loss.detach()

    def evaluate_batch(self, batch, stage):
        """Loss of one batch; SI-SNR and SI-SNRi per example go to ``self.scores``."""
        mixture = batch.mix_sig
        targets = [batch.s1_sig, batch.s2_sig]
        with torch.no_grad():
            predictions, targets = self.compute_forward(mixture, targets, stage)
            loss = self.compute_objectives(predictions, targets)
            # The mixture itself as the estimate of every source: the baseline of the improvement.
            mix = mixture.data.to(self.device)
            baseline = si_snr(mix.unsqueeze(1), targets.transpose(1, 2)).mean(dim=1)
        for i, ident in enumerate(batch.id):
            self.scores.append({"id": ident, "si-snr": -float(loss[i]), "si-snri": -float(loss[i]) - float(baseline[i])})
        if stage == sb.Stage.TEST and self.hparams.save_audio and self.audio_left > 0 and \
                sb.distributed.is_main_process():
            self.save_audio(batch.id[0], mixture.data[0], targets[0], predictions[0])
            self.audio_left -= 1
        return loss.mean().detach()

    def on_stage_start(self, stage, epoch=None):
        self.scores = []
        if stage == sb.Stage.TRAIN:
            self.train_data.set_epoch(epoch)  # the training crops of this epoch
            self.step_losses = []
        if stage == sb.Stage.TEST:
            self.audio_left = self.hparams.n_audio_to_save

    def _mean(self, key: str) -> float:
        return mean_of(self.scores, key)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        # SI-SNR in dB, higher is better, everywhere (logs, curves, checkpoints, summary); the
        # training loss is its negative.
        stage_stats = {"si-snr": -float(stage_loss)}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stage_stats
            if self.step_losses:  # every step's loss, read once per epoch
                self.curves.add_steps(epoch, torch.stack(self.step_losses).tolist())
            if self.budget.spent():
                logger.info("train_minutes=%s reached after epoch %d: stopping", self.budget.minutes, epoch)
                self.hparams.epoch_counter.limit = epoch
            return
        stage_stats["si-snri"] = self._mean("si-snri")
        if stage == sb.Stage.VALID:
            current_lr = self.optimizer.param_groups[0]["lr"]
            self.hparams.train_logger.log_stats(stats_meta={"epoch": epoch, "lr": current_lr},
                                                train_stats=self.train_stats, valid_stats=stage_stats)
            self.curves.add(epoch, minutes=self.budget.elapsed_minutes(), train_si_snr=self.train_stats["si-snr"],
                            valid_si_snr=stage_stats["si-snr"], valid_si_snri=stage_stats["si-snri"], lr=current_lr)
            self.checkpointer.save_and_keep_only(meta={"si-snr": stage_stats["si-snr"]}, max_keys=["si-snr"])
            self.plot()
        elif stage == sb.Stage.TEST:
            self.hparams.train_logger.log_stats(stats_meta={"Epoch loaded": self.hparams.epoch_counter.current},
                                                test_stats=stage_stats)
            self.save_results(os.path.join(self.hparams.output_folder, "test_results.csv"))

    def plot(self) -> None:
        self.curves.plot(os.path.join(self.hparams.output_folder, "curves.png"),
                         [("SI-SNR (dB)", ["train_si_snr", "valid_si_snr"]), ("SI-SNRi (dB)", ["valid_si_snri"])],
                         "Conv-TasNet separation", best="valid_si_snr")

    def save_results(self, path: str) -> None:
        """Per-mixture SI-SNR and SI-SNRi of the test stage, and their means, as CSV."""
        if not sb.distributed.is_main_process():
            return
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "si-snr", "si-snri"])
            writer.writeheader()
            writer.writerows(self.scores)
            writer.writerow({"id": "avg", "si-snr": self._mean("si-snr"), "si-snri": self._mean("si-snri")})
        logger.info("Mean SI-SNR %.2f dB, SI-SNRi %.2f dB on the test set (%s)", self._mean("si-snr"),
                    self._mean("si-snri"), path)

    def save_audio(self, snt_id, mixture, targets, predictions):
        """The mixture, the sources and their estimates (each peak-normalised) as WAV files."""
        folder = os.path.join(self.hparams.save_folder, "audio_results")
        os.makedirs(folder, exist_ok=True)
        rate = self.hparams.sample_rate

        def write(name, wav):
            write_audio(os.path.join(folder, f"item{snt_id}_{name}.wav"), wav / wav.abs().max().clamp_min(1e-9), rate)

        write("mix", mixture)
        for ns in range(self.hparams.num_spks):
            write(f"source{ns + 1}hat", predictions[:, ns])
            write(f"source{ns + 1}", targets[:, ns])


# -- data ------------------------------------------------------------------------------------------

def prepare_manifest(data_folder: str, manifest: str, ids=None) -> None:
    """A LibriMix-style CSV (ID, duration, mix_wav, s1_wav, s2_wav) of the mixtures in ``data_folder``."""
    found = sorted(int(f[len("mixture_"):-len(".wav")]) for f in os.listdir(data_folder)
                   if f.startswith("mixture_") and f.endswith(".wav") and f[len("mixture_"):-len(".wav")].isdigit())
    if not found:
        raise FileNotFoundError(f"{data_folder}: no mixture_K.wav files (expected mixture_K.wav, source1_K.wav, "
                                "source2_K.wav for K = 0, 1, ...)")
    ids = found if ids is None else list(ids)
    missing = [k for k in ids if k not in found]
    if missing:
        raise FileNotFoundError(f"{data_folder}: mixtures {missing} were asked for, the folder has {found}")
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "duration", "mix_wav", "s1_wav", "s2_wav"])
        for k in ids:
            wav, rate = read_audio(os.path.join(data_folder, f"mixture_{k}.wav"))
            writer.writerow([k, wav.shape[0] / rate] + [f"$data_root/{n}_{k}.wav" for n in ("mixture", "source1", "source2")])


class CroppedMixtures(torch.utils.data.Dataset):
    """The mixtures of a manifest, each repeated ``repeats`` times per epoch at a random crop.

    A crop is a function of (seed, epoch, position): the same in a resumed run as in a straight one.
    """

    fbrain_padded_batch = True

    def __init__(self, mixtures: ManifestDataset, crop: int | None, repeats: int, seed: int):
        self.mixtures, self.crop, self.repeats, self.seed, self.epoch = mixtures, crop, repeats, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.mixtures) * self.repeats

    def __getitem__(self, index: int) -> dict:
        example = self.mixtures[index % len(self.mixtures)]
        length = example["mix_sig"].shape[0]
        if self.crop is None or length <= self.crop:
            return example
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + index)
        start = int(torch.randint(0, length - self.crop + 1, (1,), generator=g))
        return {k: v[start:start + self.crop] if isinstance(v, torch.Tensor) else v for k, v in example.items()}


def mixture_dataset(manifest: str, data_folder: str) -> ManifestDataset:
    def reader(field):
        return lambda row: read_audio(row[field], context=f"{manifest}, row {row['id']!r}")[0]

    items = {"mix_sig": reader("mix_wav"), "s1_sig": reader("s1_wav"), "s2_sig": reader("s2_wav")}
    rows = load_manifest(manifest, {"data_root": data_folder})
    return ManifestDataset(rows, items, ["id", "mix_sig", "s1_sig", "s2_sig"], name=manifest)


def dataio_prep(hparams: dict):
    """Train (cropped, repeated), valid and test sets; writes their manifests into the output folder."""
    data_folder = hparams["data_folder"]
    sets = {}
    for split in ("train", "valid", "test"):
        manifest = os.path.join(hparams["output_folder"], f"separation_{split}.csv")
        sb.run_on_main(prepare_manifest, kwargs={"data_folder": data_folder, "manifest": manifest,
                                                 "ids": hparams[f"{split}_ids"]})
        sets[split] = mixture_dataset(manifest, data_folder)
    crop = hparams["training_signal_len"] if hparams["limit_training_signal_len"] else None
    train = CroppedMixtures(sets["train"], crop, hparams["train_repeats"], hparams["seed"])
    return train, sets["valid"], sets["test"]


def main(argv=None) -> dict:
    hparams, run_opts = setup_run(CONFIG, argv, make_separation_data, recipe="separation")
    train, valid, test = dataio_prep(hparams)
    hparams["sample_rate"] = read_audio(test.rows[test.ids[0]]["mix_wav"])[1]

    separator = Separation(modules=hparams["modules"], opt_class=hparams["optimizer"], hparams=hparams,
                           run_opts=run_opts, checkpointer=hparams["checkpointer"])
    separator.train_data = train
    separator.curves = Curves(hparams["curves_file"])
    separator.budget = TimeBudget(hparams["train_minutes"])
    loader = {"batch_size": 1}
    separator.fit(separator.hparams.epoch_counter, train, valid,
                  train_loader_kwargs={"batch_size": hparams["batch_size"], "shuffle": True},
                  valid_loader_kwargs=loader)
    epochs = separator.hparams.epoch_counter.current  # before evaluate loads the best checkpoint
    separator.evaluate(test, max_key="si-snr", test_loader_kwargs=loader)
    separator.plot()
    summary = {"si-snr": separator._mean("si-snr"), "si-snri": separator._mean("si-snri"), "epochs": epochs,
               "best_epoch": separator.hparams.epoch_counter.current, "minutes": separator.budget.elapsed_minutes()}
    if sb.distributed.is_main_process():
        print(f"separation: {epochs} epochs trained ({summary['minutes']:.1f} min in this run); the best checkpoint "
              f"(epoch {summary['best_epoch']}) on the test mixtures: SI-SNR {summary['si-snr']:.2f} dB, SI-SNRi "
              f"{summary['si-snri']:.2f} dB; outputs in {hparams['output_folder']}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
