"""Data parallelism inside the pure step: gradients averaged across processes in one collective.

Every rank computes gradients on its own batch; :func:`mean_across_ranks` packs the gradients and
the loss into one flat buffer, all-reduces it once with torch's *functional* collectives (which
return new tensors and trace under ``torch.compile``), and unpacks the averages. All ranks then
hold bit-identical gradients and loss, so the non-finite decision, clipping, the loss-scale update
and the optimizer update agree everywhere without further communication. With gradient
accumulation the micro-batches are summed locally first: only the last one communicates.

Example (inside a process group; see tests/test_distributed.py for a torchrun launch)::

    train_step = fbrain.make_train_step(loss_fn, opt, process_group=torch.distributed.group.WORLD)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def world_size(group) -> int:
    return dist.get_world_size(group)


def mean_across_ranks(
    grads: dict[str, torch.Tensor], loss: torch.Tensor, group
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``(grads, loss)`` averaged over the ranks of ``group`` with a single all-reduce."""
    names = list(grads)
    tensors = [grads[n] for n in names]
    dtype = tensors[0].dtype if tensors else loss.dtype
    flat = torch.cat([t.reshape(-1) for t in tensors] + [loss.detach().reshape(1).to(dtype)])
    total = funcol.all_reduce(flat, "sum", group)
    mean = funcol.wait_tensor(total) / world_size(group)
    out, offset = {}, 0
    for name, t in zip(names, tensors):
        out[name] = mean[offset:offset + t.numel()].view_as(t)
        offset += t.numel()
    return out, mean[offset].to(loss.dtype)


def init_from_environment(backend: str | None = None, device: torch.device | None = None):
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, ...).

    ``backend`` defaults to nccl for CUDA devices and gloo otherwise. Returns the default group,
    or None when the environment describes no distributed run.
    """
    import os

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return dist.group.WORLD
