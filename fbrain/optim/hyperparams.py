"""Hyperparameters as tensors inside the optimizer state.

Every optimizer keeps its learning rate, betas, weight decay ... as 0-dim
tensors in ``state.hyperparams``. A compiled step therefore sees them as
inputs, not constants: changing one never recompiles, and they are saved with
the state. A hyperparameter given as a schedule (a function of the update
count) is re-evaluated on every update and its current value stored.

They are float64 (float32 on MPS, which has no float64) so the arithmetic on
them (bias corrections, ``1 - beta``) is rounded once, like torch.optim's
Python floats.

ATen's fused CPU kernels take most hyperparameters as Python floats, and a step must not read a
tensor to get them. So whenever a hyperparameter tensor is made from a known number (``init``,
``set_hyperparams``), its value is *mirrored* on the host, keyed by the tensor's identity and
version counter (:func:`mirrored`). An in-place change bumps the version and a new tensor (a
schedule's value, a loaded checkpoint) has no entry: in both cases the mirror is not trusted and
the step takes the multi-tensor path, which does its arithmetic on the tensors.
:func:`mirror_hyperparams` re-records a state's values (one host read each, outside a step), e.g.
after loading a checkpoint, to get the fused kernels back.

Example::

    >>> import torch
    >>> from fbrain import optim
    >>> opt = optim.adam(lr=1e-3)
    >>> state = opt.init({"w": torch.zeros(2)})
    >>> float(optim.get_hyperparams(state)["lr"])
    0.001
    >>> state = optim.set_hyperparams(state, lr=5e-4)
    >>> float(optim.get_hyperparams(state)["lr"])
    0.0005
"""

from __future__ import annotations

from typing import Any, Callable, Union

import weakref

import torch

Schedule = Callable[[torch.Tensor], torch.Tensor]
Hyperparam = Union[float, Schedule]


def _dtype_for(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def device_of(params: dict[str, torch.Tensor]) -> torch.device:
    for p in params.values():
        return p.device
    return torch.device("cpu")


def _scalar(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Build from the Python float directly: going through a float32 tensor would round it.
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=dtype).reshape(())
    return torch.tensor(value, dtype=dtype, device=device)


# id(tensor) -> (weak reference to it, its version counter when recorded, its value as a float).
# A plain dict keyed by id (a lookup is a few hundred nanoseconds); the weak reference's callback
# drops the entry when the tensor dies, and checking it guards against a reused id.
_MIRROR: dict[int, tuple] = {}


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: never trusted
        return None


def remember(t: torch.Tensor, value: float | None = None) -> torch.Tensor:
    """Mirror the value of the 0-dim CPU tensor ``t`` on the host: ``value`` if given (it must be
    what ``float(t)`` gives), otherwise read once (so call it outside a step). Returns ``t``."""
    if t.device.type == "cpu" and t.numel() == 1 and _version(t) is not None:
        key = id(t)
        # Defaults bind the function and dict now: at interpreter exit module globals may be gone
        # before the last tensors die.
        ref = weakref.ref(t, lambda _, key=key, forget=_forget, mirror=_MIRROR: forget(key, ref, mirror))
        _MIRROR[key] = (ref, _version(t), float(t) if value is None else float(value))
    return t


def _forget(key: int, ref, mirror: dict) -> None:
    entry = mirror.get(key)
    if entry is not None and entry[0] is ref:
        del mirror[key]


def mirrored(t: torch.Tensor) -> float | None:
    """``float(t)`` without reading ``t``: the mirrored value, or None if there is none or ``t``
    changed in place since it was recorded."""
    entry = _MIRROR.get(id(t))
    if entry is None or entry[0]() is not t or entry[1] != _version(t):
        return None
    return entry[2]


def mirror_hyperparams(opt_state: Any) -> Any:
    """Mirror every hyperparameter of ``opt_state`` on the host (one read each; not inside a step),
    so the fused CPU kernels serve a state whose tensors were made elsewhere (a loaded checkpoint).
    Returns ``opt_state`` unchanged."""
    def record(hp):
        for v in hp.values():
            if isinstance(v, torch.Tensor) and mirrored(v) is None:
                remember(v)
        return hp

    _walk(opt_state, record)
    return opt_state


def _known(value, t: torch.Tensor) -> torch.Tensor:
    """``t`` made from ``value``, mirrored when ``float(t) == value`` is certain without a read."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and t.dtype == torch.float64:
        remember(t, value)
    return t


def init(params: dict[str, torch.Tensor], **values: Hyperparam) -> dict[str, torch.Tensor]:
    """0-dim tensors for ``values``; a schedule is stored as its value at count 0."""
    device = device_of(params)
    dtype = _dtype_for(device)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    return {
        name: (v(zero).to(device=device, dtype=dtype) if callable(v) else _known(v, _scalar(v, dtype, device)))
        for name, v in values.items()
    }


def current(
    hyperparams: dict[str, torch.Tensor], schedules: dict[str, Hyperparam], count: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``hyperparams`` with every scheduled entry replaced by its value at ``count``."""
    out = dict(hyperparams)
    for name, value in schedules.items():
        if callable(value):
            out[name] = torch.as_tensor(value(count)).to(hyperparams[name])
    return out


def scalar(value: torch.Tensor, like: list[torch.Tensor]) -> torch.Tensor:
    """``value`` (a float64 hyperparameter expression) in the dtype the update arithmetic uses.

    Eager kernels round a scalar operand to the tensors' dtype anyway; doing it explicitly keeps a
    compiled update from computing the whole kernel in float64 (several times slower on CPU).
    float16/bfloat16 tensors get float32 scalars, as torch.optim's Python floats would.
    """
    dtype = like[0].dtype if like and like[0].dtype in (torch.float32, torch.float64) else torch.float32
    return value.to(dtype)


def hoisted(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``values`` (0-dim tensors of one dtype) hoisted out of a compiled update's elementwise
    loops: held in one small buffer, so they are computed once per step.

    Inductor inlines cheap scalar arithmetic into every elementwise loop that reads it, and a scalar
    ``pow`` then runs once per vector of every parameter: Adam's bias corrections made a compiled
    MLP update 3.6x slower (827 us against 232 us). A ``stack`` is not inlined.
    """
    return tuple(torch.stack(values).unbind(0))


def validate(name: str, value: Hyperparam, low: float = 0.0, high: float | None = None) -> None:
    """Reject a constant hyperparameter outside ``[low, high)`` (schedules are checked by the user)."""
    if callable(value):
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a number, got a tensor of shape {tuple(value.shape)}")
        value = float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a number or a schedule, got {type(value).__name__}")
    if value < low or (high is not None and value >= high):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected a value {bound}, got {value}")


def _walk(state: Any, fn: Callable[[dict], dict]) -> Any:
    """Rebuild ``state`` with ``fn`` applied to every ``hyperparams`` dict found in it."""
    if hasattr(state, "_fields"):  # a NamedTuple optimizer state
        fields = {
            name: fn(value) if name == "hyperparams" else _walk(value, fn)
            for name, value in zip(state._fields, state)
        }
        return type(state)(**fields)
    if isinstance(state, dict):
        return {k: _walk(v, fn) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_walk(v, fn) for v in state)
    return state


def get_hyperparams(opt_state: Any) -> dict[str, torch.Tensor]:
    """The hyperparameters found in ``opt_state`` (the first value seen for each name)."""
    found: dict[str, torch.Tensor] = {}

    def collect(hp):
        for k, v in hp.items():
            found.setdefault(k, v)
        return hp

    _walk(opt_state, collect)
    return found


def set_hyperparams(opt_state: Any, **values: float | torch.Tensor) -> Any:
    """A new optimizer state with the named hyperparameters set everywhere they occur.

    Raises ``KeyError`` for a name no optimizer in ``opt_state`` has.
    """
    seen: set[str] = set()

    def assign(hp):
        new = dict(hp)
        for k, v in values.items():
            if k in hp:
                seen.add(k)
                new[k] = _scalar(v, hp[k].dtype, hp[k].device)
                # set_hyperparams runs between steps: a tensor value may be read here, once.
                if isinstance(v, torch.Tensor):
                    remember(new[k])
                else:
                    _known(v, new[k])
        return new

    new_state = _walk(opt_state, assign)
    missing = values.keys() - seen
    if missing:
        raise KeyError(
            f"set_hyperparams: no optimizer has {sorted(missing)}; "
            f"known: {sorted(get_hyperparams(opt_state))}"
        )
    return new_state
