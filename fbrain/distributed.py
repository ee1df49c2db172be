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

import datetime
import functools
import os

import torch
import torch.distributed as dist

from fbrain.devices import launched_by_torchrun, resolve_device, use_device
from fbrain.torch_compat import funcol


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


def scalar_mean(value):
    """Under torchrun, the number ``value`` (a tensor or a float) averaged over every rank with one
    small all-reduce, as a 0-dim float tensor; else ``value`` unchanged (None stays None)."""
    if value is None or not active():
        return value
    value = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    _, mean = mean_across_ranks({}, value.reshape(()).float(), dist.group.WORLD)
    return mean


def launched() -> bool:
    """True in a process started by torchrun (its RANK/LOCAL_RANK/WORLD_SIZE environment)."""
    return launched_by_torchrun()


def active() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def joined() -> bool:
    """True in a process started by torchrun that has joined its process group."""
    return launched() and dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: its process group's, or torchrun's ``RANK`` before it joined the group
    (recipes often create their output folder before the Brain joins); 0 outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ["RANK"]) if launched() else 0


def is_main_process() -> bool:
    """Rank 0 (or not distributed): the process that writes checkpoints and logs."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op outside a distributed run)."""
    if active():
        dist.barrier()


def if_main_process() -> bool:
    """SpeechBrain's name for :func:`is_main_process`."""
    return is_main_process()


def ddp_barrier() -> None:
    """SpeechBrain's name for :func:`barrier`."""
    barrier()


def ddp_broadcast(value, src: int = 0):
    """``value`` as rank ``src`` holds it, on every rank (itself outside a distributed run)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_process_only(function):
    """Decorator: ``function`` runs on rank 0 only; every rank gets its result (SpeechBrain's).

    Example::

        >>> @main_process_only
        ... def write_manifest():
        ...     return "written"
        >>> write_manifest()
        'written'
    """
    @functools.wraps(function)
    def on_main(*args, **kwargs):
        return ddp_broadcast(function(*args, **kwargs) if is_main_process() else None)
    return on_main


class RankMismatchError(RuntimeError):
    """The ranks of a distributed run disagree on something they must share (e.g. steps per epoch)."""


def agree_on_count(count: int | None, what: str) -> None:
    """Under torchrun, check that every rank has the same ``count`` of ``what`` (e.g. the train
    batches of an epoch, known before it starts), so no rank waits in a collective the others never
    reach or pairs its steps with another epoch's. Raises :class:`RankMismatchError` naming each
    rank's count; a no-op outside a distributed run."""
    if not active():
        return
    counts: list = [None] * dist.get_world_size()
    dist.all_gather_object(counts, count)
    if len(set(counts)) > 1:
        listed = ", ".join(f"rank {r}: {c if c is not None else 'unknown (no len())'}" for r, c in enumerate(counts))
        raise RankMismatchError(
            f"the ranks disagree on the number of {what} ({listed}); every rank must take the same number of "
            "steps. Let fbrain shard the data (a dataset or a batch_sampler, not a DataLoader built per rank), "
            "or give each rank's loader the same length")


def failures_across_ranks(error: BaseException | None) -> dict[int, str]:
    """Every rank's failure at this point (rank -> message; empty when none failed), on every rank:
    a collective that lets all ranks take the same decision after each tried its own part (e.g.
    wrote its shard of a checkpoint). ``{}`` or ``{0: ...}`` outside a distributed run."""
    message = None if error is None else f"{type(error).__name__}: {error}"
    if not active():
        return {} if message is None else {0: message}
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return {r: m for r, m in enumerate(messages) if m is not None}


def run_on_main(func, args=None, kwargs=None, post_func=None, post_args=None, post_kwargs=None,
                run_post_on_main=False):
    """SpeechBrain's ``run_on_main``: ``func`` on rank 0 only (data preparation, folder creation),
    then a barrier, then ``post_func`` (if any) on the other ranks (on every rank with
    ``run_post_on_main``). Returns ``func``'s result on every rank (rank 0 sends it to the others).
    Outside a distributed run it simply calls ``func`` (and ``post_func`` with ``run_post_on_main``)."""
    result = ddp_broadcast(func(*(args or ()), **(kwargs or {})) if is_main_process() else None)
    barrier()
    if post_func is not None:
        if run_post_on_main or not is_main_process():
            post_func(*(post_args or ()), **(post_kwargs or {}))
        if not run_post_on_main:
            barrier()
    return result


def timeout() -> datetime.timedelta:
    """How long a collective may wait for a peer before failing (``$FBRAIN_DDP_TIMEOUT_S``, 300 s).

    torch's default is 30 minutes; a rank that died should stop the others much sooner.
    """
    return datetime.timedelta(seconds=float(os.environ.get("FBRAIN_DDP_TIMEOUT_S", "300")))


def init_from_environment(backend: str | None = None, device: torch.device | str | None = None):
    """Join the process group torchrun describes (RANK, WORLD_SIZE, ...); None outside torchrun.

    ``backend`` defaults to nccl for CUDA devices and gloo otherwise.
    """
    global _joined_here
    if not launched():
        return None
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout())
        _joined_here = True
    return dist.group.WORLD


_joined_here = False  # whether init_from_environment created the process group (leave() ends only that one)


def leave() -> None:
    """Leave the process group fbrain joined (``ddp_init_group``), every rank together, as a run
    stopped by a signal exits after its last collective. Left for the interpreter's exit to tear
    down, a live gloo group has aborted a rank ("terminate called without an active exception",
    torch 2.13's CPU build, once in CI). A group the caller created is the caller's to end."""
    global _joined_here
    if _joined_here and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _joined_here = False


def ddp_init_group(run_opts: dict) -> None:
    """SpeechBrain's ``ddp_init_group``: join torchrun's process group with the run options' backend,
    and give each rank its own CUDA device (``cuda:LOCAL_RANK``). Outside torchrun it does nothing.

    Example::

        hparams_file, run_opts, overrides = fbrain.parse_arguments(sys.argv[1:])
        fbrain.ddp_init_group(run_opts)
    """
    if not launched():
        return
    device = resolve_device(run_opts.get("device"))  # cuda -> cuda:LOCAL_RANK; None -> the accelerator or cpu
    run_opts["device"] = str(device)
    use_device(device)
    backend = run_opts.get("distributed_backend", "nccl") if device.type == "cuda" else "gloo"  # nccl needs GPUs
    init_from_environment(backend, run_opts.get("device"))
