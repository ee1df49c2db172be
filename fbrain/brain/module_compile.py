"""SpeechBrain's ``compile`` / ``jit`` run options: ``torch.compile`` a Brain's modules in place.

SpeechBrain replaces each module with ``torch.compile(module)``, an ``OptimizedModule`` whose
parameters are renamed (``model._orig_mod.weight``); the state, the parameter binding, the pure
step's reparametrisation and the checkpoints all go by the uncompiled names, so here each module is
compiled in place instead (:func:`compile_in_place`): same names, same Parameter objects,
``modules.model(x)`` runs the compiled graph. As in SpeechBrain, a module that fails to compile
stays eager with a warning, and a module already compiled is left alone. ``jit`` (TorchScript) is
not supported: a scripted module cannot run with the state's tensors.

Example::

    compile_modules(brain.modules, brain)   # reads brain.compile, brain.compile_module_keys, ...
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def compile_in_place(module: torch.nn.Module, **compile_kwargs) -> None:
    """``torch.compile`` ``module``'s calls in place: its names, Parameters and buffers stay as they are.

    What ``nn.Module.compile`` means to do, but that compiles ``_call_impl`` itself, a frame in
    torch.nn that dynamo skips, so a torch.nn module (Sequential, Linear, LSTM ...) would silently
    stay eager. The call goes through a function of ours, which dynamo traces, inlining the module
    (what ``torch.compile(module)``'s ``OptimizedModule`` does, without renaming anything).
    """
    call = module._call_impl

    def call_module(*args, **kwargs):
        return call(*args, **kwargs)

    module._compiled_call_impl = torch.compile(call_module, **compile_kwargs)


def compile_modules(modules: torch.nn.ModuleDict, options) -> None:
    """Compile the modules named by ``compile_module_keys`` (all when None) if ``options.compile``;
    ``options`` has the Brain's run options as attributes."""
    compile_keys: set = set()
    if options.compile:
        compile_keys = set(modules) if options.compile_module_keys is None else set(options.compile_module_keys)
    jit_keys: set = set()
    if options.jit:
        jit_keys = set(modules) if options.jit_module_keys is None else set(options.jit_module_keys)
    for name in sorted(compile_keys | jit_keys):
        if name not in modules:
            option = "compile_module_keys" if name in compile_keys else "jit_module_keys"
            raise ValueError(f"run option {option}: module {name!r} is not in modules {sorted(modules)}")
    for name in sorted(compile_keys):
        module = modules[name]
        if module._compiled_call_impl is None:  # not compiled by an earlier fit
            try:
                compile_in_place(module, mode=options.compile_mode, fullgraph=options.compile_using_fullgraph,
                                 dynamic=options.compile_using_dynamic_shape_tracing)
            except Exception as e:  # SpeechBrain's behaviour: skip it, keep training eagerly
                logger.warning("module %r in compile_module_keys failed to compile and stays eager: %s", name, e)
                continue
        jit_keys.discard(name)
    if jit_keys:
        raise NotImplementedError(
            f"run option jit: fbrain.Brain cannot TorchScript modules {sorted(jit_keys)} (a scripted module "
            "cannot run with the state's parameters); use compile=True instead"
        )
