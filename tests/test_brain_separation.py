"""The LibriMix separation recipe's Brain (its imperative fit_batch verbatim apart from the import),
trained on real two-speaker mixtures from the shared speech samples."""

from __future__ import annotations

import itertools
import logging

import pytest
import soundfile
import torch

import fbrain as sb

logger = logging.getLogger(__name__)

try:
    from fbrain.losses import get_si_snr_with_pitwrapper
except ImportError:  # fbrain.losses not there yet: a small local PIT negative SI-SNR per example
    def get_si_snr_with_pitwrapper(source, estimate_source):
        def neg_si_snr(est, ref):
            est, ref = est - est.mean(1, keepdim=True), ref - ref.mean(1, keepdim=True)
            proj = (est * ref).sum(1, keepdim=True) * ref / (ref.pow(2).sum(1, keepdim=True) + 1e-8)
            return -10 * torch.log10(proj.pow(2).sum(1) / ((est - proj).pow(2).sum(1) + 1e-8) + 1e-8)

        n = source.shape[-1]
        per_perm = [sum(neg_si_snr(estimate_source[..., p[i]], source[..., i]) for i in range(n)) / n
                    for p in itertools.permutations(range(n))]
        return torch.stack(per_perm).min(dim=0).values


class Separation(sb.Brain):
    def compute_forward(self, mix, targets, stage, noise=None):
        mix, mix_lens = mix
        mix, mix_lens = mix.to(self.device), mix_lens.to(self.device)
        targets = torch.cat([targets[i][0].unsqueeze(-1) for i in range(self.hparams.num_spks)], dim=-1).to(
            self.device)
        mix_w = self.hparams.Encoder(mix)
        est_mask = self.hparams.MaskNet(mix_w)
        mix_w = torch.stack([mix_w] * self.hparams.num_spks)
        sep_h = mix_w * est_mask
        est_source = torch.cat(
            [self.hparams.Decoder(sep_h[i]).unsqueeze(-1) for i in range(self.hparams.num_spks)], dim=-1)
        T_origin = mix.size(1)
        T_est = est_source.size(1)
        if T_origin > T_est:
            est_source = torch.nn.functional.pad(est_source, (0, 0, 0, T_origin - T_est))
        else:
            est_source = est_source[:, :T_origin, :]
        return est_source, targets

    def compute_objectives(self, predictions, targets):
        return self.hparams.loss(targets, predictions)

    def fit_batch(self, batch):
        """Trains one batch"""
        mixture = batch.mix_sig
        targets = [batch.s1_sig, batch.s2_sig]
        noise = None
        with self.training_ctx:
            predictions, targets = self.compute_forward(mixture, targets, sb.Stage.TRAIN, noise)
            loss = self.compute_objectives(predictions, targets)
            # hard threshold the easy dataitems
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
            logger.info(
                "infinite loss or empty loss! it happened {} times so far - skipping this batch".format(
                    self.nonfinite_count))
            loss.data = torch.tensor(0.0).to(self.device)
        self.optimizer.zero_grad()
        return loss.detach()

    def evaluate_batch(self, batch, stage):
        mixture = batch.mix_sig
        targets = [batch.s1_sig, batch.s2_sig]
        with torch.no_grad():
            predictions, targets = self.compute_forward(mixture, targets, stage)
            loss = self.compute_objectives(predictions, targets)
        return loss.mean().detach()


class MaskNet(torch.nn.Module):
    def __init__(self, channels=32, num_spks=2):
        super().__init__()
        self.num_spks = num_spks
        self.net = torch.nn.Sequential(torch.nn.Conv1d(channels, 64, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv1d(64, channels * num_spks, 1), torch.nn.Sigmoid())

    def forward(self, w):  # [B, N, L] -> [S, B, N, L]
        b, n, length = w.shape
        return self.net(w).view(b, self.num_spks, n, length).transpose(0, 1)


class Encoder(torch.nn.Module):
    def __init__(self, channels=32):
        super().__init__()
        self.conv = torch.nn.Conv1d(1, channels, 16, stride=8, bias=False)

    def forward(self, x):  # [B, T] -> [B, N, L]
        return torch.relu(self.conv(x.unsqueeze(1)))


class Decoder(torch.nn.Module):
    def __init__(self, channels=32):
        super().__init__()
        self.deconv = torch.nn.ConvTranspose1d(channels, 1, 16, stride=8, bias=False)

    def forward(self, h):  # [B, N, L] -> [B, T]
        return self.deconv(h).squeeze(1)


class MixtureSet(torch.utils.data.Dataset):
    fbrain_padded_batch = True  # examples are dicts to pad: PaddedBatch is the collate

    def __init__(self, folder, ids, seconds=0.5):
        self.items = []
        for i in ids:
            read = lambda name: torch.from_numpy(  # noqa: E731
                soundfile.read(str(folder / f"{name}_{i}.wav"), dtype="float32")[0][: int(16000 * seconds)])
            self.items.append({"id": f"mix{i}", "mix_sig": read("mixture"), "s1_sig": read("source1"),
                               "s2_sig": read("source2")})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_librimix_recipe_trains_on_real_mixtures(samples):
    folder = samples / "separation"
    torch.manual_seed(0)
    modules = {"encoder": Encoder(), "masknet": MaskNet(), "decoder": Decoder()}
    hparams = {"num_spks": 2, "Encoder": modules["encoder"], "MaskNet": modules["masknet"],
               "Decoder": modules["decoder"], "loss": get_si_snr_with_pitwrapper, "threshold_byloss": True,
               "threshold": -30, "loss_upper_lim": 999999, "clip_grad_norm": 5, "noprogressbar": True}
    brain = Separation(modules, opt_class=lambda p: torch.optim.Adam(p, lr=1e-3), hparams=hparams)
    train = MixtureSet(folder, [0, 1, 2, 3])
    before = brain.evaluate(train, test_loader_kwargs={"batch_size": 2})
    brain.fit(range(1, 16), train, train_loader_kwargs={"batch_size": 2})
    after = brain.evaluate(train, test_loader_kwargs={"batch_size": 2})
    assert after < before - 1.0, (before, after)  # -SI-SNR falls by more than 1 dB
    assert int(brain.state.counters.optimizer_step) == 30
    assert brain.nonfinite_count == 0


def test_librimix_recipe_skip_path_counts_and_zeroes_the_loss(samples):
    folder = samples / "separation"
    torch.manual_seed(0)
    modules = {"encoder": Encoder(), "masknet": MaskNet(), "decoder": Decoder()}
    hparams = {"num_spks": 2, "Encoder": modules["encoder"], "MaskNet": modules["masknet"],
               "Decoder": modules["decoder"], "loss": get_si_snr_with_pitwrapper, "threshold_byloss": True,
               "threshold": -30, "loss_upper_lim": -1e9, "clip_grad_norm": 5, "noprogressbar": True}
    brain = Separation(modules, opt_class=lambda p: torch.optim.Adam(p, lr=1e-3), hparams=hparams)
    seen = []
    brain.on_stage_end = lambda stage, loss, epoch=None: seen.append((brain.nonfinite_count, loss))
    before = {k: v.clone() for k, v in modules["encoder"].state_dict().items()}
    brain.fit(range(1), MixtureSet(folder, [0, 1]), train_loader_kwargs={"batch_size": 1})
    assert seen == [(2, 0.0)]  # every batch skipped by the recipe, the stage loss is 0
    assert all(torch.equal(before[k], v) for k, v in modules["encoder"].state_dict().items())
