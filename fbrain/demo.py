"""A one-minute tour: train a small denoiser with the pure ``train_step`` and watch the loss fall.

Run it with ``python -m fbrain.demo``. The data are noisy sinusoids made on the
spot (no download); the model is a two-layer 1-D convolution net trained with
Adam, clipping and dropout, all through ``fbrain.make_train_step``.
"""

from __future__ import annotations

import time

import torch

import fbrain
from fbrain import optim


class Denoiser(torch.nn.Module):
    def __init__(self, channels: int = 16):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv1d(1, channels, 9, padding=4), torch.nn.ReLU(), torch.nn.Dropout(0.1),
            torch.nn.Conv1d(channels, 1, 9, padding=4),
        )

    def forward(self, noisy):  # [B, T] -> [B, T]
        return self.net(noisy.unsqueeze(1)).squeeze(1)


def make_batch(generator: torch.Generator, batch_size: int = 16, length: int = 256):
    t = torch.arange(length) / 16000.0
    freq = 200 + 800 * torch.rand(batch_size, 1, generator=generator)
    clean = torch.sin(2 * torch.pi * freq * t)
    noisy = clean + 0.5 * torch.randn(batch_size, length, generator=generator)
    return noisy, clean


def main(steps: int = 300) -> None:
    model = Denoiser()
    opt = optim.adam(lr=optim.schedules.warmup_cosine_decay(3e-3, 20, steps))
    state = fbrain.TrainState.create(model, opt, seed=0)

    def loss_fn(params, buffers, batch, rng):
        noisy, clean = batch
        estimate, _ = fbrain.apply_module(model, params, buffers, noisy)
        return torch.nn.functional.mse_loss(estimate, clean)

    train_step = fbrain.make_train_step(loss_fn, opt, max_grad_norm=5.0)
    data = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        state, metrics = train_step(state, make_batch(data))
        if step == 1 or step % 50 == 0:
            lr = float(optim.get_hyperparams(state.opt_state)["lr"])
            print(f"step {step:4d}  loss {float(metrics['loss']):.4f}  grad_norm {float(metrics['grad_norm']):.3f}"
                  f"  lr {lr:.2e}")
    elapsed = time.perf_counter() - start
    print(f"{steps} steps in {elapsed:.1f} s ({elapsed / steps * 1e3:.2f} ms/step); "
          f"{int(state.counters.nonfinite_count)} skipped")


if __name__ == "__main__":
    main()
