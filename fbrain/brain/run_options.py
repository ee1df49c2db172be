"""Run options: SpeechBrain's names and defaults, resolved command line > ``$FBRAIN_RUN_OPTS`` >
hparams > defaults.

fbrain's own options (``compile_steps``, ``ema_decay`` ...) go on the command line of a script that
parses with fbrain's ``parse_arguments``. A script that parses with SpeechBrain's (unchanged but
for its Brain) would take them for YAML overrides and fail ("Override not found"): give them in
the YAML, in ``run_opts``, or in the environment, e.g.
``FBRAIN_RUN_OPTS="compile_steps=true ema_decay=0.999" python train.py train.yaml``.

Example::

    >>> from fbrain.brain.run_options import resolve_run_options
    >>> opts = resolve_run_options({"max_grad_norm": 1.0}, {"max_grad_norm": 3.0, "debug": True})
    >>> opts["max_grad_norm"], opts["debug"], opts["nonfinite_patience"]
    (1.0, True, 3)
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import yaml

from fbrain import precision as _precision

# The options fbrain's Brain acts on, with SpeechBrain's defaults.
DEFAULTS: dict[str, Any] = {
    "device": "cpu",
    "precision": "fp32",
    "eval_precision": "fp32",
    "debug": False,
    "debug_batches": 2,
    "debug_epochs": 2,
    "max_grad_norm": 5.0,
    "skip_nonfinite_grads": False,
    "nonfinite_patience": 3,
    "grad_accumulation_factor": 1,
    "optimizer_step_limit": None,
    "noprogressbar": False,
    "ckpt_interval_minutes": 0.0,
    "ckpt_interval_steps": 0,
    "compile": False,
    "compile_module_keys": None,
    "compile_mode": "reduce-overhead",
    "compile_using_fullgraph": False,
    # fbrain's own: compile the default fit_batch's and evaluate_batch's whole pure steps: True,
    # False, or "auto": the train step when a fit plans at least auto_compile_min_steps steps
    # (fbrain/brain/auto_compile.py).
    "compile_steps": "auto",
    "auto_compile_min_steps": 20_000,
    # fbrain's own: under torchrun, each rank keeps and updates 1/N of the optimizer state (ZeRO).
    "shard_optimizer_state": False,
    # fbrain's own: an exponential moving average of the weights (optim.with_ema around every
    # optimizer), and evaluation with the averaged weights.
    "ema_decay": None,
    "eval_with_ema": False,
    # SpeechBrain 1.1's: profile the first steps, then stop; vectors (biases, norms) in a parameter
    # group without weight decay.
    "profile_training": False,
    "profile_warmup": 5,
    "profile_steps": 5,
    "remove_vector_weight_decay": False,
    "distributed_backend": "nccl",
    "find_unused_parameters": False,
    "tqdm_colored_bar": False,
    "data_parallel_backend": False,
    # SpeechBrain options that a recipe's hparams or command line may carry. They are accepted so
    # a recipe ports unchanged; the ones with no effect here are listed in docs/brain.md.
    "test_only": False,
    "debug_persistently": False,
    "log_config": None,
    "param_file": "",
    "jit": False,
    "jit_module_keys": None,
    "compile_using_dynamic_shape_tracing": False,
    "auto_mix_prec": False,
    "bfloat16_mix_prec": False,
    "data_parallel_count": -1,
    "distributed_launch": False,
    "tqdm_barcolor": {"train": "GREEN", "valid": "MAGENTA", "test": "CYAN"},
}

PRECISIONS = tuple(_precision.PRECISIONS)

HELP = {
    "device": "the device to run on (e.g. 'cuda:0')",
    "precision": "training precision: fp32, bf16 or fp16",
    "eval_precision": "evaluation precision: fp32, bf16 or fp16",
    "debug": "run only debug_batches batches for debug_epochs epochs",
    "debug_batches": "batches per stage in debug mode",
    "debug_epochs": "epochs in debug mode",
    "max_grad_norm": "clip all gradients to this global norm; <= 0 disables clipping",
    "skip_nonfinite_grads": "accepted for compatibility: non-finite steps are always skipped",
    "nonfinite_patience": "non-finite steps tolerated per epoch before an error",
    "grad_accumulation_factor": "batches whose gradients are summed before one update",
    "optimizer_step_limit": "stop after this many optimizer steps",
    "noprogressbar": "disable the progress bars",
    "ckpt_interval_minutes": "minutes between intra-epoch checkpoints (<= 0: none)",
    "ckpt_interval_steps": "steps between intra-epoch checkpoints (<= 0: none)",
    "compile": "torch.compile the modules",
    "compile_mode": "torch.compile mode",
    "compile_using_fullgraph": "torch.compile with fullgraph=True",
    "compile_steps": "torch.compile the whole train and eval steps (forward, backward, clipping, update): "
                     "true, false, or auto (the train step, when a fit plans auto_compile_min_steps steps)",
    "auto_compile_min_steps": "with compile_steps=auto, the fewest planned train steps that compile the train step",
    "shard_optimizer_state": "under torchrun, keep and update 1/N of the optimizer state on each rank (ZeRO)",
    "ema_decay": "keep an exponential moving average of the weights with this decay (e.g. 0.999)",
    "eval_with_ema": "evaluate (valid and test) with the averaged weights of ema_decay",
    "profile_training": "profile the first profile_warmup + profile_steps training steps with torch.profiler, "
                        "write the trace into <output_folder>/profiler_logs, then stop",
    "profile_warmup": "steps the profiler warms up before it records",
    "profile_steps": "steps the profiler records",
    "remove_vector_weight_decay": "put vectors (biases, norms) in a parameter group without weight decay",
    "distributed_backend": "nccl, gloo or mpi",
    "find_unused_parameters": "DDP's find_unused_parameters",
    "tqdm_colored_bar": "colour the progress bars",
    "data_parallel_backend": "wrap modules in torch.nn.DataParallel",
    "test_only": "skip training, only evaluate",
}


def run_option_names() -> list[str]:
    return list(DEFAULTS)


def _overridden(run_opts: Any) -> dict[str, Any]:
    """The explicitly given options of ``run_opts`` (a dict, or SpeechBrain's RunOptions)."""
    if run_opts is None:
        return {}
    if hasattr(run_opts, "overridden_args") and hasattr(run_opts, "as_dict"):
        # speechbrain.utils.run_opts.RunOptions: only what the user set counts as given.
        values = run_opts.as_dict()
        return {k: values[k] for k in run_opts.overridden_args}
    if not isinstance(run_opts, Mapping):
        raise TypeError(f"run_opts: expected a dict of run options, got {type(run_opts).__name__}")
    return dict(run_opts)


ENVIRONMENT = "FBRAIN_RUN_OPTS"
_ENV_ITEM = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def environment_run_options(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The run options in ``$FBRAIN_RUN_OPTS``: ``name=value`` items separated by spaces or commas,
    each value a YAML scalar (``true``, ``0.999``, ``null``, ``fp16``).

    Example::

        >>> environment_run_options({"FBRAIN_RUN_OPTS": "compile_steps=true, ema_decay=0.999"})
        {'compile_steps': True, 'ema_decay': 0.999}
    """
    text = environ.get(ENVIRONMENT, "")
    if len(text) > 10_000:
        raise ValueError(f"${ENVIRONMENT}: {len(text)} characters; expected a few name=value items")
    options = {}
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        match = _ENV_ITEM.match(item)
        if match is None:
            raise ValueError(f"${ENVIRONMENT}: expected name=value items (e.g. compile_steps=true), got {item!r}")
        name, raw = match.groups()
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)):
            raise ValueError(f"${ENVIRONMENT}: {name}: expected a single value, got {raw!r}")
        options[name] = value
    return options


def _check_names(given: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{where}: unknown run option(s) {unknown}; known options: {', '.join(sorted(DEFAULTS))}")


def resolve_run_options(run_opts: Any = None, hparams: Mapping | None = None,
                        environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Every run option: ``run_opts`` (the command line) > ``$FBRAIN_RUN_OPTS`` > ``hparams`` >
    :data:`DEFAULTS`.

    An unknown name in ``run_opts`` or the environment is a ``ValueError``; hparams may hold
    anything (only the entries named like run options are read).
    """
    from_environment = environment_run_options(environ)
    _check_names(from_environment, f"${ENVIRONMENT}")
    command_line = _overridden(run_opts)
    _check_names(command_line, "run_opts")
    given = {**from_environment, **command_line}
    hparams = hparams or {}
    resolved = {}
    for name, default in DEFAULTS.items():
        if name in given:
            resolved[name] = given[name]
        elif name in hparams:
            resolved[name] = hparams[name]
        else:
            resolved[name] = default
    # SpeechBrain's deprecated spellings of the precision.
    if resolved["auto_mix_prec"]:
        resolved["precision"] = "fp16"
    if resolved["bfloat16_mix_prec"]:
        resolved["precision"] = "bf16"
    validate(resolved)
    return resolved


def validate(opts: dict[str, Any]) -> None:
    """Precise errors for values that would fail later in a confusing way."""
    for name in ("precision", "eval_precision"):
        if opts[name] not in PRECISIONS:
            raise ValueError(f"run option {name}: expected one of {PRECISIONS}, got {opts[name]!r}")
    for name in ("grad_accumulation_factor", "debug_batches", "debug_epochs", "nonfinite_patience",
                 "auto_compile_min_steps"):
        value = opts[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name != "nonfinite_patience" else 0):
            raise ValueError(f"run option {name}: expected a positive int, got {value!r}")
    if opts["compile_steps"] not in (True, False, "auto"):
        raise ValueError(f"run option compile_steps: expected true, false or auto, got {opts['compile_steps']!r}")
    mgn = opts["max_grad_norm"]
    if mgn is not None and (isinstance(mgn, bool) or not isinstance(mgn, (int, float))):
        raise ValueError(f"run option max_grad_norm: expected a number or None, got {mgn!r}")
    limit = opts["optimizer_step_limit"]
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
        raise ValueError(f"run option optimizer_step_limit: expected an int or None, got {limit!r}")
    ema = opts["ema_decay"]
    if ema is not None and (isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0 <= ema <= 1):
        raise ValueError(f"run option ema_decay: expected a number in [0, 1] or None, got {ema!r}")
    if opts["shard_optimizer_state"] and opts["ema_decay"] is not None:
        raise ValueError("run options shard_optimizer_state and ema_decay: the averaged weights would be sharded "
                         "too, and evaluation needs them whole; use one of the two")
    if opts["eval_with_ema"] and ema is None and not opts["test_only"]:
        raise ValueError("run option eval_with_ema: needs ema_decay (e.g. 0.999), the decay of the average "
                         "to evaluate with")
    if opts["ckpt_interval_minutes"] > 0 and opts["ckpt_interval_steps"] > 0:
        raise ValueError(
            "run options ckpt_interval_minutes and ckpt_interval_steps are mutually exclusive; set only one"
        )
