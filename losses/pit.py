"""Permutation-invariant training (PIT) for any number of sources, without a loop over examples.

The pairwise loss matrix ``M[b, i, j] = loss(estimate i, target j)`` is computed once; every one
of the ``C!`` assignments is then scored at once by gathering from ``M`` with a ``[C!, C]`` table
of permutations. The table costs ``C! * C`` integers, fine up to about 8 sources (40 320 rows).

Convention (the same as torchmetrics): ``perm[b, j]`` is the estimate assigned to target ``j``,
so ``reorder_sources(estimate, perm)[:, j]`` lines up with ``target[:, j]``.

>>> import torch
>>> from fbrain.losses.si_snr import pairwise_neg_si_snr
>>> target = torch.randn(2, 3, 400)
>>> estimate = target[:, [2, 0, 1]]
>>> loss, perm = pit(pairwise_neg_si_snr, estimate, target)
>>> perm.tolist()
[[1, 2, 0], [1, 2, 0]]
>>> torch.equal(reorder_sources(estimate, perm), target)
True
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable

import torch


@functools.lru_cache(maxsize=None)
def _permutation_table_cpu(num_sources: int) -> torch.Tensor:
    return torch.tensor(list(itertools.permutations(range(num_sources))), dtype=torch.long)


def permutation_table(num_sources: int, device: torch.device | str | None = None) -> torch.Tensor:
    """All permutations of ``range(num_sources)`` as a ``[C!, C]`` long tensor, in
    ``itertools.permutations`` order (so ties resolve like SpeechBrain: the first one wins).

    >>> permutation_table(3)[:2].tolist()
    [[0, 1, 2], [0, 2, 1]]
    """
    if num_sources < 1:
        raise ValueError(f"num_sources must be at least 1, got {num_sources}")
    return _permutation_table_cpu(num_sources).to(device)


def pit_from_matrix(loss_matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best assignment for a ``[B, C, C]`` matrix ``M[b, i, j] = loss(estimate i, target j)``.

    Returns ``(loss [B], perm [B, C])`` where ``loss`` is the mean over sources of the matched
    entries (differentiable: the gradient flows into the chosen entries only).

    >>> import torch
    >>> m = torch.tensor([[[5.0, 1.0], [0.0, 7.0]]])
    >>> pit_from_matrix(m)
    (tensor([0.5000]), tensor([[1, 0]]))
    """
    if loss_matrix.dim() != 3 or loss_matrix.shape[1] != loss_matrix.shape[2]:
        raise ValueError("loss_matrix must have shape [batch, sources, sources], got "
                         f"{tuple(loss_matrix.shape)}")
    num_sources = loss_matrix.shape[-1]
    table = permutation_table(num_sources, loss_matrix.device)          # [P, C]
    columns = torch.arange(num_sources, device=loss_matrix.device)
    # scores[b, p] = mean_j M[b, table[p, j], j]: one gather scores all permutations.
    scores = loss_matrix[:, table, columns].mean(dim=-1)               # [B, P]
    loss, best = scores.min(dim=-1)
    return loss, table[best]


def pit(pairwise_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        estimate: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation-invariant loss of ``estimate`` against ``target``, both ``[B, C, ...]``.

    ``pairwise_loss(estimate, target)`` must return the ``[B, C, C]`` matrix of losses between
    estimate ``i`` and target ``j`` (e.g. :func:`fbrain.losses.pairwise_neg_si_snr`); lower is
    better. Returns ``(loss [B], perm [B, C])``. See the module docstring for an example.
    """
    if estimate.shape != target.shape:
        raise ValueError(f"estimate and target must have the same shape, got {tuple(estimate.shape)} "
                         f"and {tuple(target.shape)}")
    if estimate.dim() < 2:
        raise ValueError(f"estimate and target need axes [batch, sources, ...], got shape "
                         f"{tuple(estimate.shape)}")
    batch, num_sources = estimate.shape[:2]
    matrix = pairwise_loss(estimate, target)
    if matrix.shape != (batch, num_sources, num_sources):
        raise ValueError(f"pairwise_loss must return shape {(batch, num_sources, num_sources)} "
                         f"([batch, estimates, targets]), got {tuple(matrix.shape)}")
    return pit_from_matrix(matrix)


def reorder_sources(estimate: torch.Tensor, perm: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``out[b, j] = estimate[b, perm[b, j]]`` along the source axis ``dim`` (default 1).

    Use ``dim=-1`` for SpeechBrain's ``[B, T, C]`` layout.

    >>> import torch
    >>> x = torch.arange(6.0).reshape(1, 3, 2)
    >>> reorder_sources(x, torch.tensor([[2, 0, 1]]))[0, :, 0].tolist()
    [4.0, 0.0, 2.0]
    """
    dim = dim % estimate.dim()
    if dim == 0:
        raise ValueError("dim must name the source axis, not the batch axis 0")
    if perm.dim() != 2 or perm.shape[0] != estimate.shape[0] or perm.shape[1] != estimate.shape[dim]:
        raise ValueError(f"perm must have shape [batch, sources] = {(estimate.shape[0], estimate.shape[dim])}, "
                         f"got {tuple(perm.shape)}")
    # Broadcast perm to estimate's shape with the sources on `dim`, then one gather (no loop).
    view = [perm.shape[0]] + [1] * (estimate.dim() - 1)
    view[dim] = perm.shape[1]
    index = perm.reshape(view).expand(estimate.shape)
    return estimate.gather(dim, index)
