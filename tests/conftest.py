"""Shared fixtures: small models, loss functions and the real-speech sample folder."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib

import pytest
import torch

import fbrain

REPO = pathlib.Path(__file__).resolve().parent.parent

# Scripts that tests launch in subprocesses (torchrun, SpeechBrain references): not test modules.
collect_ignore = ["scripts"]


def speechbrain_installed() -> bool:
    """Whether SpeechBrain (and the torchaudio it needs) can be imported, checked without importing
    it here: importing SpeechBrain turns on TF32 and patches the DataLoader."""
    return importlib.util.find_spec("speechbrain") is not None and importlib.util.find_spec("torchaudio") is not None


NO_SPEECHBRAIN = ("SpeechBrain is not installed (the `dev` or `speechbrain` extra installs it, with the torch "
                  "2.11 + torchaudio 2.11 pair it loads with); this test compares fbrain with it")


def pytest_configure(config):
    config.addinivalue_line("markers", "speechbrain: compares with SpeechBrain; skipped when it is not installed")


def pytest_collection_modifyitems(config, items):
    if speechbrain_installed():
        return
    skip = pytest.mark.skip(reason=NO_SPEECHBRAIN)
    for item in items:
        if item.get_closest_marker("speechbrain") is not None:
            item.add_marker(skip)


def speech_samples() -> pathlib.Path | None:
    """``$FBRAIN_SAMPLES`` or ``../shared/data/speech-samples`` beside the repository, if present."""
    env = os.environ.get("FBRAIN_SAMPLES")
    for candidate in ([pathlib.Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "speech-samples"]:
        if candidate.is_dir():
            return candidate
    return None


@pytest.fixture
def samples() -> pathlib.Path:
    found = speech_samples()
    if found is None:
        pytest.skip("real speech samples not found: set FBRAIN_SAMPLES or put shared/ beside the repository")
    return found


def mlp(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(8, 16), torch.nn.Tanh()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    layers.append(torch.nn.Linear(16, 2))
    return torch.nn.Sequential(*layers)


class ConvNet(torch.nn.Module):
    """A small 1-D conv model with BatchNorm (so it has buffers)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        # No bias before BatchNorm: its true gradient is zero, and Adam would amplify rounding noise.
        self.conv = torch.nn.Conv1d(1, 4, kernel_size=5, padding=2, bias=False)
        self.norm = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):  # x: [B, T]
        h = torch.relu(self.norm(self.conv(x.unsqueeze(1))))
        return self.head(h.mean(dim=-1))


def regression_loss(model: torch.nn.Module):
    """A loss function over batches ``(x, y)`` that also returns updated buffers."""

    def loss_fn(params, buffers, batch, rng):
        x, y = batch
        pred, new_buffers = fbrain.apply_module(model, params, buffers, x)
        return torch.nn.functional.mse_loss(pred, y), {"buffers": new_buffers}

    return loss_fn


def batches(n: int, batch_size: int = 16, features: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, features, generator=g), torch.randn(batch_size, 2, generator=g))
            for _ in range(n)]


def conv_batches(n: int, batch_size: int = 8, length: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, length, generator=g), torch.randn(batch_size, 2, generator=g))
            for _ in range(n)]


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def clone_tree(tree):
    return fbrain.tree.map_tensors(lambda t: t.clone(), tree)


def bitwise_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so NaN equals the same NaN and -0.0 differs from 0.0)."""
    if x.dtype != y.dtype or x.shape != y.shape or x.device != y.device:
        return False
    return torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8))


def trees_equal(a, b) -> bool:
    """Two pytrees with the same structure and bitwise-equal tensors."""
    la, sa = fbrain.tree.tree_flatten(a)
    lb, sb = fbrain.tree.tree_flatten(b)
    if sa != sb:
        return False
    for x, y in zip(la, lb):
        same = bitwise_equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
        if not same:
            return False
    return True


FUSED_KERNELS = ("_fused_adam_", "_fused_adamw_", "_fused_sgd_")


@contextlib.contextmanager
def fused_kernel_calls():
    """The names of ATen's fused optimizer kernels called while the block runs, in order."""
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        for name in FUSED_KERNELS:
            def counting(*args, _original=getattr(torch, name), _name=name, **kwargs):
                calls.append(_name)
                return _original(*args, **kwargs)
            mp.setattr(torch, name, counting)
        yield calls


class RegressionBrain(fbrain.Brain):
    """``modules.model`` fitted to targets by MSE; a batch is ``{"x": .., "y": ..}`` or ``(x, y)``."""

    def compute_forward(self, batch, stage):
        return self.modules.model(batch["x"] if isinstance(batch, dict) else batch[0])

    def compute_objectives(self, predictions, batch, stage):
        return torch.nn.functional.mse_loss(predictions, batch["y"] if isinstance(batch, dict) else batch[1])
