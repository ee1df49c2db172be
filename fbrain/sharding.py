"""Sharded optimizer state (ZeRO): under data parallelism each rank keeps and updates 1/N of it.

**Layout.** Every trainable parameter ``p`` (``n`` elements) is flattened and padded with zeros to
``N * c`` elements, ``c = ceil(n / N)``; rank ``r`` owns elements ``[r * c, (r + 1) * c)`` of every
parameter. Its shard of ``p``, of ``p``'s gradient and of every per-parameter tensor of the optimizer
state is that slice. fbrain's optimizers are elementwise, so the optimizer runs on ``{name: shard}``
as on whole parameters and a shard's update is the slice of the replicated update (the padding has
zero gradients and stays zero): bit for bit with the multi-tensor arithmetic; ATen's fused CPU
kernels round an element by its position in the tensor (vector body or tail), so with them a slice
may differ in the last bit. Each rank then holds 1/N of the optimizer state (Adam's
two moments), and of the averaged gradients.

**One step** (:func:`sharded_apply_gradients`, inside the pure train step):

1. the rank's gradients, laid out rank-major in buckets of bounded size (:func:`buckets`; a large
   parameter is a bucket of its own, with no copy): ``reduce_scatter`` (sum) gives each rank the
   sums of its slices, divided by N: the same mean as the replicated all-reduce (on gloo, an
   all-reduce of which the rank keeps its part: faster there);
2. one small all-reduce of ``[loss, sum of squares of the rank's gradient slices]``: the mean loss and
   the global gradient norm, so skipping a non-finite step and clipping stay global decisions;
3. :func:`fbrain.update.apply_gradients` on the shards (the one update path);
4. an ``all_gather`` of the new parameter slices per bucket rebuilds every parameter on every rank.

The global norm is summed in another order than the replicated path's, so clipping may differ from
it in the last bit (within 1e-6 over 20 steps, tested).

Example (inside a process group; see tests/test_sharding.py for a torchrun launch)::

    step = fbrain.make_train_step(loss_fn, opt, process_group=group, shard_optimizer_state=True)
    state = fbrain.TrainState.create(model, fbrain.sharding.initialising_shards(opt, group))
    # or, from a whole state (a checkpoint): fbrain.sharding.shard_state(state, opt, group)
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist

from fbrain.optim import _foreach as fe
from fbrain.optim.base import frozen_names
from fbrain.state import TrainState
from fbrain.distributed import mean_across_ranks
from fbrain.torch_compat import funcol, pytree
from fbrain.tree import device_of, tree_map
from fbrain.update import UpdateRule, apply_gradients, unscale


class ShardLayout(NamedTuple):
    """Which slice of each trainable parameter one rank owns (see the module's doc)."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    chunks: tuple[int, ...]  # elements of each parameter per rank
    world: int
    rank: int

    @staticmethod
    def of(params: dict[str, torch.Tensor], names, world: int, rank: int) -> "ShardLayout":
        names = tuple(names)
        shapes = tuple(params[n].shape for n in names)
        return ShardLayout(names, shapes, tuple(math.ceil(math.prod(s) / world) for s in shapes), world, rank)

    def numel(self, i: int) -> int:
        return math.prod(self.shapes[i])


def group_layout(params: dict[str, torch.Tensor], names, group) -> ShardLayout:
    """The layout of ``names`` for this rank of ``group``."""
    return ShardLayout.of(params, names, dist.get_world_size(group), dist.get_rank(group))


def _padded_rows(t: torch.Tensor, chunk: int, world: int) -> torch.Tensor:
    """``t`` flattened, zero-padded to ``world * chunk``, as ``(world, chunk)`` rows (rank r: row r)."""
    flat = t.reshape(-1)
    pad = world * chunk - flat.numel()
    return (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(world, chunk)


def shard(tree: dict[str, torch.Tensor], layout: ShardLayout) -> dict[str, torch.Tensor]:
    """This rank's slice of each of ``layout.names`` in ``tree`` (1-D tensors, their own memory)."""
    return {n: _padded_rows(tree[n], c, layout.world)[layout.rank].clone()
            for n, c in zip(layout.names, layout.chunks)}


def unshard(shards: list[dict[str, torch.Tensor]], layout: ShardLayout) -> dict[str, torch.Tensor]:
    """The whole tensors from every rank's slices (``shards[r]``: rank r's), padding dropped."""
    return {n: torch.cat([s[n] for s in shards])[:layout.numel(i)].view(layout.shapes[i])
            for i, n in enumerate(layout.names)}


def _per_parameter(names: frozenset, fn: Callable[..., Any], tree: Any, *others: Any) -> Any:
    """``tree`` with ``fn(name, leaf, *other_leaves)`` applied to every tensor stored under a
    parameter's name in a dict (an optimizer state's per-parameter tensors: Adam's ``mu[name]``, the
    adaptive twins' ``slots[key][name]``, EMA's averages), ``others`` being trees of the same
    structure; everything else (counts, hyperparameters) is ``tree``'s, as it is."""
    def visit(path, leaf, *other_leaves):
        name = getattr(path[-1], "key", None) if path else None  # a dict's key (MappingKey)
        if isinstance(leaf, torch.Tensor) and name in names:
            return fn(name, leaf, *other_leaves)
        return leaf
    return pytree.tree_map_with_path(visit, tree, *others)


def shard_opt_state(opt_state: Any, layout: ShardLayout) -> Any:
    """``opt_state`` (of the whole parameters) with each per-parameter tensor cut to this rank's slice."""
    shapes = dict(zip(layout.names, layout.shapes))
    chunks = dict(zip(layout.names, layout.chunks))

    def cut(name, leaf):
        if not isinstance(leaf, torch.Tensor) or leaf.shape != shapes[name]:
            return leaf  # a per-parameter scalar (NAdam's mu_product): the same on every rank
        return _padded_rows(leaf, chunks[name], layout.world)[layout.rank].clone()

    return _per_parameter(frozenset(layout.names), cut, opt_state)


def unshard_opt_state(opt_states: list[Any], layout: ShardLayout) -> Any:
    """The optimizer state of the whole parameters from every rank's sharded one (``opt_states[r]``)."""
    index = {n: i for i, n in enumerate(layout.names)}

    def join(name, *leaves):
        i = index[name]
        if all(x.shape == (layout.chunks[i],) for x in leaves):
            return torch.cat(leaves)[:layout.numel(i)].view(layout.shapes[i])
        return leaves[0]  # a per-parameter scalar, the same on every rank

    return _per_parameter(frozenset(layout.names), join, *opt_states)


def shard_state(state: TrainState, optimizer, group) -> TrainState:
    """``state`` with its optimizer state cut to this rank's shard (the parameters stay whole).
    Refuses an optimizer that is not elementwise (see :func:`require_elementwise`)."""
    layout = _trainable_layout(state, optimizer, group)
    require_elementwise(optimizer, layout.names)
    dtypes = {state.params[n].dtype for n in layout.names}
    if len(dtypes) > 1:
        raise ValueError(f"shard_optimizer_state: the trainable parameters have several dtypes {sorted(map(str, dtypes))}; "
                         "the sharded buckets need one (cast the model, or use the replicated step)")
    return state.replace(opt_state=shard_opt_state(state.opt_state, layout))


def initialising_shards(optimizer, group):
    """``optimizer`` whose ``init`` makes this rank's shard of its state directly, never the whole
    state: ``TrainState.create(model, initialising_shards(opt, group))`` is ``shard_state`` of the
    whole one without holding it (equal on every real element; the padding may differ, and is
    never read)."""
    def init(params):
        frozen = frozen_names(optimizer, params)
        layout = group_layout(params, [n for n in params if n not in frozen], group)
        require_elementwise(optimizer, layout.names)
        return optimizer.init({**{n: p for n, p in params.items() if n in frozen}, **shard(params, layout)})
    return optimizer._replace(init=init)


def require_elementwise(optimizer, names) -> None:
    """Raise unless ``optimizer`` updates every element from that element alone, which sharding
    needs: probed with two-element stand-ins for the parameters, updated whole and in halves.
    (``optim.clip_by_global_norm`` inside the optimizer is not: clip with the step's
    ``max_grad_norm``, which stays global.)"""
    g = torch.Generator().manual_seed(0)
    params = {n: torch.randn(2, generator=g, dtype=torch.float64) for n in names}
    grads = {n: 100 * torch.randn(2, generator=g, dtype=torch.float64) for n in names}
    whole, _ = optimizer.update(grads, optimizer.init(params), params)
    for half in (slice(0, 1), slice(1, 2)):
        p, gr = {n: t[half].clone() for n, t in params.items()}, {n: t[half].clone() for n, t in grads.items()}
        part, _ = optimizer.update(gr, optimizer.init(p), p)
        for n in part:
            if not torch.allclose(part[n], whole[n][half], rtol=1e-6, atol=1e-12):
                raise ValueError(f"shard_optimizer_state: the optimizer's update of {n!r} depends on other elements "
                                 "(e.g. optim.clip_by_global_norm inside it); a shard cannot compute it. Clip with "
                                 "max_grad_norm (global across the ranks) instead")


def _trainable_layout(state: TrainState, optimizer, group) -> ShardLayout:
    frozen = frozen_names(optimizer, state.params)
    return group_layout(state.params, [n for n in state.params if n not in frozen], group)


def whole_shaped(state: TrainState, optimizer, group) -> TrainState:
    """``state`` (sharded) with each per-parameter optimizer tensor replaced by an empty one of the
    whole parameter's shape: the template a whole optimizer state (a checkpoint) is read into."""
    layout = _trainable_layout(state, optimizer, group)
    shapes, chunks = dict(zip(layout.names, layout.shapes)), dict(zip(layout.names, layout.chunks))

    def grow(name, leaf):
        if isinstance(leaf, torch.Tensor) and leaf.shape == (chunks[name],):
            return leaf.new_empty(shapes[name])
        return leaf

    return state.replace(opt_state=_per_parameter(frozenset(layout.names), grow, state.opt_state))


def gather_opt_state(state: TrainState, optimizer, group) -> TrainState:
    """``state`` with the whole optimizer state, gathered from every rank's shard (on the CPU). A
    collective: every rank of ``group`` calls it, and every rank gets the whole state."""
    layout = _trainable_layout(state, optimizer, group)
    mine = tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, state.opt_state)
    gathered: list = [None] * layout.world
    dist.all_gather_object(gathered, mine, group=group)
    whole = unshard_opt_state(gathered, layout)
    device = device_of(state.params)  # where the optimizer state lives (as optimizer.init puts it)
    return state.replace(opt_state=tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, whole))


def shards_record(state: TrainState, optimizer, group) -> dict:
    """What reads the per-rank shard files of ``state.opt_state`` back (a checkpoint stores it
    beside the rest of the state): the number of ranks and the sharded parameters, in order."""
    layout = _trainable_layout(state, optimizer, group)
    return {"world": layout.world, "names": list(layout.names)}


def read_opt_state_shards(saved: TrainState, record: Any, folder) -> TrainState:
    """``saved`` (its ``opt_state`` left out) with the whole optimizer state joined from the shard
    files in ``folder`` that ``record`` (:func:`shards_record`) describes, whatever the number of
    ranks reading it: the caller cuts it again for its own ranks (:func:`shard_state`)."""
    from fbrain.checkpoint import CheckpointError, shards

    names = record.get("names") if isinstance(record, dict) else None
    if not isinstance(saved, TrainState) or not isinstance(names, list) or \
            not all(isinstance(n, str) and n in saved.params for n in names) or len(set(names)) != len(names):
        raise CheckpointError(f"{folder}: the record of the optimizer state's shards is damaged ({record!r:.80})")
    world = shards.check_world(record.get("world"), str(folder))
    parts = shards.read(folder, world)
    layout = ShardLayout.of(saved.params, names, world, 0)
    try:
        return saved.replace(opt_state=unshard_opt_state(parts, layout))
    except (RuntimeError, TypeError, ValueError) as err:  # shard files of different states
        raise CheckpointError(f"{folder}: the ranks' shard files do not fit together ({err})") from None


# -- the step --------------------------------------------------------------------------------------

BUCKET_ELEMENTS = 1 << 22  # the default cap per rank: a collective's buffer stays under world * 16 MB (float32)


def checked_bucket_elements(cap) -> int:
    """``cap`` if it is a valid bucket size (an int >= 1), else a ValueError naming it."""
    if not (isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1):
        raise ValueError(f"bucket_elements: expected an int >= 1 (elements per rank in one collective), got {cap!r}")
    return cap


def buckets(layout: ShardLayout, cap: int = BUCKET_ELEMENTS) -> list[tuple[int, ...]]:
    """The parameters (indices, in order) that travel together in one collective: consecutive ones
    up to ``cap`` elements per rank; a larger parameter travels alone, and then needs no copy into
    or out of a bucket (the collectives read and write its own memory). ``cap`` is checked once, where
    the step is made (:func:`checked_bucket_elements`)."""
    groups: list[list[int]] = []
    size = 0
    for i, chunk in enumerate(layout.chunks):
        if not groups or size + chunk > cap:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += chunk
    return [tuple(g) for g in groups]


def reduce_scatter_mean(grads: dict[str, torch.Tensor], layout: ShardLayout, group,
                        cap: int = BUCKET_ELEMENTS) -> dict[str, torch.Tensor]:
    """The mean over the ranks of ``grads``, this rank's slices only: one reduce-scatter per bucket.

    On gloo (CPU) a whole-bucket all-reduce, of which the rank keeps its row, replaces the
    reduce-scatter: gloo's reduce-scatter takes twice its all-reduce's time (400 MB on this machine:
    740 ms against 360 ms), and the sums are the replicated step's own."""
    whole_sums = dist.get_backend(group) == "gloo"
    mine: dict[str, torch.Tensor] = {}
    for bucket in buckets(layout, cap):
        names = [layout.names[i] for i in bucket]
        rows = torch.cat([_padded_rows(grads[n], layout.chunks[i], layout.world) for n, i in zip(names, bucket)], dim=1) \
            if len(bucket) > 1 else _padded_rows(grads[names[0]], layout.chunks[bucket[0]], layout.world)
        if whole_sums:
            summed = funcol.wait_tensor(funcol.all_reduce(rows.reshape(-1), "sum", group)).view(layout.world, -1)[layout.rank]
        else:
            summed = funcol.wait_tensor(funcol.reduce_scatter_tensor(rows.reshape(-1), "sum", 0, group))
        mine.update(zip(names, torch.split(summed / layout.world, [layout.chunks[i] for i in bucket])))
    return mine


def all_gather_params(shards: dict[str, torch.Tensor], layout: ShardLayout, group,
                      cap: int = BUCKET_ELEMENTS) -> dict[str, torch.Tensor]:
    """Every parameter whole again from every rank's slices: one all-gather per bucket."""
    whole: dict[str, torch.Tensor] = {}
    for bucket in buckets(layout, cap):
        names = [layout.names[i] for i in bucket]
        mine = torch.cat([shards[n] for n in names]) if len(bucket) > 1 else shards[names[0]]
        rows = funcol.wait_tensor(funcol.all_gather_tensor(mine, 0, group)).view(layout.world, -1)
        parts = torch.split(rows, [layout.chunks[i] for i in bucket], dim=1) if len(bucket) > 1 else (rows,)
        for i, n, part in zip(bucket, names, parts):
            whole[n] = part.reshape(-1)[:layout.numel(i)].view(layout.shapes[i])
    return whole


def sharded_apply_gradients(state: TrainState, grads: dict[str, torch.Tensor], loss: torch.Tensor,
                            rule: UpdateRule, group, buffers=None,
                            bucket_elements: int = BUCKET_ELEMENTS) -> tuple[TrainState, dict, torch.Tensor]:
    """The data-parallel update with sharded optimizer state (see the module's doc): ``(new state,
    metrics, mean loss)``. ``state.opt_state`` is this rank's shard; the parameters are whole; the
    collectives carry at most ``bucket_elements`` elements per rank each (see :func:`buckets`)."""
    if not grads:  # nothing trainable: only the loss to average
        _, mean_loss = mean_across_ranks({}, loss, group)
        new, metrics = apply_gradients(state, grads, rule, loss=mean_loss, buffers=buffers)
        return new, metrics, mean_loss
    layout = group_layout(state.params, list(grads), group)
    mine = reduce_scatter_mean(grads, layout, group, bucket_elements)
    if rule.fp16:
        mine = unscale(mine, state.scaler)
    squares = torch.stack([n * n for n in fe.norm(list(mine.values()))]).sum() if mine else loss.new_zeros(())
    totals = funcol.wait_tensor(funcol.all_reduce(torch.stack([loss.detach().to(squares.dtype), squares]), "sum", group))
    mean_loss, grad_norm = (totals[0] / layout.world).to(loss.dtype), totals[1].sqrt()
    sharded = state.replace(params={**state.params, **shard(state.params, layout)})
    new, metrics = apply_gradients(sharded, mine, rule, loss=mean_loss, buffers=buffers, scaled=False,
                                   grad_norm=grad_norm)
    whole = all_gather_params({n: new.params[n] for n in layout.names}, layout, group, bucket_elements)
    return new.replace(params={**new.params, **whole}), metrics, mean_loss
