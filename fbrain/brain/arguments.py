"""``parse_arguments``: SpeechBrain's command line, with each option's proper type.

Returns ``(hparams_file, run_opts, overrides)``: ``run_opts`` holds only the options given on
the command line (so hparams can still set the others), ``overrides`` is the YAML text of the
remaining ``--name value`` pairs, ready for ``load_hyperpyyaml``.

Example::

    >>> from fbrain.brain.arguments import parse_arguments
    >>> f, opts, overrides = parse_arguments(
    ...     ["train.yaml", "--device=cuda:1", "--max_grad_norm", "2", "--noprogressbar=False", "--lr", "0.1"])
    >>> f, opts, overrides
    ('train.yaml', {'device': 'cuda:1', 'max_grad_norm': 2.0, 'noprogressbar': False}, 'lr: 0.1')
"""

from __future__ import annotations

import argparse
import sys

from fbrain.brain.run_options import DEFAULTS, HELP, PRECISIONS

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {text!r}")


def _optional_int(text: str):
    return None if text.lower() == "none" else int(text)


def _optional_float(text: str):
    return None if text.lower() == "none" else float(text)


# Options whose default does not tell their type.
_TYPES = {
    "device": str,
    "log_config": str,
    "optimizer_step_limit": _optional_int,
    "ema_decay": _optional_float,
    "max_grad_norm": float,
    "ckpt_interval_minutes": float,
}
_LISTS = ("compile_module_keys", "jit_module_keys")
_NOT_ON_COMMAND_LINE = ("tqdm_barcolor", "param_file")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run an fbrain (SpeechBrain-style) experiment",
                                     argument_default=argparse.SUPPRESS,
                                     allow_abbrev=False)  # `--data` must not become `--data_parallel_...`
    parser.add_argument("param_file", help="the hyperparameters file (HyperPyYAML)")
    for name, default in DEFAULTS.items():
        if name in _NOT_ON_COMMAND_LINE:
            continue
        kwargs = {"help": HELP.get(name, "see SpeechBrain's run options")}
        if name in _LISTS:
            kwargs.update(nargs="*", type=str)
        elif isinstance(default, bool):
            # `--flag` switches on, `--flag=False` (or `--flag False`) switches off.
            kwargs.update(nargs="?", const=True, type=_boolean)
        elif name in _TYPES:
            kwargs["type"] = _TYPES[name]
        else:
            kwargs["type"] = type(default)
        if "precision" in name and not name.endswith("mix_prec"):
            kwargs["choices"] = PRECISIONS
        parser.add_argument(f"--{name}", **kwargs)
    return parser


def _to_yaml(extra: list[str]) -> str:
    """``["--a=1", "--b", "x y"]`` -> ``"a: 1\\nb: x y"`` (SpeechBrain's override format)."""
    lines: list[str] = []
    for token in extra:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            lines.append(f"{name}:" + (f" {value}" if eq else ""))
        elif lines:
            lines[-1] += f" {token}"
        else:
            raise ValueError(f"parse_arguments: unexpected argument {token!r} (expected --name value)")
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None = None) -> tuple[str, dict, str]:
    """``(hparams_file, run_opts, overrides)`` from ``argv`` (default ``sys.argv[1:]``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parsed, extra = _parser().parse_known_args(argv)
    run_opts = vars(parsed)
    hparams_file = run_opts.pop("param_file")
    return hparams_file, run_opts, _to_yaml(extra)
