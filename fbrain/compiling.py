"""``torch.compile`` for the pure steps, each compiled function with its own code object.

torch.compile keeps compiled graphs, its recompile budget and the shapes it has seen per code
object. :func:`compile_pure` compiles a fresh copy of a tiny function that runs ``step.pure``, so
unrelated steps never share them, while one compiled function can serve successive steps of the
same kind (the Brain builds new steps at every fit; making a wrapper copies torch's whole compiler
configuration, milliseconds): guards on the step's settings pick or make the right graph.

Example::

    compiled = compile_pure("train", fullgraph=True)
    new_state, metrics = compiled(train_step, state, batch)   # what TrainStep.compile() wraps
"""

from __future__ import annotations

import itertools
import types
from typing import Any, Callable


def _run_pure(step, state, batch) -> Any:
    return step.pure(state, batch)


_copies = itertools.count()


def compile_pure(kind: str, **compile_kwargs) -> Callable:
    """``torch.compile`` of a fresh copy of the function that runs a step's ``pure``; call it as
    ``compiled(step, state, batch)``. ``kind`` ("train" or "eval") names the copy."""
    import torch

    code = _run_pure.__code__.replace(co_name=f"{_run_pure.__name__}_{kind}_{next(_copies)}")
    fresh = types.FunctionType(code, _run_pure.__globals__, code.co_name)
    return torch.compile(fresh, **compile_kwargs)
