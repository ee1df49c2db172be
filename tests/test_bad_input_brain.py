"""Bad arguments to the Brain (issue 28's probes): each a named error before anything changes, never
a silent coercion or a late, obscure failure."""

import pytest
import torch

import fbrain
from conftest import RegressionBrain
from fbrain import optim
from fbrain.devices import DeviceError

QUIET = {"noprogressbar": True, "device": "cpu"}


def data(n=8, features=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(4, features, generator=g), "y": torch.randn(4, 2, generator=g)} for _ in range(n)]


def brain(features=4, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("opt_class", lambda p: torch.optim.SGD(p, lr=0.1))
    kwargs.setdefault("run_opts", QUIET)
    return RegressionBrain({"model": torch.nn.Linear(features, 2)}, **kwargs)


@pytest.mark.parametrize("seed, error", [("42", TypeError), (42.0, TypeError), (True, TypeError), (None, TypeError),
                                         (2**70, ValueError), (-1, ValueError)])
def test_a_seed_that_is_not_a_64_bit_int_is_named(seed, error):
    with pytest.raises(error, match=r"hparams\['seed'\]: expected an int in \[0, 2\*\*63\)"):
        brain(hparams={"seed": seed})
    assert brain(hparams={"seed": 2**63 - 1}).seed == 2**63 - 1


def test_a_checkpointer_that_is_a_path_says_how_to_make_one(tmp_path):
    with pytest.raises(TypeError, match=r"checkpointer: expected a Checkpointer .* got str; to keep checkpoints in "
                                        r".*pass checkpointer=sb.Checkpointer"):
        brain(checkpointer=str(tmp_path / "save"))


def test_a_checkpointer_whose_brain_name_is_taken_by_another_object_is_named(tmp_path):
    model = torch.nn.Linear(4, 2)
    checkpointer = fbrain.Checkpointer(tmp_path, {"brain": model})
    with pytest.raises(ValueError, match="its recoverable 'brain' is a Linear, but the Brain registers itself"):
        brain(checkpointer=checkpointer)
    # A Brain already there (an earlier Brain on the same checkpointer) gives the name to the newest.
    checkpointer = fbrain.Checkpointer(tmp_path / "other")
    first = brain(checkpointer=checkpointer)
    second = brain(checkpointer=checkpointer)
    assert checkpointer.recoverables["brain"] is second and first is not second


def test_a_transformation_as_opt_class_fits_twice():
    b = brain(opt_class=optim.adam(1e-2))
    b.fit(range(1, 2), data())
    first = {k: v.clone() for k, v in b.state.params.items()}
    b.fit(range(1, 2), data())  # was: TypeError: 'OptimizerView' object is not callable
    assert isinstance(b.opt_class, optim.GradientTransformation)
    assert any(not torch.equal(first[k], v) for k, v in b.state.params.items())


def test_another_models_state_is_refused_before_anything_changes():
    b = brain()
    b.fit(range(1, 2), data())
    before = b.state
    weight = b.modules.model.weight
    shape = tuple(weight.shape)
    other = fbrain.TrainState.create(torch.nn.ModuleDict({"model": torch.nn.Linear(3, 5)}), optim.sgd(0.1))
    with pytest.raises(ValueError, match=r"Brain.state.params\['model.weight'\]: expected shape \(2, 4\) torch.float32 "
                                         r"\(the module's\), got shape \(5, 3\)"):
        b.state = other
    assert b.state is before and tuple(b.modules.model.weight.shape) == shape
    assert b.modules.model.weight.data_ptr() == before.params["model.weight"].data_ptr()
    renamed = before.replace(params={"w": before.params["model.weight"], "model.bias": before.params["model.bias"]})
    with pytest.raises(KeyError, match=r"missing \['model.weight'\], unexpected \['w'\]"):
        b.state = renamed
    assert b.state is before


def test_fit_with_a_number_of_epochs_says_what_to_give():
    with pytest.raises(TypeError, match=r"fit: epoch_counter: expected an iterable .* got int \(for 5 epochs: "
                                        r"range\(1, 6\) or sb.EpochCounter\(5\)\)"):
        brain().fit(5, data())


def test_a_device_this_torch_cannot_use_is_named_when_the_brain_is_built():
    with pytest.raises(DeviceError, match="device 'xla': not available in this torch"):
        brain(run_opts={**QUIET, "device": "xla"})


@pytest.mark.parametrize("name, value, message", [
    ("shard_optimizer_state", "false", "shard_optimizer_state: expected true or false, got 'false'"),
    ("noprogressbar", "False", "noprogressbar: expected true or false, got 'False'"),
    ("ckpt_interval_minutes", "15", "ckpt_interval_minutes: expected a finite number, got '15'"),
    ("ckpt_interval_steps", "5", "ckpt_interval_steps: expected an int, got '5'"),
    ("optimizer_step_limit", -5, "optimizer_step_limit: expected an int >= 0, or none, got -5"),
    ("max_grad_norm", float("nan"), "max_grad_norm: expected a finite number, or none, got nan"),
])
def test_run_options_from_hparams_are_typed_not_truth_tested(name, value, message):
    with pytest.raises(ValueError, match=f"hparams: run option {message}"):
        brain(hparams={name: value}, run_opts={"device": "cpu"})


# -- any value, any option: a named error or a checked value ------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from fbrain.brain.run_options import OPTIONS, resolve_run_options  # noqa: E402

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**80, max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["true", "False", "auto", "none", "15", "fp16", "cuda:0", "nan"]),
    st.lists(st.text(max_size=4), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(sorted(OPTIONS)), value=ANY_VALUE, where=st.sampled_from(["hparams", "run_opts"]))
def test_any_value_for_any_run_option_is_a_named_error_or_a_value_of_its_kind(name, value, where):
    try:
        resolved = resolve_run_options(**{where: {name: value}}, environ={})
    except ValueError as err:
        # A value of the wrong kind names its source; one that conflicts with another option's
        # default (eval_with_ema without ema_decay) names both options.
        assert str(err).startswith((f"{where}: run option {name}", "run option")) and name in str(err), err
        return
    option = OPTIONS[name]
    assert option.kind.check(resolved[name]) == resolved[name]  # what the Brain gets is of the option's kind
    if option.origin == "refused":
        assert resolved[name] == option.default


@settings(max_examples=100, deadline=None)
@given(seed=ANY_VALUE)
def test_any_seed_is_a_named_error_or_the_brains_seed(seed):
    try:
        b = brain(hparams={"seed": seed})
    except (TypeError, ValueError) as err:
        assert str(err).startswith("hparams['seed']: expected an int in [0, 2**63)"), err
        return
    assert b.seed == seed and type(seed) is int
