"""Conv-TasNet: a learned filterbank encoder, a temporal convolutional mask network, a decoder.

Hyperparameters follow the paper's names: N filters of length L in the encoder; the mask network
has a B-channel bottleneck, X blocks of H-channel depthwise convolutions (kernel P, dilations
1, 2, ..., 2**(X-1)) repeated R times; C sources. Normalisation is global ("gLN") or cumulative
("cLN", for causal models).

Example::

    >>> import torch
    >>> from fbrain.models import ConvTasNet
    >>> model = ConvTasNet(N=32, L=16, B=32, H=32, P=3, X=1, R=2, C=2)
    >>> mixture = torch.randn(4, 8000)
    >>> model(mixture).shape   # [batch, time, sources]
    torch.Size([4, 8000, 2])
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


class GlobalLayerNorm(nn.Module):
    """Normalise each example over channels and time together (gLN)."""

    def __init__(self, channels: int, eps: float = 1e-8):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))
        self.eps = eps

    def forward(self, x):  # [B, C, T]
        mean = x.mean(dim=(1, 2), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(1, 2), keepdim=True)
        return self.gamma * (x - mean) / torch.sqrt(var + self.eps) + self.beta


class CumulativeLayerNorm(nn.Module):
    """Normalise each frame with statistics of all frames up to it (cLN): causal."""

    def __init__(self, channels: int, eps: float = 1e-8):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))
        self.eps = eps

    def forward(self, x):  # [B, C, T]
        channels = x.shape[1]
        count = channels * torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
        mean = x.sum(dim=1, keepdim=True).cumsum(dim=-1) / count
        power = (x ** 2).sum(dim=1, keepdim=True).cumsum(dim=-1) / count
        var = (power - mean ** 2).clamp_min(0)
        return self.gamma * (x - mean) / torch.sqrt(var + self.eps) + self.beta


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "gLN":
        return GlobalLayerNorm(channels)
    if kind == "cLN":
        return CumulativeLayerNorm(channels)
    raise ValueError(f"norm_type: expected 'gLN' or 'cLN', got {kind!r}")


class TemporalBlock(nn.Module):
    """1x1 conv B->H, PReLU, norm, dilated depthwise conv, PReLU, norm, 1x1 conv H->B; residual."""

    def __init__(self, B: int, H: int, P: int, dilation: int, norm_type: str, causal: bool):
        super().__init__()
        # Causal: pad on the left only, so no output sees the future.
        self.padding = (P - 1) * dilation if causal else (P - 1) * dilation // 2
        self.causal = causal
        self.expand = nn.Conv1d(B, H, 1, bias=False)
        self.act1, self.norm1 = nn.PReLU(), norm_layer(norm_type, H)
        self.depthwise = nn.Conv1d(H, H, P, dilation=dilation, groups=H, bias=False,
                                   padding=0 if causal else self.padding)
        self.act2, self.norm2 = nn.PReLU(), norm_layer(norm_type, H)
        self.project = nn.Conv1d(H, B, 1, bias=False)

    def forward(self, x):  # [B, channels, T]
        h = self.norm1(self.act1(self.expand(x)))
        if self.causal:
            h = nn.functional.pad(h, (self.padding, 0))
        h = self.norm2(self.act2(self.depthwise(h)))
        return x + self.project(h)


class MaskNet(nn.Module):
    """Estimates C masks over the encoder's N channels."""

    def __init__(self, N, B, H, P, X, R, C, norm_type="gLN", causal=False, mask_nonlinear="relu"):
        super().__init__()
        if mask_nonlinear not in ("relu", "softmax", "sigmoid"):
            raise ValueError(f"mask_nonlinear: expected 'relu', 'softmax' or 'sigmoid', got {mask_nonlinear!r}")
        self.C, self.mask_nonlinear = C, mask_nonlinear
        norm_type = "cLN" if causal else norm_type  # a global norm would look at the future
        self.norm = norm_layer(norm_type, N)
        self.bottleneck = nn.Conv1d(N, B, 1, bias=False)
        self.blocks = nn.Sequential(*[
            TemporalBlock(B, H, P, 2 ** x, norm_type, causal) for _ in range(R) for x in range(X)
        ])
        self.act = nn.PReLU()
        self.to_masks = nn.Conv1d(B, C * N, 1, bias=False)

    def forward(self, w):  # [B, N, T'] -> [C, B, N, T']
        scores = self.to_masks(self.act(self.blocks(self.bottleneck(self.norm(w)))))
        scores = rearrange(scores, "b (c n) t -> c b n t", c=self.C)
        if self.mask_nonlinear == "softmax":
            return torch.softmax(scores, dim=0)
        return torch.sigmoid(scores) if self.mask_nonlinear == "sigmoid" else torch.relu(scores)


class ConvTasNet(nn.Module):
    """Separates ``[batch, time]`` mixtures into ``[batch, time, C]`` source estimates."""

    def __init__(self, N=256, L=16, B=256, H=512, P=3, X=8, R=3, C=2, norm_type="gLN", causal=False,
                 mask_nonlinear="relu"):
        super().__init__()
        for name, value in dict(N=N, L=L, B=B, H=H, P=P, X=X, R=R, C=C).items():
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if L % 2:
            raise ValueError(f"L: expected an even filter length (the hop is L // 2), got {L}")
        self.L = L
        self.encoder = nn.Conv1d(1, N, L, stride=L // 2, bias=False)
        self.masknet = MaskNet(N, B, H, P, X, R, C, norm_type, causal, mask_nonlinear)
        self.decoder = nn.ConvTranspose1d(N, 1, L, stride=L // 2, bias=False)

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        if mixture.ndim != 2:
            raise ValueError(f"mixture: expected [batch, time], got shape {tuple(mixture.shape)}")
        T = mixture.shape[-1]
        w = torch.relu(self.encoder(mixture.unsqueeze(1)))          # [B, N, T']
        masks = self.masknet(w)                                      # [C, B, N, T']
        masked = rearrange(masks * w.unsqueeze(0), "c b n t -> (c b) n t")
        est = self.decoder(masked).squeeze(1)                        # [(C B), T'']
        est = rearrange(est, "(c b) t -> b t c", c=masks.shape[0])
        # The transposed convolution may be a few samples short or long: match the input.
        if est.shape[1] < T:
            est = nn.functional.pad(est, (0, 0, 0, T - est.shape[1]))
        return est[:, :T]
