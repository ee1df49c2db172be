"""Run options: one typed table (:data:`OPTIONS`) read from the command line, ``$FBRAIN_RUN_OPTS``,
``run_opts`` and hparams alike, resolved command line > ``$FBRAIN_RUN_OPTS`` > hparams > defaults.

Each option has a kind (:mod:`fbrain.brain.option_kinds`: its type and range), SpeechBrain 1.1's
default where SpeechBrain has the option, and its help text; ``parse_arguments``, the recipes'
``--help`` and docs/run-options.md are made from the same table. Options that fbrain does not
implement are refused (any value but the default is an error saying what to do instead) and are
not listed by ``--help``.

fbrain's own options (``compile_steps``, ``ema_decay`` ...) go on the command line of a script that
parses with fbrain's ``parse_arguments``. A script that parses with SpeechBrain's (unchanged but
for its Brain) would take them for YAML overrides and fail ("Override not found"): give them in
the YAML, in ``run_opts``, or in the environment, e.g.
``FBRAIN_RUN_OPTS="compile_steps=true ema_decay=0.999" python train.py train.yaml``.

Example::

    >>> from fbrain.brain.run_options import resolve_run_options
    >>> opts = resolve_run_options({"max_grad_norm": 1.0}, {"max_grad_norm": 3.0, "debug": True}, environ={})
    >>> opts["max_grad_norm"], opts["debug"], opts["nonfinite_patience"]
    (1.0, True, 3)
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, NamedTuple

from fbrain import precision as _precision
from fbrain.brain.option_kinds import (Choice, Flag, Integer, Kind, Names, Number, Optional, StageColours, Text,
                                       Union)

PRECISIONS = tuple(_precision.PRECISIONS)
# torch.compile's modes (SpeechBrain lists the first three).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class Option(NamedTuple):
    """One run option: what it accepts, its default, what it does.

    ``origin`` is ``"speechbrain"`` (SpeechBrain's option and default, acted on by fbrain),
    ``"fbrain"`` (fbrain's own), ``"compatibility"`` (SpeechBrain's, accepted so a recipe ports
    unchanged, with no effect here: the help says why) or ``"refused"`` (SpeechBrain's, not
    implemented: only the default is accepted; ``help`` says what to use instead).
    """
    kind: Kind
    default: Any
    help: str
    origin: str = "speechbrain"
    on_command_line: bool = True


_FLAG = Flag()
_PRECISION = Choice(*PRECISIONS)

OPTIONS: dict[str, Option] = {
    # -- where and how precisely -------------------------------------------------------------------
    "device": Option(Optional(Text()), None,
                     "the device: cpu, cuda (under torchrun each rank's cuda:LOCAL_RANK), cuda:N or mps; "
                     "none: the machine's accelerator if it has one, else the cpu"),
    "precision": Option(_PRECISION, "fp32", "training precision: fp32, bf16 (autocast) or fp16 (autocast and "
                                            "a dynamic loss scale)"),
    "eval_precision": Option(_PRECISION, "fp32", "evaluation precision: fp32, bf16 or fp16"),
    "auto_mix_prec": Option(_FLAG, False, "SpeechBrain's deprecated spelling of precision=fp16"),
    "bfloat16_mix_prec": Option(_FLAG, False, "SpeechBrain's deprecated spelling of precision=bf16"),
    # -- the update --------------------------------------------------------------------------------
    "max_grad_norm": Option(Optional(Number()), 5.0,
                            "clip all gradients together to this global norm; <= 0 or none disables clipping"),
    "grad_accumulation_factor": Option(Integer(minimum=1), 1, "batches whose gradients make one update"),
    "nonfinite_patience": Option(Integer(minimum=0), 3,
                                 "skipped non-finite steps tolerated per epoch before an error"),
    "skip_nonfinite_grads": Option(_FLAG, False, "no effect: fbrain always skips a step whose loss or "
                                                 "gradients are not finite", origin="compatibility"),
    "optimizer_step_limit": Option(Optional(Integer(minimum=0)), None,
                                   "stop fit after this many optimizer steps; none: run every epoch"),
    "remove_vector_weight_decay": Option(_FLAG, False, "put vectors (biases, norms) in a parameter group "
                                                       "without weight decay"),
    # -- debugging, progress, logs -----------------------------------------------------------------
    "debug": Option(_FLAG, False, "run only debug_batches batches for debug_epochs epochs"),
    "debug_batches": Option(Integer(minimum=1), 2, "batches per stage in debug mode"),
    "debug_epochs": Option(Integer(minimum=1), 2, "epochs in debug mode"),
    "debug_persistently": Option(_FLAG, False, "no effect: fbrain's debug mode keeps no data of its own",
                                 origin="compatibility"),
    "test_only": Option(_FLAG, False, "skip training: fit returns at once, evaluate runs (eval_with_ema "
                                      "then needs no ema_decay)"),
    "noprogressbar": Option(_FLAG, False, "hide the progress bars"),
    "tqdm_colored_bar": Option(_FLAG, False, "colour the progress bars with tqdm_barcolor"),
    "tqdm_barcolor": Option(StageColours(), {"train": "GREEN", "valid": "MAGENTA", "test": "CYAN"},
                            "the progress bars' colours per stage (hparams only)", on_command_line=False),
    "log_config": Option(Optional(Text()), None, "a YAML logging configuration for create_experiment_directory"),
    "param_file": Option(Text(), "", "the hyperparameters file (the command line's first argument)",
                         on_command_line=False),
    # -- checkpoints -------------------------------------------------------------------------------
    "ckpt_interval_minutes": Option(Number(), 0.0, "minutes between intra-epoch checkpoints; <= 0: none"),
    "ckpt_interval_steps": Option(Integer(), 0, "steps between intra-epoch checkpoints; <= 0: none"),
    # -- compiling ---------------------------------------------------------------------------------
    "compile": Option(_FLAG, False, "torch.compile the modules named by compile_module_keys, in place"),
    "compile_module_keys": Option(Optional(Names()), None, "the modules compile compiles; none: all"),
    "compile_mode": Option(Choice(*COMPILE_MODES), "default", "torch.compile's mode, for compile and "
                                                             "compile_steps"),
    "compile_using_fullgraph": Option(_FLAG, False, "compile the modules with fullgraph=True"),
    "compile_using_dynamic_shape_tracing": Option(_FLAG, False, "compile for dynamic shapes from the start"),
    "jit": Option(_FLAG, False, "accepted for the modules that compile also compiles (compile wins, as in "
                                "SpeechBrain); TorchScript itself is refused: use compile"),
    "jit_module_keys": Option(Optional(Names()), None, "the modules jit names; none: all"),
    "compile_steps": Option(Union(_FLAG, Choice("auto")), "auto",
                            "torch.compile the whole train and eval steps (forward, backward, clipping, update): "
                            "true, false, or auto (the train step, when a fit plans at least "
                            "auto_compile_min_steps steps)", origin="fbrain"),
    "auto_compile_min_steps": Option(Integer(minimum=1), 20_000,
                                     "with compile_steps=auto, the fewest planned train steps that compile "
                                     "the train step", origin="fbrain"),
    # -- averaged weights, profiling ---------------------------------------------------------------
    "ema_decay": Option(Optional(Number(0.0, 1.0)), None,
                        "keep an exponential moving average of the weights with this decay (e.g. 0.999)",
                        origin="fbrain"),
    "eval_with_ema": Option(_FLAG, False, "evaluate (valid and test) with the averaged weights of ema_decay",
                            origin="fbrain"),
    "profile_training": Option(_FLAG, False, "profile the first profile_warmup + profile_steps train steps with "
                                             "torch.profiler into <output_folder>/profiler_logs, then stop"),
    "profile_warmup": Option(Integer(minimum=0), 5, "steps the profiler runs before it records"),
    "profile_steps": Option(Integer(minimum=1), 5, "steps the profiler records"),
    # -- several processes -------------------------------------------------------------------------
    "distributed_backend": Option(Choice("nccl", "gloo", "mpi"), "nccl",
                                  "the process group's backend under torchrun on CUDA (the CPU always uses gloo)"),
    "shard_optimizer_state": Option(_FLAG, False, "under torchrun, keep and update 1/N of the optimizer state "
                                                  "on each rank (ZeRO)", origin="fbrain"),
    "find_unused_parameters": Option(_FLAG, False, "no effect: fbrain wraps no module in DDP, so there "
                                                   "are no unused parameters to search for", origin="compatibility"),
    "distributed_launch": Option(_FLAG, False, "no effect: set by the Brain from torchrun's environment",
                                 origin="compatibility"),
    "data_parallel_backend": Option(_FLAG, False, "single-process DataParallel is not implemented; launch "
                                                  "with torchrun (one process per device) instead",
                                    origin="refused"),
    "data_parallel_count": Option(Integer(), -1, "no effect: belongs to data_parallel_backend, which fbrain "
                                                 "refuses", origin="compatibility"),
}

DEFAULTS: dict[str, Any] = {name: option.default for name, option in OPTIONS.items()}


def read_text(name: str, text: str, where: str) -> Any:
    """The value of option ``name`` written as ``text`` (the command line, the environment)."""
    try:
        return OPTIONS[name].kind.from_text(text)
    except ValueError as err:
        raise ValueError(f"{where}: run option {name}: {err}") from None


def check_value(name: str, value: Any, where: str) -> Any:
    """``value`` for option ``name`` (from ``run_opts`` or hparams), checked and normalised; an option
    fbrain refuses accepts only its default."""
    option = OPTIONS[name]
    try:
        checked = option.kind.check(value)
    except ValueError as err:
        raise ValueError(f"{where}: run option {name}: {err}{_quoted_hint(option.kind, value, where)}") from None
    if option.origin == "refused" and checked != option.default:
        raise ValueError(f"{where}: run option {name}={checked!r}: {option.help}")
    return checked


def _quoted_hint(kind: Kind, value: Any, where: str) -> str:
    """For a YAML value the kind would take as text (``"False"``, ``"15"``): say to drop the quotes."""
    if where != "hparams" or not isinstance(value, str):
        return ""
    try:
        kind.from_text(value)
    except ValueError:
        return ""
    return "; in YAML write it without quotes"


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
    each value written as on the command line (``true``, ``0.999``, ``none``, ``fp16``; a list of
    names with commas: ``compile_module_keys=encoder,decoder``).

    Example::

        >>> environment_run_options({"FBRAIN_RUN_OPTS": "compile_steps=true, ema_decay=0.999"})
        {'compile_steps': True, 'ema_decay': 0.999}
    """
    text = environ.get(ENVIRONMENT, "")
    where = f"${ENVIRONMENT}"
    if len(text) > 10_000:
        raise ValueError(f"{where}: {len(text)} characters; expected a few name=value items")
    items = {}
    # Items split at spaces or commas before the next `name=`: a list keeps its commas (`keys=enc,dec`).
    for item in re.split(r"[\s,]+(?=[A-Za-z_][A-Za-z0-9_]*=)", text.strip()):
        item = item.strip(" ,\t\n")
        if not item:
            continue
        match = _ENV_ITEM.match(item)
        if match is None:
            raise ValueError(f"{where}: expected name=value items (e.g. compile_steps=true), got {item!r}")
        items[match.group(1)] = match.group(2)
    _check_names(items, where)
    return {name: read_text(name, raw, where) for name, raw in items.items()}


def _check_names(given: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown run option(s) {unknown}; known options: {', '.join(sorted(OPTIONS))}")


def resolve_run_options(run_opts: Any = None, hparams: Mapping | None = None,
                        environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Every run option: ``run_opts`` (the command line) > ``$FBRAIN_RUN_OPTS`` > ``hparams`` >
    the defaults of :data:`OPTIONS`, each value checked against its option's kind.

    An unknown name in ``run_opts`` or the environment is a ``ValueError``; hparams may hold
    anything (only the entries named like run options are read, and checked).
    """
    from_environment = environment_run_options(environ)
    command_line = _overridden(run_opts)
    _check_names(command_line, "run_opts")
    hparams = hparams or {}
    resolved = {}
    for name, option in OPTIONS.items():
        if name in command_line:
            resolved[name] = check_value(name, command_line[name], "run_opts")
        elif name in from_environment:
            resolved[name] = check_value(name, from_environment[name], f"${ENVIRONMENT}")
        elif name in hparams:
            resolved[name] = check_value(name, hparams[name], "hparams")
        else:
            resolved[name] = option.default
    # SpeechBrain's deprecated spellings of the precision.
    if resolved["auto_mix_prec"]:
        resolved["precision"] = "fp16"
    if resolved["bfloat16_mix_prec"]:
        resolved["precision"] = "bf16"
    _check_together(resolved)
    return resolved


def _check_together(opts: dict[str, Any]) -> None:
    """Options that are each valid but not together."""
    if opts["shard_optimizer_state"] and opts["ema_decay"] is not None:
        raise ValueError("run options shard_optimizer_state and ema_decay: the averaged weights would be sharded "
                         "too, and evaluation needs them whole; use one of the two")
    if opts["eval_with_ema"] and opts["ema_decay"] is None and not opts["test_only"]:
        raise ValueError("run option eval_with_ema: needs ema_decay (e.g. 0.999), the decay of the average "
                         "to evaluate with")
    if opts["ckpt_interval_minutes"] > 0 and opts["ckpt_interval_steps"] > 0:
        raise ValueError(
            "run options ckpt_interval_minutes and ckpt_interval_steps are mutually exclusive; set only one"
        )


def options_markdown() -> str:
    """The table of every run option, as docs/run-options.md holds it (a test keeps the two equal)."""
    rows = ["| option | accepts | default | what it does |", "|---|---|---|---|"]
    for name, option in OPTIONS.items():
        note = {"fbrain": " *(fbrain's own)*", "compatibility": " *(accepted for compatibility)*",
                "refused": " *(refused)*"}.get(option.origin, "")
        where = "" if option.on_command_line else " Not on the command line."
        rows.append(f"| `{name}` | {option.kind.expected} | `{option.default}` | {option.help}.{where}{note} |")
    return "\n".join(rows)
