"""The speech-enhancement template's spectral masking model.

BiLSTM(257 -> 2 x 256) -> Linear(512 -> 128) -> BiLSTM(128 -> 2 x 256) -> Linear(512 -> 257) -> ReLU,
2,042,753 parameters. It maps log-magnitude spectra ``[batch, frames, 257]`` to a mask of the same shape.

Example::

    >>> import torch
    >>> from fbrain.models import SpectralMasker
    >>> model = SpectralMasker()
    >>> sum(p.numel() for p in model.parameters())
    2042753
    >>> model(torch.randn(2, 10, 257)).shape
    torch.Size([2, 10, 257])
"""

from __future__ import annotations

import torch


class SpectralMasker(torch.nn.Module):
    def __init__(self, n_freq: int = 257, hidden: int = 256, bottleneck: int = 128):
        super().__init__()
        self.rnn1 = torch.nn.LSTM(n_freq, hidden, batch_first=True, bidirectional=True)
        self.proj1 = torch.nn.Linear(2 * hidden, bottleneck)
        self.rnn2 = torch.nn.LSTM(bottleneck, hidden, batch_first=True, bidirectional=True)
        self.proj2 = torch.nn.Linear(2 * hidden, n_freq)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn1(features)
        hidden, _ = self.rnn2(self.proj1(hidden))
        return torch.relu(self.proj2(hidden))
