"""The optimizer interface: a pair of pure functions, ``init`` and ``update``.

Parameters, gradients and updates are flat dicts ``name -> Tensor`` keyed like
``module.named_parameters()``. ``update`` returns the *change* to add, and :func:`apply_updates`
adds it; :func:`apply` does both (with an optimizer's fused kernel where it has one) and keeps
everything as it was when told to skip.
Parameters that receive no gradient (frozen ones) are simply absent from the
``grads`` and ``updates`` dicts.

Example::

    >>> import torch
    >>> from fbrain import optim
    >>> opt = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(lr=0.5))
    >>> params = {"w": torch.tensor([1.0, 2.0])}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": torch.tensor([3.0, 4.0])}, state, params)
    >>> optim.apply_updates(params, updates)["w"]
    tensor([0.7000, 1.6000])
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch

from fbrain.optim import _foreach as fe
from fbrain.tree import device_of, select

Params = dict[str, torch.Tensor]
Updates = dict[str, torch.Tensor]
OptState = Any


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``.

    ``frozen(params) -> set of names`` (optional) names the parameters that
    must get no gradient at all; the train step leaves them out of the backward
    pass.

    ``apply(grads, state, params, skip, in_place=False) -> (new_params, new_state)`` (optional)
    is the whole update applied: ``update``, :func:`apply_updates`, and everything kept as it was
    where the 0-dim boolean ``skip`` is true. Optimizers define it to dispatch, behind this one
    signature, between a fused kernel and their ``update`` arithmetic (as ``torch.optim.adam``
    dispatches between fused, foreach and single-tensor code); ``chain``, ``partition`` and
    ``frozen`` compose it, so a fused kernel is kept inside them. Without it, :func:`apply` builds
    it from ``update``. ``in_place`` means the caller donated ``params``, ``state`` and ``grads``
    (a step's own): their tensors may be overwritten.
    """

    init: Callable[[Params], OptState]
    update: Callable[[Updates, OptState, Params], tuple[Updates, OptState]]
    frozen: Optional[Callable[[Params], frozenset]] = None
    apply: Optional[Callable[..., tuple[Params, OptState]]] = None


class EmptyState(NamedTuple):
    """State of a transformation that keeps none."""


def frozen_names(opt: GradientTransformation, params: Params) -> frozenset:
    """The parameter names ``opt`` wants left without gradients."""
    return frozenset() if opt.frozen is None else frozenset(opt.frozen(params))


def apply_updates(params: Params, updates: Updates) -> Params:
    """``params + updates`` for every name in ``updates``; other parameters are kept as they are."""
    unknown = updates.keys() - params.keys()
    if unknown:
        raise KeyError(f"apply_updates: updates for unknown parameters {sorted(unknown)}")
    names = [n for n in params if n in updates]
    summed = fe.add([params[n] for n in names], [updates[n] for n in names])
    return {**params, **dict(zip(names, summed))}


def apply(
    tx: GradientTransformation, grads: Updates, state: OptState, params: Params,
    skip: torch.Tensor | None = None, in_place: bool = False,
) -> tuple[Params, OptState]:
    """``(new params, new state)`` after ``tx`` takes one step with ``grads``; with ``skip`` (a 0-dim
    boolean tensor) true, params and state stay as they were (decided on the device).

    Example::

        >>> import torch
        >>> from fbrain import optim
        >>> opt, params = optim.sgd(lr=0.5), {"w": torch.tensor([1.0])}
        >>> new, _ = optim.apply(opt, {"w": torch.tensor([2.0])}, opt.init(params), params, torch.tensor(True))
        >>> new["w"]
        tensor([1.])
    """
    if skip is None:
        skip = torch.zeros((), dtype=torch.bool, device=device_of(params))
    if tx.apply is not None:
        return tx.apply(grads, state, params, skip, in_place)
    return apply_with_update(tx.update, grads, state, params, skip)


def apply_with_update(update: Callable, grads: Updates, state: OptState, params: Params,
                      skip: torch.Tensor) -> tuple[Params, OptState]:
    """The general ``apply``: ``update``, then :func:`apply_updates`, then a ``torch.where`` per tensor
    that keeps the old values where ``skip``."""
    updates, new_state = update(grads, state, params)
    return unless_skipped(skip, apply_updates(params, updates), new_state, params, state, list(updates))


def unless_skipped(skip: torch.Tensor, new_params: Params, new_state: OptState, params: Params,
                   state: OptState, changed: list[str]) -> tuple[Params, OptState]:
    """``(new_params, new_state)``, or ``(params, state)`` where the 0-dim ``skip`` is true: one
    ``torch.where`` per tensor that may have changed (the ``changed`` parameters and the state)."""
    keep = ~skip
    return ({**params, **select(keep, {n: new_params[n] for n in changed}, {n: params[n] for n in changed})},
            select(keep, new_state, state))


def identity() -> GradientTransformation:
    """Passes gradients through unchanged (a building block for ``chain`` and ``partition``)."""
    return GradientTransformation(lambda params: EmptyState(), lambda g, s, p=None: (g, s))


def frozen() -> GradientTransformation:
    """Parameters under this transformation are not trained: no gradient, no state."""
    return GradientTransformation(
        init=lambda params: EmptyState(),
        update=lambda grads, state, params=None: ({}, state),
        frozen=lambda params: frozenset(params),
        apply=lambda grads, state, params, skip, in_place=False: (params, state),
    )


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transformations one after another, each to the previous one's output."""
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"chain: argument {i} is a {type(t).__name__}, expected a GradientTransformation")

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(grads, state, params=None):
        new_state = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params)
            new_state.append(s)
        return grads, tuple(new_state)

    def apply_fn(grads, state, params, skip, in_place=False):
        # Every transformation but the last transforms the gradients; the last one applies them
        # (keeping its fused kernel, if it has one).
        if not transforms:
            return params, state
        head = []
        for t, s in zip(transforms[:-1], state):
            grads, s = t.update(grads, s, params)
            head.append(s)
        new_params, last = apply(transforms[-1], grads, state[-1], params, skip, in_place)
        return new_params, select(~skip, tuple(head), tuple(state[:-1])) + (last,)

    def frozen_fn(params):
        return frozenset().union(*(frozen_names(t, params) for t in transforms))

    any_frozen = any(t.frozen is not None for t in transforms)
    return GradientTransformation(init, update, frozen_fn if any_frozen else None, apply_fn)


def partition(
    transforms: dict[str, GradientTransformation],
    labels: Callable[[str], str] | dict[str, str],
) -> GradientTransformation:
    """Different transformations for groups of parameters chosen by name.

    ``labels`` maps a parameter name to a key of ``transforms``, as a function
    or a dict. Use :func:`frozen` as a group's transformation to freeze it::

        optim.partition(
            {"encoder": optim.frozen(), "head": optim.adam(1e-3)},
            lambda name: "encoder" if name.startswith("encoder.") else "head",
        )
    """
    # A lambda, not dict.__getitem__, which torch.compile (2.11) cannot trace.
    label_of = (lambda name: labels[name]) if isinstance(labels, dict) else labels

    cache: dict = {}  # names -> groups: a function of the names alone, kept for the few sets seen

    def groups(names):
        key = tuple(names)
        if torch.compiler.is_compiling():
            return _groups(key)  # a cache filled while tracing would fail the graph's guards next call
        if key not in cache:
            if len(cache) >= 16:  # gradients for changing subsets of parameters: stay bounded
                cache.clear()
            cache[key] = _groups(key)
        return cache[key]

    def _groups(names):
        out = {label: [] for label in transforms}
        for name in names:
            try:
                label = label_of(name)
            except KeyError:
                raise KeyError(f"partition: no label for parameter {name!r}") from None
            if label not in transforms:
                raise KeyError(
                    f"partition: parameter {name!r} has label {label!r}, "
                    f"expected one of {sorted(transforms)}"
                )
            out[label].append(name)
        return out

    def init(params):
        return {
            label: transforms[label].init({n: params[n] for n in names})
            for label, names in groups(params).items()
        }

    # A group that receives no gradient at all (frozen, held, or left out of this step) keeps its
    # state as it is, in both functions.
    def update(grads, state, params=None):
        updates, new_state = {}, dict(state)
        for label, names in groups(grads).items():
            if names:
                sub_params = None if params is None else {n: params[n] for n in names}
                sub_updates, new_state[label] = transforms[label].update(
                    {n: grads[n] for n in names}, state[label], sub_params
                )
                updates.update(sub_updates)
        return updates, new_state

    def apply_fn(grads, state, params, skip, in_place=False):
        new_params, new_state = dict(params), dict(state)
        for label, names in groups(params).items():
            sub_grads = {n: grads[n] for n in names if n in grads}
            if sub_grads:
                sub_params, new_state[label] = apply(transforms[label], sub_grads, state[label],
                                                     {n: params[n] for n in names}, skip, in_place)
                new_params.update(sub_params)
        return new_params, new_state

    def frozen_fn(params):
        return frozenset().union(
            *(frozen_names(transforms[label], {n: params[n] for n in names})
              for label, names in groups(params).items())
        )

    return GradientTransformation(init, update, frozen_fn, apply_fn)
