"""Batches and data loaders with SpeechBrain's interface and a reproducible order.

* :class:`PaddedBatch` collates examples (dicts) into padded tensors with relative lengths:
  ``batch.sig.data``, ``batch.sig.lengths`` (also ``wavs, lens = batch.sig``), non-tensor fields as
  lists (``batch.id``) and ``batch.to(device)``, like ``speechbrain.dataio.batch.PaddedBatch``.
* :func:`make_dataloader` builds a ``DataLoader`` whose shuffling (and the loader's own base seed)
  come from a private seeded generator, never from the global RNG: the order of epoch ``e`` is a
  function of ``(seed, e)`` alone, so it is reproducible and survives a restart.

Example::

    >>> import torch
    >>> from fbrain.data import PaddedBatch
    >>> batch = PaddedBatch([{"id": "a", "sig": torch.ones(2)}, {"id": "b", "sig": torch.ones(4)}])
    >>> wavs, lens = batch.sig
    >>> batch.id, tuple(wavs.shape), lens.tolist()
    (['a', 'b'], (2, 4), [0.5, 1.0])
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate, default_convert

from fbrain import distributed as _distributed
from fbrain.torch_compat import register_pytree_node
from fbrain.tree import tree_map


class PaddedData(NamedTuple):
    """A padded tensor and the relative length (0..1] of each example along its first axis."""

    data: torch.Tensor
    lengths: torch.Tensor


def pad_right(tensors: Sequence[torch.Tensor], key: str = "?", value: float = 0) -> PaddedData:
    """Stack tensors that differ only in their first dimension, padding it on the right with ``value``."""
    first = tensors[0]
    for i, t in enumerate(tensors):
        if t.ndim != first.ndim or t.shape[1:] != first.shape[1:]:
            raise ValueError(
                f"PaddedBatch: field {key!r} cannot be padded: example 0 has shape {tuple(first.shape)}, "
                f"example {i} has shape {tuple(t.shape)}; only the first dimension may differ "
                "(pad or crop the trailing dimensions in the dataset, or exclude the field with padded_keys)"
            )
    if first.ndim == 0:
        return PaddedData(torch.stack(list(tensors)), torch.ones(len(tensors)))
    longest = max(t.shape[0] for t in tensors)
    out = first.new_full((len(tensors), longest, *first.shape[1:]), value)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    # Relative lengths, as SpeechBrain's models expect; a batch of empty tensors has length 1.
    lengths = torch.tensor([t.shape[0] / longest if longest else 1.0 for t in tensors])
    return PaddedData(out, lengths)


def _collate_plain(values: list) -> Any:
    """Stack what torch's default collate can stack; keep anything else as a list."""
    try:
        return default_collate(values)
    except (TypeError, RuntimeError):
        return values


class PaddedBatch:
    """A batch of example dicts: tensors padded (:class:`PaddedData`), other fields in lists.

    Args:
        examples: a list of dicts with the same keys.
        padded_keys: the keys to pad (default: every key whose values are tensors).
        device_prep_keys: the keys ``to()``/``pin_memory()`` move (default: the tensor-valued ones).
        padding_kwargs: ``{"value": v}`` for all padded keys; ``per_key_padding_kwargs`` per key.
    """

    def __init__(self, examples: Sequence[dict], padded_keys=None, device_prep_keys=None,
                 padding_kwargs=None, per_key_padding_kwargs=None, apply_default_convert=True,
                 nonpadded_stack=True):
        if not examples:
            raise ValueError("PaddedBatch: expected at least one example, got an empty list")
        if not all(isinstance(e, dict) for e in examples):
            bad = next(type(e).__name__ for e in examples if not isinstance(e, dict))
            raise TypeError(f"PaddedBatch: expected examples that are dicts, got a {bad}")
        keys = list(examples[0].keys())
        for i, e in enumerate(examples):
            if list(e.keys()) != keys:
                raise KeyError(f"PaddedBatch: example {i} has keys {list(e.keys())}, example 0 has {keys}")
        padding_kwargs = padding_kwargs or {}
        per_key_padding_kwargs = per_key_padding_kwargs or {}
        self._keys, self._length, self._device_keys = keys, len(examples), []
        for key in keys:
            values = [e[key] for e in examples]
            if apply_default_convert:
                values = default_convert(values)  # numpy arrays -> tensors
            is_tensor = isinstance(values[0], torch.Tensor)
            if (padded_keys is None and is_tensor) or (padded_keys is not None and key in padded_keys):
                if not all(isinstance(v, torch.Tensor) for v in values):
                    raise TypeError(f"PaddedBatch: field {key!r} is to be padded but not all its values are tensors")
                value = pad_right(values, key, **per_key_padding_kwargs.get(key, padding_kwargs))
            else:
                value = _collate_plain(values) if nonpadded_stack else values
            setattr(self, key, value)
            if (device_prep_keys is None and is_tensor) or (device_prep_keys is not None and key in device_prep_keys):
                self._device_keys.append(key)

    def __len__(self) -> int:
        return self._length

    @property
    def batchsize(self) -> int:
        return self._length

    def keys(self) -> list[str]:
        return list(self._keys)

    def __getitem__(self, key: str):
        if key not in self._keys:
            raise KeyError(f"PaddedBatch has no field {key!r}; fields: {self._keys}")
        return getattr(self, key)

    def __iter__(self) -> Iterator:
        return (getattr(self, key) for key in self._keys)

    def at_position(self, pos: int):
        return getattr(self, self._keys[pos])

    def _map_device_fields(self, fn) -> "PaddedBatch":
        for key in self._device_keys:
            setattr(self, key, tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x,
                                               getattr(self, key)))
        return self

    def to(self, *args, **kwargs) -> "PaddedBatch":
        """Move/cast the tensor fields in place (``torch.Tensor.to``'s arguments); returns self."""
        return self._map_device_fields(lambda t: t.to(*args, **kwargs))

    def pin_memory(self) -> "PaddedBatch":
        return self._map_device_fields(torch.Tensor.pin_memory)

    def __repr__(self) -> str:
        return f"PaddedBatch(batchsize={self._length}, keys={self._keys})"


def _flatten(batch: PaddedBatch):
    return [getattr(batch, k) for k in batch._keys], (tuple(batch._keys), batch._length, tuple(batch._device_keys))


def _unflatten(values, context) -> PaddedBatch:
    keys, length, device_keys = context
    out = PaddedBatch.__new__(PaddedBatch)
    out._keys, out._length, out._device_keys = list(keys), length, list(device_keys)
    for k, v in zip(keys, values):
        setattr(out, k, v)
    return out


# A pytree node, so steps, stack_micro_batches and tree_map see the tensors inside a batch.
register_pytree_node(PaddedBatch, _flatten, _unflatten, "fbrain.data.PaddedBatch")


def wants_padded_batch(dataset: Any) -> bool:
    """True for datasets whose examples are dicts to pad: SpeechBrain's DynamicItemDataset
    (recognised by name, without importing speechbrain) and datasets that declare
    ``fbrain_padded_batch = True`` (fbrain's manifest datasets)."""
    if getattr(dataset, "fbrain_padded_batch", False):
        return True
    return any(cls.__name__ == "DynamicItemDataset" and cls.__module__.startswith("speechbrain")
               for cls in type(dataset).__mro__)


class SeededShuffleSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``seed + epoch`` (call :meth:`set_epoch`)."""

    def __init__(self, data_source, seed: int):
        self.data_source, self.seed, self.epoch = data_source, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())

    def __len__(self) -> int:
        return len(self.data_source)


class ShardedBatchSampler(Sampler[list]):
    """One rank's share of a batch sampler's batches under torchrun: batches ``rank``,
    ``rank + world``, ``rank + 2 * world`` ... of each epoch's list.

    Any batch sampler (SpeechBrain's ``DynamicBatchSampler`` included) is sharded: every rank builds
    the same list of batches for the epoch (the wrapped sampler's ``set_epoch`` is forwarded, so its
    own seeded shuffle agrees across ranks), so no example is seen by two ranks. Every rank gets the
    same number of steps: when the batches do not divide evenly the list is padded by repeating its
    first batches (SpeechBrain's ``DistributedSamplerWrapper`` does the same), or, with
    ``drop_last=True``, the remainder is dropped.

    Example::

        >>> sampler = ShardedBatchSampler([[0, 1], [2], [3, 4], [5]], num_replicas=2, rank=1)
        >>> list(sampler), len(sampler)
        ([[2], [5]], 2)
    """

    def __init__(self, batch_sampler, num_replicas: int, rank: int, drop_last: bool = False):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"ShardedBatchSampler: rank {rank} outside 0..{num_replicas - 1}")
        self.batch_sampler, self.num_replicas, self.rank, self.drop_last = batch_sampler, num_replicas, rank, drop_last

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def _steps(self, total: int) -> int:
        return total // self.num_replicas if self.drop_last else -(-total // self.num_replicas)

    def __iter__(self):
        batches = list(self.batch_sampler)
        steps = self._steps(len(batches))
        if not batches:
            return iter([])
        padded = (batches * (1 + (steps * self.num_replicas) // len(batches)))[:steps * self.num_replicas]
        return iter(padded[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return self._steps(len(self.batch_sampler))


def make_dataloader(dataset: Any, *, train: bool = False, seed: int = 0, sorting: str | None = None,
                    **loader_kwargs) -> tuple[DataLoader, Any]:
    """``(loader, train_sampler)`` with SpeechBrain's semantics and a private random stream.

    For ``train`` loaders ``shuffle=True`` becomes a :class:`SeededShuffleSampler` (or a
    ``DistributedSampler`` in a distributed run; a ``batch_sampler`` is sharded across the ranks by
    :class:`ShardedBatchSampler`); other loaders never shuffle unless given a
    sampler. In a distributed run the shards shuffle only when asked (``shuffle=True``, or the
    recipe's ``sorting`` is "random"); "ascending"/"descending" sorting keeps the order (SpeechBrain
    shuffles the shards unless ``sorting`` says otherwise, whatever ``shuffle`` says). The collate is :class:`PaddedBatch` for datasets :func:`wants_padded_batch` accepts
    and torch's default collate otherwise, unless ``collate_fn`` is given.
    """
    if isinstance(dataset, DataLoader):
        return dataset, None
    kwargs = dict(loader_kwargs)
    kwargs.pop("ckpt_prefix", None)
    sampler = None
    shuffle = kwargs.pop("shuffle", False)
    if train and not isinstance(dataset, IterableDataset):
        if _distributed.joined() and kwargs.get("batch_sampler") is not None:
            sampler = ShardedBatchSampler(kwargs["batch_sampler"], _distributed.world_size(None), _distributed.rank())
            kwargs["batch_sampler"] = sampler
        elif _distributed.joined():
            if kwargs.get("sampler") is not None:
                raise ValueError("make_dataloader: a custom sampler cannot be combined with a distributed run here")
            if sorting in ("ascending", "descending"):
                shuffle = False
            elif sorting == "random":
                shuffle = True
            sampler = torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed,
                                                          drop_last=kwargs.get("drop_last", False))
            kwargs["sampler"] = sampler
        elif shuffle:
            if kwargs.get("sampler") is not None:
                raise ValueError("make_dataloader: cannot specify both shuffle=True and a sampler")
            sampler = SeededShuffleSampler(dataset, seed)
            kwargs["sampler"] = sampler
    elif shuffle:
        kwargs["shuffle"] = True  # an explicit request on a non-train loader, as torch would take it
    if "collate_fn" not in kwargs and wants_padded_batch(dataset):
        kwargs["collate_fn"] = PaddedBatch
    # The loader draws a base seed for its workers on every iteration; from a private generator,
    # so iterating it never advances the global RNG.
    kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
    return DataLoader(dataset, **kwargs), sampler
