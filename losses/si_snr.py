"""Scale-invariant signal-to-noise ratio (SI-SNR), in dB, over the last (time) axis.

The arithmetic follows ``speechbrain.nnet.losses.cal_si_snr`` step by step (zero mean, projection,
``eps`` added in the same three places) so that values agree to float rounding, including the very
large values (~135 dB in float32) that a perfect estimate produces.

>>> import torch
>>> t = torch.linspace(0, 1, 16000).sin()
>>> float(si_snr(t + 0.1, t)) > 100      # an offset is removed by the zero-mean step
True
"""

from __future__ import annotations

import torch

EPS = 1e-8  # SpeechBrain's constant, the same for float32 and float64.


def _check_time_shapes(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError(f"{name_a} and {name_b} need a time axis (last), got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{name_a} and {name_b} must have the same number of samples on the last "
                         f"axis, got {tuple(a.shape)} and {tuple(b.shape)}")
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} do not broadcast; "
                         "the leading (batch, source) axes must match or be 1") from None


def si_snr(estimate: torch.Tensor, target: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """SI-SNR of ``estimate`` against ``target`` in dB; higher is better.

    Both have shape ``[..., T]`` (leading axes broadcast, so ``estimate[:, :, None]`` against
    ``target[:, None]`` gives every estimate/target pair). Returns shape ``[...]``.

    >>> import torch
    >>> target = torch.randn(2, 3, 800, dtype=torch.float64)
    >>> si_snr(target + 0.1 * torch.randn_like(target), target).shape
    torch.Size([2, 3])
    """
    _check_time_shapes("estimate", estimate, "target", target)
    # Zero mean first: SI-SNR must not reward or punish a DC offset.
    estimate = estimate - estimate.mean(dim=-1, keepdim=True)
    target = target - target.mean(dim=-1, keepdim=True)
    dot = (estimate * target).sum(dim=-1, keepdim=True)
    target_energy = (target ** 2).sum(dim=-1, keepdim=True) + eps
    projection = dot * target / target_energy
    noise = estimate - projection
    # Noise is formed explicitly (not as ||e||^2 - <e,s>^2/||s||^2): the closed form cancels
    # catastrophically for good estimates, exactly the ones training cares about.
    ratio = (projection ** 2).sum(dim=-1) / ((noise ** 2).sum(dim=-1) + eps)
    return 10 * torch.log10(ratio + eps)


def si_snr_improvement(estimate: torch.Tensor, target: torch.Tensor, mixture: torch.Tensor,
                       eps: float = EPS) -> torch.Tensor:
    """SI-SNRi: how many dB ``estimate`` gains over the unprocessed ``mixture`` (both vs ``target``).

    ``mixture`` broadcasts against ``target``: for ``[B, C, T]`` sources pass ``mixture[:, None]``.

    >>> import torch
    >>> s = torch.randn(2, 2, 4000, dtype=torch.float64)
    >>> mix = s.sum(dim=1, keepdim=True)
    >>> bool((si_snr_improvement(s + 0.01 * torch.randn_like(s), s, mix) > 20).all())
    True
    """
    _check_time_shapes("mixture", mixture, "target", target)
    return si_snr(estimate, target, eps) - si_snr(mixture, target, eps)


def pairwise_neg_si_snr(estimate: torch.Tensor, target: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``[B, C, C]`` matrix of ``-si_snr(estimate[:, i], target[:, j])`` for ``[B, C, T]`` inputs.

    The pairwise loss to hand to :func:`fbrain.losses.pit`.

    >>> import torch
    >>> s = torch.randn(1, 2, 500)
    >>> m = pairwise_neg_si_snr(s.flip(1), s)
    >>> bool(m[0, 0, 1] < m[0, 0, 0])           # estimate 0 is target 1
    True
    """
    if estimate.dim() != 3 or estimate.shape != target.shape:
        raise ValueError("pairwise_neg_si_snr expects estimate and target of the same shape "
                         f"[batch, sources, time], got {tuple(estimate.shape)} and {tuple(target.shape)}")
    return -si_snr(estimate.unsqueeze(2), target.unsqueeze(1), eps)
