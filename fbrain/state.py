"""``TrainState``: everything a training run knows, as one immutable value.

A state is a frozen dataclass registered as a pytree, so ``tree_map``,
``torch.compile`` and ``vmap`` see straight through it. Pure step functions
take a state and return the next one; nothing in a state is ever modified in
place.

Example::

    >>> import torch
    >>> from fbrain import TrainState, optim
    >>> model = torch.nn.Linear(3, 1)
    >>> state = TrainState.create(model, optim.sgd(lr=0.1))
    >>> sorted(state.params)
    ['bias', 'weight']
    >>> state.params["weight"] is model.weight
    False
    >>> int(state.replace(counters=state.counters._replace(epoch=torch.tensor(3))).counters.epoch)
    3
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import torch

from fbrain import rng as _rng
from fbrain.loss_scale import DynamicLossScale, LossScaleState
from fbrain.optim.base import GradientTransformation, frozen_names
from fbrain.optim.hyperparams import Static
from fbrain.torch_compat import flatten_one_level
from fbrain.tree import device_of, register_dataclass, tree_map


class Counters(NamedTuple):
    """Progress counters, all int64 tensors so a step can advance them on the device.

    ``step`` counts gradient applications (:func:`fbrain.update.apply_gradients`: one per train
    step, one per ``optimizer.step()`` of an imperative recipe), ``optimizer_step`` those that
    were applied; ``nonfinite_count`` counts steps skipped for a non-finite loss
    or gradient, ``nonfinite_streak`` those in a row (reset by a finite step). In fp16, a
    step skipped only because the scaled gradients overflowed (finite loss) is the loss
    scale backing off, not a non-finite step: it advances neither count.
    """

    step: torch.Tensor
    optimizer_step: torch.Tensor
    epoch: torch.Tensor
    nonfinite_count: torch.Tensor
    nonfinite_streak: torch.Tensor

    @classmethod
    def zeros(cls, device=None) -> "Counters":
        return cls(*(torch.zeros((), dtype=torch.int64, device=device) for _ in cls._fields))


@register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Parameters, buffers, optimizer state, loss scale, counters and RNG key.

    ``params`` and ``buffers`` are keyed like ``module.named_parameters()`` and
    ``module.named_buffers()``. ``rng`` stays on the CPU whatever the device of
    the rest (see :mod:`fbrain.rng`).
    """

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt_state: Any
    scaler: LossScaleState
    counters: Counters
    rng: torch.Tensor

    @classmethod
    def create(
        cls,
        module: torch.nn.Module,
        optimizer: GradientTransformation,
        *,
        seed: int = 0,
        loss_scale: DynamicLossScale = DynamicLossScale(),
    ) -> "TrainState":
        """Copy ``module``'s parameters and buffers into a new state (never aliases).

        The state keeps no ``requires_grad`` flag: a step trains every parameter its optimizer does
        not freeze. Parameters with ``requires_grad=False`` that ``optimizer`` trains get a warning;
        freeze them with ``optim.partition`` and ``optim.frozen`` (see :func:`fbrain.make_train_step`).
        """
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(optimizer, GradientTransformation):
            raise TypeError(
                "optimizer: expected an fbrain.optim.GradientTransformation "
                f"(e.g. optim.adam(1e-3)), got {type(optimizer).__name__}; "
                "wrap a torch.optim constructor with optim.from_torch(...)"
            )
        params = {name: p.detach().clone() for name, p in module.named_parameters()}
        for name, p in params.items():
            if not p.is_floating_point():
                raise TypeError(f"params[{name!r}]: expected a floating-point tensor, got dtype {p.dtype}")
        buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        device = device_of(params)
        opt_state = optimizer.init(params)
        _warn_if_trained_against_requires_grad(module, optimizer, params)
        return cls(
            params=params,
            buffers=buffers,
            opt_state=opt_state,
            scaler=loss_scale.init(device),
            counters=Counters.zeros(device),
            rng=_rng.new_key(seed),
        )

    def replace(self, **changes) -> "TrainState":
        """A copy with some fields replaced (the fields themselves are shared, not copied)."""
        # Not dataclasses.replace: it reads the class's field table, which torch.compile then
        # re-checks in Python before every call of a compiled step.
        unknown = [name for name in changes if name not in _FIELDS]
        if unknown:
            raise TypeError(f"TrainState.replace: unknown fields {sorted(unknown)}; fields are {list(_FIELDS)}")
        return type(self)(*(changes[f] if f in changes else getattr(self, f) for f in _FIELDS))

    def to(self, device: torch.device | str) -> "TrainState":
        """The same state with every tensor on ``device`` (the RNG key stays on the CPU)."""
        moved = tree_map(
            lambda x: x.to(device) if isinstance(x, torch.Tensor) else x,
            self.replace(rng=None),
        )
        return moved.replace(rng=self.rng)

    @property
    def step(self) -> torch.Tensor:
        return self.counters.step


def _warn_if_trained_against_requires_grad(module: torch.nn.Module, optimizer: GradientTransformation,
                                           params: dict[str, torch.Tensor]) -> None:
    off = [name for name, p in module.named_parameters() if not p.requires_grad]
    trained = sorted(set(off) - frozen_names(optimizer, params)) if off else []
    if trained:
        warnings.warn(
            f"TrainState.create: params {trained} have requires_grad=False, but the optimizer trains them: a "
            "TrainState keeps no requires_grad flag, and a step trains every parameter its optimizer does not "
            "freeze. To keep them as they are, freeze them in the optimizer: optim.partition({'train': opt, "
            "'frozen': optim.frozen()}, lambda name: 'frozen' if name in names else 'train')",
            UserWarning, stacklevel=3)


def check_state(state: Any) -> None:
    """Raise a precise error if ``state`` is not a usable TrainState (host-side metadata only)."""
    if not isinstance(state, TrainState):
        raise TypeError(f"state: expected an fbrain.TrainState, got {type(state).__name__}")
    for name, p in state.params.items():
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            what = f"dtype {p.dtype}" if isinstance(p, torch.Tensor) else type(p).__name__
            raise TypeError(f"params[{name!r}]: expected a floating-point tensor, got {what}")


def _layout(tree: Any) -> Any:
    """A hashable value that is the same for two trees exactly when they have the same structure
    (node types, dict keys, lengths) and their tensors the same shapes and dtypes: the values of
    the tensors and of ``Static`` hyperparameters aside. Plain containers are walked here, at a
    fraction of the pytree machinery's cost (it runs every step)."""
    kind = type(tree)
    if kind is dict:
        return tuple(tree), tuple([_layout(v) for v in tree.values()])
    if isinstance(tree, torch.Tensor):
        return tree.shape, tree.dtype
    if kind is Static:
        return Static
    if isinstance(tree, (tuple, list)):  # named tuples included: their type is part of the layout
        return kind, tuple([_layout(v) for v in tree])
    node = flatten_one_level(tree)  # another registered node, or a leaf
    return kind if node is None else (kind, tuple([_layout(v) for v in node[1]]))


def check_opt_state(state: TrainState, optimizer: GradientTransformation, accepted: dict) -> None:
    """Raise a precise error unless ``state.opt_state`` is laid out as ``optimizer.init(state.params)``
    would lay it out: the same optimizer (the same node types and keys) and, for every tensor kept
    per parameter, that parameter's shape and dtype. A fused kernel given moments of another shape
    reads and writes out of bounds, so this runs before any kernel does.

    The expected layout is ``optimizer.init`` on meta tensors (no memory, no arithmetic). The layouts
    accepted so far are kept in ``accepted`` (keyed by the layouts' values, never by identity), so a
    step with a layout seen before costs one walk over the state's structure.
    """
    key = (_layout(state.params), _layout(state.opt_state))
    if key in accepted:
        return
    try:
        expected = optimizer.init({n: torch.empty_like(p, device="meta") for n, p in state.params.items()})
    except Exception:  # noqa: BLE001 - an init that reads values (meta tensors have none): not checkable
        expected = None
    if expected is not None:
        problem = _difference(expected, state.opt_state, "state.opt_state", set(state.params), None)
        if problem is not None:
            raise ValueError(problem)
    if len(accepted) >= 16:  # a bounded record: a few layouts per step are usual
        accepted.clear()
    accepted[key] = True


_OTHER_OPTIMIZER = ("the state was made by another optimizer: build the step with the optimizer the state was "
                    "created with, or create the state with this one (TrainState.create(model, opt))")
_OTHER_PARAMS = ("the optimizer state was made for other parameters: rebuild it with TrainState.create(model, opt) "
                 "or opt.init(params)")


def _difference(want: Any, got: Any, path: str, names: set, param: str | None) -> str | None:
    """The first place where ``got`` is not laid out as ``want``, described, or None. ``param`` is the
    parameter the tensors under ``path`` belong to (the last dict key that names one)."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{path}: expected a tensor, got {type(got).__name__}; {_OTHER_OPTIMIZER}"
        of = f" for params[{param!r}]" if param is not None else ""
        if got.shape != want.shape:
            return f"{path}: expected shape {tuple(want.shape)}{of}, got {tuple(got.shape)}; {_OTHER_PARAMS}"
        # Dtypes of the per-parameter tensors only: hyperparameters are float32 on MPS, float64 elsewhere.
        if param is not None and got.dtype != want.dtype:
            return f"{path}: expected dtype {want.dtype}{of}, got {got.dtype}; {_OTHER_PARAMS}"
        return None
    if type(want) is not type(got):
        return (f"{path}: expected {type(want).__name__} (the state this step's optimizer keeps), "
                f"got {type(got).__name__}; {_OTHER_OPTIMIZER}")
    if isinstance(want, dict):
        if list(want) != list(got):
            of_params = want and got and (names & (set(want) | set(got)))
            return (f"{path}: expected the keys {list(want)}{' (for state.params)' if of_params else ''}, "
                    f"got {list(got)}; {_OTHER_PARAMS if of_params else _OTHER_OPTIMIZER}")
        children = [(f"[{k!r}]", k, want[k], got[k]) for k in want]
    elif isinstance(want, (tuple, list)):
        if len(want) != len(got):
            return f"{path}: expected {len(want)} entries, got {len(got)}; {_OTHER_OPTIMIZER}"
        at = [f".{f}" for f in want._fields] if hasattr(want, "_fields") else [f"[{i}]" for i in range(len(want))]
        children = [(suffix, None, w, g) for suffix, w, g in zip(at, want, got)]
    else:
        want_node, got_node = flatten_one_level(want), flatten_one_level(got)
        if want_node is None or got_node is None:
            return None  # leaves that are not tensors (numbers, None): their values may differ
        if len(want_node[1]) != len(got_node[1]):
            return f"{path}: expected {len(want_node[1])} entries, got {len(got_node[1])}; {_OTHER_OPTIMIZER}"
        children = [(f"[{i}]", None, w, g) for i, (w, g) in enumerate(zip(want_node[1], got_node[1]))]
    for suffix, key, w, g in children:
        problem = _difference(w, g, path + suffix, names, key if key in names else param)
        if problem is not None:
            return problem
    return None


_FIELDS = tuple(f.name for f in dataclasses.fields(TrainState))
