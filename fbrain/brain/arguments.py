"""``parse_arguments``: SpeechBrain's command line, each run option read by its kind in the one
typed table (:data:`fbrain.brain.run_options.OPTIONS`), which also makes ``--help``.

Returns ``(hparams_file, run_opts, overrides)``: ``run_opts`` holds only the options given on
the command line (so hparams can still set the others), ``overrides`` is the YAML text of the
remaining ``--name value`` pairs, ready for ``load_hyperpyyaml``.

Example::

    >>> from fbrain.brain.arguments import parse_arguments
    >>> f, opts, overrides = parse_arguments(
    ...     ["train.yaml", "--device=cuda:1", "--max_grad_norm", "2", "--noprogressbar=False", "--lr", "0.1",
    ...      "--compile_steps", "true"])
    >>> f, overrides
    ('train.yaml', 'lr: 0.1')
    >>> opts
    {'device': 'cuda:1', 'max_grad_norm': 2.0, 'noprogressbar': False, 'compile_steps': True}
"""

from __future__ import annotations

import argparse
import sys

from fbrain.brain.option_kinds import Flag, Names, Optional, Union
from fbrain.brain.run_options import OPTIONS, Option, check_value, read_text


def command_line_options() -> dict[str, Option]:
    """The run options a command line takes: what ``--help`` lists, each once. SpeechBrain's
    ``tqdm_barcolor`` (a dict) and ``param_file`` (the first argument) are not options there, and
    options fbrain refuses are not offered."""
    return {name: option for name, option in OPTIONS.items()
            if option.on_command_line and option.origin != "refused"}


def _is_switch(kind) -> bool:
    """Options that may stand alone (``--debug``) meaning true."""
    return isinstance(kind, Flag) or (isinstance(kind, Union) and any(isinstance(k, Flag) for k in kind.kinds))


def _reader(name: str):
    def read(text: str):
        try:
            return read_text(name, text, "command line")
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("command line: ")) from None
    read.__name__ = name  # argparse names the option's type in some messages
    return read


def option_help(option: Option) -> str:
    """An option's help line with its default (and what kind of option it is)."""
    origin = {"fbrain": " [fbrain's own]", "compatibility": " [accepted for compatibility]"}.get(option.origin, "")
    return f"{option.help}{origin} (default: {option.default})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run an fbrain (SpeechBrain-style) experiment. Other --name value "
                                                 "pairs override the hyperparameters file's entries.",
                                     argument_default=argparse.SUPPRESS,
                                     allow_abbrev=False)  # `--data` must not become `--data_parallel_...`
    parser.add_argument("param_file", help="the hyperparameters file (HyperPyYAML)")
    offered = command_line_options()
    for name, option in OPTIONS.items():
        if not option.on_command_line:
            continue
        # A refused option is parsed (so its error can say what to do instead), never offered.
        kwargs = {"help": option_help(option) if name in offered else argparse.SUPPRESS}
        inner = option.kind.kind if isinstance(option.kind, Optional) else option.kind
        if isinstance(inner, Names):
            kwargs.update(nargs="*", type=str)  # `--compile_module_keys enc dec`, as SpeechBrain
        else:
            kwargs["type"] = _reader(name)
            if _is_switch(option.kind):
                # `--flag` switches on, `--flag=False` (or `--flag false`) switches off.
                kwargs.update(nargs="?", const=True)
        parser.add_argument(f"--{name}", metavar="VALUE", **kwargs)
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
    """``(hparams_file, run_opts, overrides)`` from ``argv`` (default ``sys.argv[1:]``).

    A bad value, or an option fbrain refuses, exits with argparse's usage error naming it.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    parsed, extra = parser.parse_known_args(argv)
    run_opts = vars(parsed)
    hparams_file = run_opts.pop("param_file")
    try:
        for name, value in run_opts.items():
            if isinstance(value, list):  # `--compile_module_keys enc dec` (or `none`): read as one text
                value = read_text(name, " ".join(value), "command line")
            run_opts[name] = check_value(name, value, "command line")
    except ValueError as err:
        parser.error(str(err))
    return hparams_file, run_opts, _to_yaml(extra)

