"""MSE and L1 over padded batches, masked by relative lengths, as ``speechbrain.nnet.losses``.

``length[b]`` is the fraction of the time axis (axis 1) that is real signal in example ``b``;
the rest is padding and neither counts in the loss nor receives gradient. Reductions:

- ``"mean"``: sum of the masked loss over the number of real elements (a scalar);
- ``"batch"``: the same per example (``[B]``);
- ``"batchmean"``: sum of the masked loss over the batch size (a scalar);
- ``"none"``: the masked element-wise loss (padding set to zero), shape of the inputs.

SpeechBrain also returns the element-wise loss for any other reduction string (its docstring
mentions ``"sum"``, which silently does that); here an unknown reduction is an error.

>>> import torch
>>> p = torch.tensor([[0.9, 0.1, 0.1, 0.9]])
>>> mse_loss(p, torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
tensor(0.0100)
>>> l1_loss(p, torch.zeros(1, 4), length=torch.tensor([0.5]))
tensor(0.5000)
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "batch", "batchmean", "none")


def truncate(predictions: torch.Tensor, targets: torch.Tensor, allowed_len_diff: int = 3):
    """Cut the longer of the two to the shorter along axis 1, if they differ by at most
    ``allowed_len_diff`` steps (models often lose a frame or two to convolutions)."""
    if predictions.dim() < 2 or targets.dim() < 2:
        raise ValueError("predictions and targets need axes [batch, time, ...], got shapes "
                         f"{tuple(predictions.shape)} and {tuple(targets.shape)}")
    steps = min(predictions.shape[1], targets.shape[1])
    if abs(predictions.shape[1] - targets.shape[1]) > allowed_len_diff:
        raise ValueError(f"predictions and targets differ by more than allowed_len_diff={allowed_len_diff} "
                         f"steps on the time axis 1: shapes {tuple(predictions.shape)} and {tuple(targets.shape)}")
    return predictions[:, :steps], targets[:, :steps]


def length_mask(like: torch.Tensor, length: torch.Tensor | None) -> torch.Tensor:
    """A mask of ``like``'s shape and dtype: 1 on real steps of axis 1, 0 on padding.

    A step ``t`` is real when ``t < length * T - 1e-6`` (SpeechBrain's rule; the 1e-6 keeps
    ``length = k / T`` from letting step ``k`` in through rounding).

    >>> import torch
    >>> length_mask(torch.zeros(2, 4), torch.tensor([1.0, 0.5]))
    tensor([[1., 1., 1., 1.],
            [1., 1., 0., 0.]])
    """
    if length is None:
        return torch.ones_like(like)
    if length.dim() != 1 or length.shape[0] != like.shape[0]:
        raise ValueError(f"length must have shape [batch] = ({like.shape[0]},) with one relative "
                         f"length per example, got {tuple(length.shape)}")
    steps = like.shape[1]
    # The comparison runs in length's dtype, as in SpeechBrain, so borderline steps round alike.
    real = torch.arange(steps, device=length.device, dtype=length.dtype) < (length * steps - 1e-6)[:, None]
    real = real.reshape(real.shape + (1,) * (like.dim() - 2))
    return real.to(like.dtype).expand(like.shape)


def _masked_reduce(loss: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    loss = loss * mask
    batch = loss.shape[0]
    if reduction == "mean":
        return loss.sum() / mask.sum()
    if reduction == "batch":
        return loss.reshape(batch, -1).sum(1) / mask.reshape(batch, -1).sum(1)
    if reduction == "batchmean":
        return loss.sum() / batch
    return loss


def _masked_loss(elementwise, predictions, targets, length, allowed_len_diff, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    predictions, targets = truncate(predictions, targets, allowed_len_diff)
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions and targets must have the same shape after truncation, got "
                         f"{tuple(predictions.shape)} and {tuple(targets.shape)}")
    return _masked_reduce(elementwise(predictions, targets), length_mask(targets, length), reduction)


def mse_loss(predictions: torch.Tensor, targets: torch.Tensor, length: torch.Tensor | None = None,
             allowed_len_diff: int = 3, reduction: str = "mean") -> torch.Tensor:
    """Masked mean squared error over ``[B, T, ...]`` inputs (see the module docstring)."""
    return _masked_loss(lambda p, t: (p - t) ** 2, predictions, targets, length, allowed_len_diff, reduction)


def l1_loss(predictions: torch.Tensor, targets: torch.Tensor, length: torch.Tensor | None = None,
            allowed_len_diff: int = 3, reduction: str = "mean") -> torch.Tensor:
    """Masked mean absolute error over ``[B, T, ...]`` inputs (see the module docstring)."""
    return _masked_loss(lambda p, t: (p - t).abs(), predictions, targets, length, allowed_len_diff, reduction)
