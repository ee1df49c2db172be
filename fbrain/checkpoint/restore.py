"""Restoring a loaded tree into a template, strictly: every difference is an error naming its path.

Example::

    >>> import torch
    >>> from fbrain.checkpoint.restore import restore
    >>> restore({"w": torch.zeros(2)}, {"w": torch.ones(3)})
    Traceback (most recent call last):
    ...
    fbrain.checkpoint.serialization.CheckpointError: ['w']: shape (3,) expected, file has (2,)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fbrain.checkpoint.serialization import CheckpointError, _fields
from fbrain.optim.hyperparams import Static


def _where(path: str) -> str:
    return path or "tree"


def _match(loaded: Any, template: Any, path: str) -> Any:
    if isinstance(template, Static) and isinstance(loaded, torch.Tensor) and loaded.numel() == 1 \
            and loaded.is_floating_point():
        # Checkpoints written before hyperparameters were Static numbers hold them as 0-dim tensors.
        try:
            return Static(float(loaded))
        except ValueError as err:
            raise CheckpointError(f"{_where(path)}: {err}") from None
    if isinstance(template, torch.Tensor):
        if not isinstance(loaded, torch.Tensor):
            raise CheckpointError(f"{_where(path)}: a tensor expected, file has {type(loaded).__name__}")
        if loaded.shape != template.shape:
            raise CheckpointError(
                f"{_where(path)}: shape {tuple(template.shape)} expected, file has {tuple(loaded.shape)}")
        if loaded.dtype != template.dtype:
            raise CheckpointError(f"{_where(path)}: dtype {template.dtype} expected, file has {loaded.dtype}")
        return loaded.to(template.device)
    if isinstance(template, dict):
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{_where(path)}: a dict expected, file has {type(loaded).__name__}")
        missing = [k for k in template if k not in loaded]
        extra = [k for k in loaded if k not in template]
        if missing or extra:
            raise CheckpointError(f"{_where(path)}: keys differ from the template: missing {missing}, "
                                  f"unexpected {extra}")
        return {k: _match(loaded[k], template[k], f"{path}[{k!r}]") for k in template}
    if hasattr(template, "_fields") or (dataclasses.is_dataclass(template) and not isinstance(template, type)):
        if type(loaded) is not type(template):
            raise CheckpointError(f"{_where(path)}: {type(template).__name__} expected, "
                                  f"file has {type(loaded).__name__}")
        fields = {k: _match(v, getattr(template, k), f"{path}.{k}") for k, v in _fields(loaded).items()}
        return type(template)(**fields)
    if isinstance(template, (list, tuple)):
        if type(loaded) is not type(template) or len(loaded) != len(template):
            got = f"{type(loaded).__name__} of length {len(loaded)}" if isinstance(loaded, (list, tuple)) \
                else type(loaded).__name__
            raise CheckpointError(f"{_where(path)}: {type(template).__name__} of length {len(template)} "
                                  f"expected, file has {got}")
        return type(template)(_match(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(loaded, template)))
    if type(loaded) is not type(template):
        raise CheckpointError(f"{_where(path)}: {type(template).__name__} expected, file has "
                              f"{type(loaded).__name__} ({loaded!r})")
    return loaded


def _to_device(tree: Any, device) -> Any:
    """Every tensor on ``device``, except the RNG key of any TrainState inside (it stays on the CPU)."""
    from fbrain.state import TrainState

    if isinstance(tree, TrainState):
        return tree.to(device)
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: _to_device(v, device) for k, v in tree.items()}
    if hasattr(tree, "_fields"):
        return type(tree)(*(_to_device(v, device) for v in tree))
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return type(tree)(**{k: _to_device(v, device) for k, v in _fields(tree).items()})
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_device(v, device) for v in tree)
    return tree


def restore(loaded: Any, template: Any = None, device: torch.device | str | None = None) -> Any:
    """``loaded`` checked against ``template`` (when given) and moved to ``device`` (when given).

    Without a device, tensors take the template's devices (CPU without a template). A
    TrainState's RNG key always stays on the CPU.
    """
    out = loaded if template is None else _match(loaded, template, "")
    return out if device is None else _to_device(out, device)
