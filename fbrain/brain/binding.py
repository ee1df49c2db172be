"""Keep a module's parameters and buffers pointing at a TrainState's tensors.

After every step the Brain rebinds ``param.data`` (and each buffer) to the new state's tensor:
O(1) per tensor, no copy, so user code that reads ``self.modules`` sees the current weights and
``loss.backward()`` in an imperative recipe produces gradients for them.

Example::

    >>> import torch
    >>> from fbrain.brain.binding import Binding
    >>> model = torch.nn.Linear(2, 1)
    >>> binding = Binding(model)
    >>> new = {"weight": torch.zeros(1, 2), "bias": torch.ones(1)}
    >>> binding.bind(new, {})
    >>> model.weight.data_ptr() == new["weight"].data_ptr(), float(model.bias.detach())
    (True, 1.0)
"""

from __future__ import annotations

import torch


class Binding:
    """The module's parameters and buffers by state name, and a cheap :meth:`bind`."""

    def __init__(self, module: torch.nn.Module):
        self.params = dict(module.named_parameters())
        self.buffer_slots = []
        for name, _ in module.named_buffers():
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            self.buffer_slots.append((name, owner, leaf))

    def check(self, params: dict, buffers: dict, where: str) -> None:
        """Raise, naming the tensor, unless ``params`` and ``buffers`` have the module's names,
        shapes and dtypes (what :meth:`bind` needs to leave the module as it was built). Cheap
        enough for every step: a key comparison and two attribute reads a tensor."""
        for kind, given, expected in (("params", params, self.params), ("buffers", buffers, self._buffers())):
            if given.keys() != expected.keys():
                raise KeyError(f"{where}.{kind}: not the modules' tensors (missing {sorted(expected.keys() - given)}, "
                               f"unexpected {sorted(given.keys() - expected.keys())}); give a state made for "
                               "these modules")
            for name, old in expected.items():
                new = given[name]
                if old is None or new is None or not isinstance(new, torch.Tensor):
                    if old is None and new is None:
                        continue
                elif new.shape == old.shape and new.dtype == old.dtype:
                    continue
                describe = lambda t: f"shape {tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else repr(t)  # noqa: E731
                raise ValueError(f"{where}.{kind}[{name!r}]: expected {describe(old)} (the module's), got "
                                 f"{describe(new)}; give a state made for these modules")

    def _buffers(self) -> dict:
        return {name: owner._buffers[leaf] for name, owner, leaf in self.buffer_slots}

    def bind(self, params: dict, buffers: dict) -> None:
        for name, p in self.params.items():
            p.data = params[name]
        for name, owner, leaf in self.buffer_slots:
            owner._buffers[leaf] = buffers[name]
