"""Hyperparameters inside the optimizer state: tensors where they change, numbers where they don't.

Every optimizer keeps its hyperparameters in ``state.hyperparams`` (a dict), so they are saved with
the state and :func:`set_hyperparams` changes them without rebuilding anything. Each entry is one of:

* a 0-dim **tensor**: the learning rate always (schedulers change it every step or epoch), and any
  hyperparameter given as a schedule (a function of the update count, re-evaluated every update).
  A compiled step sees tensors as inputs, so changing one never recompiles. They are float64
  (float32 on MPS, which has no float64), so the arithmetic on them (bias corrections,
  ``1 - beta``) is rounded once, like torch.optim's Python floats.
* a :class:`Static` **number**: every other hyperparameter (betas, eps, weight decay, momentum ...).
  It lives in the state's tree structure, not in its leaves: ``tree_map(torch.clone, state)``
  keeps it, a checkpoint stores it, and a step reads it without touching a tensor.

Why two kinds: ATen's fused CPU optimizer kernels take the learning rate as a tensor but the other
hyperparameters as Python numbers, and a step never reads a tensor on the host. Whether the fused
kernel or the multi-tensor arithmetic runs (they round differently) is therefore decided by the
state's values and the optimizer's definition alone, never by where the tensors came from: equal
states give equal results, after a clone, a checkpoint or in another process. A compiled step
treats a ``Static`` number as a constant (changing one recompiles that step; schedules do not).

Example::

    >>> import torch
    >>> from fbrain import optim
    >>> opt = optim.adam(lr=1e-3)
    >>> state = opt.init({"w": torch.zeros(2)})
    >>> h = optim.get_hyperparams(state)
    >>> float(h["lr"]), h["beta1"]
    (0.001, 0.9)
    >>> state = optim.set_hyperparams(state, lr=5e-4, beta1=0.8)
    >>> float(optim.get_hyperparams(state)["lr"]), optim.get_hyperparams(state)["beta1"]
    (0.0005, 0.8)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, NamedTuple, Union

import torch

from fbrain.tree import device_of
from fbrain.torch_compat import in_functorch_transform, register_pytree_node

Schedule = Callable[[torch.Tensor], torch.Tensor]
Hyperparam = Union[float, Schedule]

#: Hyperparameters kept as tensors even when given as numbers (see the module docstring).
ALWAYS_TENSORS = frozenset({"lr"})


@dataclasses.dataclass(frozen=True)
class Static:
    """A hyperparameter held as a Python number in the state's structure (a pytree node with no
    leaves): ``tree_map`` passes it through unchanged, and reading it never touches a tensor."""

    value: float

    def __post_init__(self):
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool):
            raise TypeError(f"Static: expected a number, got {type(self.value).__name__}")
        if not math.isfinite(self.value):
            raise ValueError(f"Static: expected a finite number, got {self.value}")
        object.__setattr__(self, "value", float(self.value))

    def __float__(self) -> float:
        return float(self.value)


register_pytree_node(Static, lambda s: ([], s.value), lambda _, value: Static(value), "fbrain.optim.Static")


def _dtype_for(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _scalar(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Build from the Python float directly: going through a float32 tensor would round it.
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=dtype).reshape(())
    # torch.full, not torch.tensor: on an accelerator torch.tensor copies from the host and waits
    # for the stream; a fill is one kernel launch, with the same float64 value.
    return torch.full((), value, dtype=dtype, device=device)


def _number(value) -> float:
    """A hyperparameter's value as a Python float (reads a tensor once: never call it in a step)."""
    return float(value.reshape(())) if isinstance(value, torch.Tensor) else float(value)


def init(params: dict[str, torch.Tensor], **values: Hyperparam) -> dict[str, Any]:
    """The hyperparameters of a fresh state: tensors for the learning rate and schedules (a schedule
    stored as its value at count 0), :class:`Static` numbers for the rest."""
    device = device_of(params)
    dtype = _dtype_for(device)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    out: dict[str, Any] = {}
    for name, v in values.items():
        if callable(v):
            out[name] = torch.as_tensor(v(zero)).to(device=device, dtype=dtype).reshape(())
        elif name in ALWAYS_TENSORS:
            out[name] = _scalar(v, dtype, device)
        else:
            out[name] = Static(_number(v))
    return out


def current(hyperparams: dict[str, Any], schedules: dict[str, Hyperparam], count: torch.Tensor) -> dict[str, Any]:
    """``hyperparams`` with every scheduled entry replaced by its value at ``count``."""
    out = dict(hyperparams)
    for name, value in schedules.items():
        if callable(value):
            out[name] = torch.as_tensor(value(count)).to(hyperparams[name])
    return out


def as_tensors(hyperparams: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Every hyperparameter as a 0-dim tensor, for the multi-tensor arithmetic (a ``Static`` number
    becomes a float64 tensor made from it, so the arithmetic is the same whichever kind it is)."""
    dtype = _dtype_for(device)
    return {k: _scalar(v.value, dtype, device) if isinstance(v, Static) else v for k, v in hyperparams.items()}


def operands(hyperparams: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every hyperparameter as the update arithmetic takes it: a :class:`Static` one as its Python
    number (as torch.optim passes it to a kernel, rounded by the kernel to the tensors' dtype; no
    tensor to make per step), a tensor one as it is. Expressions of the two are numbers or float64
    tensors, each rounded once, as torch.optim's Python arithmetic rounds them."""
    return {k: v.value if isinstance(v, Static) else v for k, v in hyperparams.items()}


def host_values(hyperparams: dict[str, Any], names: list[str]) -> dict[str, float] | None:
    """The Python numbers of ``names`` (all :class:`Static`), or None if one is a tensor (scheduled)."""
    out = {}
    for name in names:
        value = hyperparams[name]
        if not isinstance(value, Static):
            return None
        out[name] = value.value
    return out


def scalar(value: torch.Tensor, like: list[torch.Tensor]) -> torch.Tensor:
    """``value`` (a float64 hyperparameter expression) in the dtype the update arithmetic uses.

    Eager kernels round a scalar operand to the tensors' dtype anyway; doing it explicitly keeps a
    compiled update from computing the whole kernel in float64 (several times slower on CPU).
    float16/bfloat16 tensors get float32 scalars, as torch.optim's Python floats would.
    """
    if not isinstance(value, torch.Tensor):
        return value  # a Python number: the kernel rounds it to the tensors' dtype itself
    dtype = like[0].dtype if like and like[0].dtype in (torch.float32, torch.float64) else torch.float32
    return value.to(dtype)


def hoisted(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``values`` (0-dim tensors of one dtype) hoisted out of a compiled update's elementwise
    loops: held in one small buffer, so they are computed once per step.

    Inductor inlines cheap scalar arithmetic into every elementwise loop that reads it, and a scalar
    ``pow`` then runs once per vector of every parameter: Adam's bias corrections made a compiled
    MLP update 3.6x slower (827 us against 232 us). A ``stack`` is not inlined. Eagerly there is
    nothing to hoist: ``values`` as they are.
    """
    return tuple(torch.stack(values).unbind(0)) if torch.compiler.is_compiling() else values


class Range(NamedTuple):
    """The values a hyperparameter may take: finite, ``>= low``, and below ``high`` (up to it when
    ``closed``)."""

    low: float = 0.0
    high: float = math.inf
    closed: bool = False

    def holds(self, x: float) -> bool:
        return math.isfinite(x) and self.low <= x and (x <= self.high if self.closed else x < self.high)

    def __str__(self) -> str:
        if self.high != math.inf:
            return f"a finite number in [{self.low:g}, {self.high:g}{']' if self.closed else ')'}"
        return "a finite number" if self.low == -math.inf else f"a finite number >= {self.low:g}"


#: Every hyperparameter's range, by its name in the state: torch.optim's checks (lr, eps, weight
#: decay, momentum >= 0; betas in [0, 1); Adadelta's rho in [0, 1] ...), and finite. Names not here
#: may be any finite number.
RANGES = {
    **dict.fromkeys(["lr", "eps", "weight_decay", "momentum", "dampening", "lr_decay",
                     "initial_accumulator_value", "momentum_decay", "max_norm"], Range()),
    "beta1": Range(0.0, 1.0), "beta2": Range(0.0, 1.0),
    # RMSprop's alpha above 1 makes its square average negative (torch checks alpha >= 0 only).
    "alpha": Range(0.0, 1.0, closed=True), "rho": Range(0.0, 1.0, closed=True), "decay": Range(0.0, 1.0, closed=True),
}

#: How a constructor's argument is written where it differs from the hyperparameter's name.
ARGUMENTS = {"beta1": "betas[0]", "beta2": "betas[1]"}


def _readable(value: torch.Tensor) -> bool:
    """Whether a tensor's value may be read here without a host synchronisation or breaking a
    transform: a CPU tensor outside autograd, vmap/grad and torch.compile. Others (a learning rate
    that requires grad for meta-learning, one on an accelerator) are taken as they are, unchecked."""
    return (value.device.type == "cpu" and not value.requires_grad and not torch.compiler.is_compiling()
            and not in_functorch_transform())


def checked_value(where: str, name: str, value: Any, *, schedule: bool = True) -> Any:
    """``value`` for the hyperparameter ``name``, checked against :data:`RANGES`: a Python number
    becomes a float; a 0-dim tensor and (if ``schedule``) a schedule pass as they are. ``where``
    names the caller in the error (``"adam: lr"``)."""
    if schedule and callable(value) and not isinstance(value, torch.Tensor):
        return value  # a schedule: its values are the caller's (evaluated on the device, per update)
    accepts = "a number, a 0-dim tensor or a schedule" if schedule else "a number"
    allowed = RANGES.get(name, Range(-math.inf))
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            what = f"shape {tuple(value.shape)}" if value.numel() != 1 else f"dtype {value.dtype}"
            raise TypeError(f"{where}: expected {accepts}, got a tensor of {what}")
        if not _readable(value):
            return value
        number = float(value.detach().reshape(()))
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float64
            raise ValueError(f"{where}: expected {allowed}, got an int of {int(value).bit_length()} bits") from None
    else:
        raise TypeError(f"{where}: expected {accepts}, got {type(value).__name__}")
    if not allowed.holds(number):
        raise ValueError(f"{where}: expected {allowed}, got {number}")
    return value if isinstance(value, torch.Tensor) else number


def checked(owner: str, **values: Any) -> dict[str, Any]:
    """An optimizer's hyperparameters (by their names in the state), each checked with
    :func:`checked_value`; errors name ``owner`` and the argument (``"adam: betas[1]: ..."``).
    Every constructor passes its hyperparameters through here, once, before building anything."""
    return {name: checked_value(f"{owner}: {ARGUMENTS.get(name, name)}", name, value) for name, value in values.items()}


def given(value: Any) -> bool:
    """Whether a checked hyperparameter such as a weight decay is in use, which an optimizer decides
    when it is built: a schedule, or a tensor whose value is not read here, is; a number unless 0."""
    if isinstance(value, torch.Tensor):
        return not _readable(value) or float(value.detach().reshape(())) != 0
    return callable(value) or value != 0


def betas(owner: str, value: Any) -> dict[str, Any]:
    """``{"beta1": ..., "beta2": ...}`` from a ``betas`` argument, which must be a pair."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise TypeError(f"{owner}: betas: expected a pair (beta1, beta2), got {value!r:.80}")
    return {"beta1": value[0], "beta2": value[1]}


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


def get_hyperparams(opt_state: Any) -> dict[str, Any]:
    """The hyperparameters found in ``opt_state`` (the first value seen for each name): 0-dim
    tensors, and Python floats for the :class:`Static` ones."""
    found: dict[str, Any] = {}

    def collect(hp):
        for k, v in hp.items():
            found.setdefault(k, v.value if isinstance(v, Static) else v)
        return hp

    _walk(opt_state, collect)
    return found


def set_hyperparams(opt_state: Any, **values: float | torch.Tensor) -> Any:
    """A new optimizer state with the named hyperparameters set everywhere they occur (between
    steps: a tensor given for a :class:`Static` entry is read once).

    Raises ``KeyError`` for a name no optimizer in ``opt_state`` has, and ``ValueError`` /
    ``TypeError`` for a value outside the hyperparameter's range (:data:`RANGES`) or not a number.
    A tensor stays allowed (a learning rate for meta-learning); its value is checked where reading
    it needs no host synchronisation (a CPU tensor that does not require grad; see :func:`_readable`).
    """
    values = {k: checked_value(f"set_hyperparams: {k}", k, v, schedule=False) for k, v in values.items()}
    seen: set[str] = set()

    def assign(hp):
        new = dict(hp)
        for k, v in values.items():
            if k in hp:
                seen.add(k)
                old = hp[k]
                if isinstance(old, Static):  # read once here, so checked whatever tensor it came from
                    new[k] = Static(checked_value(f"set_hyperparams: {k}", k, _number(v), schedule=False))
                else:
                    new[k] = _scalar(v, old.dtype, old.device)
        return new

    new_state = _walk(opt_state, assign)
    missing = values.keys() - seen
    if missing:
        raise KeyError(
            f"set_hyperparams: no optimizer has {sorted(missing)}; "
            f"known: {sorted(get_hyperparams(opt_state))}"
        )
    return new_state
