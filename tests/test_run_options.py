"""Run options: one typed table read by the command line, $FBRAIN_RUN_OPTS, run_opts and hparams
alike; --help, the recipes' --help and docs/run-options.md made from it."""

import json
import math
import pathlib
import re
import subprocess
import sys

import pytest

import fbrain
from fbrain.brain.arguments import _parser, command_line_options, parse_arguments
from fbrain.brain.option_kinds import Optional
from fbrain.brain.run_options import OPTIONS, environment_run_options, options_markdown, resolve_run_options

REPO = pathlib.Path(__file__).resolve().parents[1]


def _text(value) -> str:
    """How a user writes ``value`` on a command line."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return " ".join(value)
    return str(value)


@pytest.mark.parametrize("text, expected", [("true", True), ("True", True), ("false", False), ("auto", "auto"),
                                            ("on", True), ("0", False)])
def test_compile_steps_parses_on_the_command_line(text, expected):
    _, opts, overrides = parse_arguments(["hp.yaml", "--compile_steps", text])
    assert opts == {"compile_steps": expected} and overrides == ""
    _, opts, _ = parse_arguments(["hp.yaml", f"--compile_steps={text}"])
    assert opts == {"compile_steps": expected}


def test_a_bare_switch_means_true_and_bad_values_exit_naming_the_option(capsys):
    assert parse_arguments(["hp.yaml", "--compile_steps"])[1] == {"compile_steps": True}
    assert parse_arguments(["hp.yaml", "--debug", "--noprogressbar"])[1] == {"debug": True, "noprogressbar": True}
    for argv, message in [(["--compile_steps", "maybe"], "compile_steps: expected true, false or auto"),
                          (["--max_grad_norm", "nan"], "max_grad_norm: expected a finite number, or none"),
                          (["--grad_accumulation_factor", "0"], "grad_accumulation_factor: expected an int >= 1"),
                          (["--ema_decay", "1.5"], "ema_decay: expected a finite number in [0, 1], or none"),
                          (["--precision", "fp8"], "precision: expected one of fp32, bf16, fp16"),
                          (["--data_parallel_backend"], "data_parallel_backend=True: single-process DataParallel")]:
        with pytest.raises(SystemExit) as exited:
            parse_arguments(["hp.yaml", *argv])
        assert exited.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(command_line_options()))
def test_every_command_line_option_reads_its_own_default_back(name):
    """The table agrees with itself: the default, written as text, parses to the default on the
    command line and in $FBRAIN_RUN_OPTS alike (none, flags, lists, "auto", numbers)."""
    default = OPTIONS[name].default
    _, opts, overrides = parse_arguments(["hp.yaml", f"--{name}", *_text(default).split()])
    assert overrides == "" and opts == {name: default}
    if not isinstance(default, list):
        assert environment_run_options({"FBRAIN_RUN_OPTS": f"{name}={_text(default)}"}) == {name: default}


def test_help_lists_exactly_the_accepted_options_once_each_with_help():
    parser = _parser()
    listed = {}
    for action in parser._actions:  # argparse's own record of what --help prints
        if action.help == "==SUPPRESS==" or not action.option_strings or action.dest == "help":
            continue
        listed[action.dest] = action.help
    assert list(listed) == list(command_line_options())
    assert all(help_text and "(default: " in help_text for help_text in listed.values())
    text = parser.format_help().split("\noptions:\n")[1]  # the listing, below the usage line
    for name in OPTIONS:
        occurrences = len(re.findall(rf"--{name}\b", text))
        assert occurrences == (1 if name in command_line_options() else 0), name
    assert "tqdm_barcolor" not in command_line_options() and "param_file" not in command_line_options()
    assert "data_parallel_backend" not in command_line_options()


def test_the_recipes_help_lists_each_setting_once():
    from fbrain.recipes.common import usage

    for recipe in ("enhancement", "separation"):
        text = usage(recipe, str(REPO / "recipes" / f"{recipe}.yaml"))
        names = re.findall(r"^  --(\w+)", text, flags=re.M)
        assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
        assert set(command_line_options()) <= set(names)
        assert "tqdm_barcolor" not in names and "param_file" not in names


def test_docs_hold_the_tables_own_text():
    doc = (REPO / "docs" / "run-options.md").read_text()
    table = doc.split("<!-- run-options-table:start -->\n")[1].split("<!-- run-options-table:end -->")[0]
    assert table.strip() == options_markdown(), "regenerate docs/run-options.md's table from options_markdown()"


@pytest.mark.parametrize("name, value, message", [
    ("noprogressbar", "False", "noprogressbar: expected true or false, got 'False'"),
    ("max_grad_norm", math.nan, "max_grad_norm: expected a finite number, or none"),
    ("max_grad_norm", True, "max_grad_norm"),
    ("grad_accumulation_factor", 2.0, "grad_accumulation_factor: expected an int >= 1, got 2.0"),
    ("optimizer_step_limit", -5, "optimizer_step_limit"),
    ("compile_steps", "yes please", "compile_steps"),
    ("shard_optimizer_state", "false", "shard_optimizer_state: expected true or false"),
    ("compile_module_keys", "encoder", "compile_module_keys: expected a list of names"),
    ("data_parallel_backend", True, "single-process DataParallel is not implemented; launch with torchrun"),
])
def test_hparams_and_run_opts_are_held_to_the_same_kinds(name, value, message):
    for where, kwargs in [("hparams", {"hparams": {name: value}}), ("run_opts", {"run_opts": {name: value}})]:
        with pytest.raises(ValueError, match=re.escape(message)) as raised:
            resolve_run_options(environ={}, **kwargs)
        assert str(raised.value).startswith(f"{where}: run option {name}")


def test_a_quoted_yaml_value_is_told_to_lose_its_quotes():
    with pytest.raises(ValueError, match="got 'False'; in YAML write it without quotes"):
        resolve_run_options(hparams={"noprogressbar": "False"}, environ={})
    with pytest.raises(ValueError, match=r"got 'maybe'$"):  # not a flag's text either: no such hint
        resolve_run_options(hparams={"noprogressbar": "maybe"}, environ={})


def test_the_three_sources_give_equal_values():
    given = {"compile_steps": "auto", "max_grad_norm": "none", "ema_decay": "0.99", "ckpt_interval_minutes": "15",
             "compile_module_keys": "enc,dec", "device": "cpu", "precision": "bf16", "nonfinite_patience": "0"}
    from_command_line = parse_arguments(["hp.yaml", *(f"--{k}={v}" for k, v in given.items()
                                                      if k != "compile_module_keys"),
                                         "--compile_module_keys", "enc", "dec"])[1]
    from_environment = environment_run_options({"FBRAIN_RUN_OPTS": " ".join(f"{k}={v}" for k, v in given.items())})
    from_yaml_values = {"compile_steps": "auto", "max_grad_norm": None, "ema_decay": 0.99, "ckpt_interval_minutes": 15,
                        "compile_module_keys": ["enc", "dec"], "device": "cpu", "precision": "bf16",
                        "nonfinite_patience": 0}
    resolved = [resolve_run_options(run_opts=from_command_line, environ={}),
                resolve_run_options(environ={"FBRAIN_RUN_OPTS": " ".join(f"{k}={v}" for k, v in given.items())}),
                resolve_run_options(hparams=from_yaml_values, environ={})]
    assert from_command_line == from_environment
    assert resolved[0] == resolved[1] == resolved[2]
    assert resolved[0]["ckpt_interval_minutes"] == 15.0 and isinstance(resolved[0]["ckpt_interval_minutes"], float)


@pytest.mark.speechbrain
def test_speechbrains_defaults_where_speechbrain_has_the_option():
    """SpeechBrain's RunOptions defaults, read from its own class (in a subprocess: importing
    SpeechBrain changes global torch flags)."""
    script = ("import json; from speechbrain.utils.run_opts import RunOptions; d = RunOptions().as_dict(); "
              "d.pop('overridden_args'); print(json.dumps(d))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    ours = {name: option.default for name, option in OPTIONS.items() if option.origin != "fbrain"}
    assert set(ours) == set(theirs)
    for name, default in theirs.items():
        assert ours[name] == default, name


def test_optional_kinds_say_none_is_accepted():
    for name, option in OPTIONS.items():
        if option.default is None:
            assert isinstance(option.kind, Optional), name
    assert fbrain.parse_arguments(["hp.yaml", "--optimizer_step_limit", "None"])[1] == {"optimizer_step_limit": None}
