"""The benchmark workloads: a model, a deterministic batch stream and a loss, as plain torch.

Every system builds its model from the same seed and reads the same batches, so their losses
after the timed steps must agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fbrain.models import ConvTasNet, SpectralMasker
from fbrain.models.features import Spectral


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[[], torch.nn.Module]               # seeded: the same weights every call
    batch: Callable[[int], tuple]                       # batch number -> (inputs, targets), deterministic
    loss: Callable[[torch.nn.Module, tuple], torch.Tensor]
    note: str


def _seeded(fn, seed=0):
    def build():
        torch.manual_seed(seed)
        return fn()
    return build


def _gen(i: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + i)


# -- tiny-linear: the Brain tutorial's Linear(10, 10) -------------------------------------------

def _tiny_batch(i):
    g = _gen(i)
    return torch.rand(10, 10, generator=g), torch.rand(10, 10, generator=g)


def _mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


# -- mlp: pure-step overhead ----------------------------------------------------------------------

def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                               torch.nn.ReLU(), torch.nn.Linear(512, 10))


def _mlp_batch(i):
    g = _gen(i)
    return torch.randn(64, 256, generator=g), torch.randint(0, 10, (64,), generator=g)


def _cross_entropy(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


# -- mlp-100m: a model whose optimizer state matters (sharded state, benchmarks.data_parallel) -------

def _mlp_100m():
    layers = []
    for _ in range(6):  # 6 x (4096 x 4096 + 4096) = 100.7 M parameters
        layers += [torch.nn.Linear(4096, 4096), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _mlp_100m_batch(i):
    g = _gen(i)
    return torch.randn(8, 4096, generator=g), torch.randn(8, 4096, generator=g)


# -- enhance-blstm: the enhancement template (STFT features -> BiLSTM masker -> MSE) -------------

class EnhanceModel(torch.nn.Module):
    """Features, mask and masked spectrum of the template, in one module."""

    def __init__(self):
        super().__init__()
        self.spectral = Spectral()
        self.masker = SpectralMasker()

    def forward(self, noisy):
        feats = self.spectral.log_magnitude(noisy)
        return self.masker(feats) * feats


def _enhance_batch(i, seconds=2.0, batch=8):
    g = _gen(i)
    n = int(16000 * seconds)
    t = torch.arange(n) / 16000
    clean = torch.sin(2 * torch.pi * (100 + 400 * torch.rand(batch, 1, generator=g)) * t) * 0.5
    noisy = clean + 0.3 * torch.randn(batch, n, generator=g)
    return noisy, clean


def _enhance_loss(model, batch):
    noisy, clean = batch
    target = model.spectral.log_magnitude(clean)
    return torch.nn.functional.mse_loss(model(noisy), target)


# -- convtasnet: separation with permutation-invariant negative SI-SNR ---------------------------

def _separation_batch(i, batch=4, seconds=1.0):
    g = _gen(i)
    n = int(8000 * seconds)
    sources = torch.randn(batch, n, 2, generator=g) * torch.tensor([1.0, 0.5])
    return sources.sum(-1), sources


def _neg_si_snr_pit(model, batch):
    mixture, sources = batch
    estimates = model(mixture)
    return _pit_neg_si_snr(estimates, sources)


def _pit_neg_si_snr(est, ref, eps=1e-8):
    """Mean over the batch of the best-permutation negative SI-SNR, two sources ([B, T, 2])."""
    est = est - est.mean(dim=1, keepdim=True)
    ref = ref - ref.mean(dim=1, keepdim=True)

    def si_snr(e, r):
        proj = (e * r).sum(1, keepdim=True) * r / (r.pow(2).sum(1, keepdim=True) + eps)
        noise = e - proj
        return 10 * torch.log10(proj.pow(2).sum(1) / (noise.pow(2).sum(1) + eps) + eps)

    straight = (si_snr(est[..., 0], ref[..., 0]) + si_snr(est[..., 1], ref[..., 1])) / 2
    swapped = (si_snr(est[..., 0], ref[..., 1]) + si_snr(est[..., 1], ref[..., 0])) / 2
    return -torch.maximum(straight, swapped).mean()


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("tiny-linear", _seeded(lambda: torch.nn.Linear(10, 10)), _tiny_batch, _mse,
             "the Brain tutorial's Linear(10, 10), batch 10x10"),
    Workload("mlp", _seeded(_mlp), _mlp_batch, _cross_entropy, "MLP 256-512-512-10, batch 64"),
    Workload("enhance-blstm", _seeded(EnhanceModel), _enhance_batch, _enhance_loss,
             "STFT + BiLSTM masker (2.04 M params), batch 8 x 2 s at 16 kHz"),
    Workload("convtasnet-small", _seeded(lambda: ConvTasNet(N=32, L=16, B=32, H=32, P=3, X=1, R=2, C=2)),
             _separation_batch, _neg_si_snr_pit, "ConvTasNet N=B=H=32, X=1, R=2; batch 4 x 1 s at 8 kHz"),
    Workload("mlp-100m", _seeded(_mlp_100m), _mlp_100m_batch, _mse, "MLP of six 4096 x 4096 layers (100.7 M params), batch 8"),
    Workload("convtasnet-large", _seeded(lambda: ConvTasNet(N=256, L=16, B=256, H=512, P=3, X=6, R=4, C=2)),
             lambda i: _separation_batch(i, batch=2), _neg_si_snr_pit,
             "ConvTasNet N=B=256, H=512, X=6, R=4; batch 2 x 1 s at 8 kHz"),
]}

QUICK = ["tiny-linear", "mlp", "enhance-blstm", "convtasnet-small"]
FULL = QUICK + ["convtasnet-large"]
