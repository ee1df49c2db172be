"""Bad inputs to the pure step and the optimizers are named errors, raised before anything runs.

* a state whose optimizer state does not fit its parameters (params replaced by a bigger model's:
  once a segfault in ATen's fused Adam) or that another optimizer made;
* hyperparameters that are not finite numbers in torch.optim's ranges, in every constructor and in
  ``set_hyperparams``;
* parameters with ``requires_grad=False``: trained unless the optimizer freezes them (documented).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fbrain
from fbrain import optim
from conftest import REPO, clone_tree, trees_equal

NAN, INF = float("nan"), float("inf")


def loss_of(model):
    def loss_fn(params, buffers, batch, rng):
        return fbrain.apply_module(model, params, buffers, batch)[0].pow(2).mean()
    return loss_fn


def run_isolated(code: str) -> str:
    """``code`` run in a fresh interpreter (a crash there fails this test instead of killing pytest),
    after a helper ``attempt(step, state, batch)`` that prints the step's error and whether the
    state was left as it was; its stdout."""
    done = subprocess.run([sys.executable, "-c", ATTEMPT + textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"exit status {done.returncode} (-11 or 139: a segfault)\n{done.stderr[-3000:]}"
    return done.stdout


ATTEMPT = """
import torch, fbrain
from fbrain import optim

def attempt(step, state, batch):
    before = [t.clone() for t in fbrain.tree.tree_leaves(state)]
    try:
        step(state, batch)
        print("RAN")
    except ValueError as err:
        print("ERROR", err)
    same = all(torch.equal(a, b) for a, b in zip(fbrain.tree.tree_leaves(state), before))
    print("UNCHANGED" if same else "CHANGED")
"""


def test_a_state_whose_params_are_a_bigger_models_is_refused_before_the_fused_kernel_runs():
    out = run_isolated("""
        opt = optim.adam(1e-2)
        state = fbrain.TrainState.create(torch.nn.Linear(256, 256), opt)
        new = torch.nn.Linear(256, 4096)
        state = state.replace(params={k: v.detach().clone() for k, v in new.named_parameters()})
        loss_fn = lambda p, b, x, r: fbrain.apply_module(new, p, b, x)[0].pow(2).mean()
        for donate in (False, True):
            attempt(fbrain.make_train_step(loss_fn, opt, donate_state=donate), state, torch.randn(8, 256))
    """)
    expected = ("ERROR state.opt_state.mu['weight']: expected shape (4096, 256) for params['weight'], got (256, 256); "
                "the optimizer state was made for other parameters: rebuild it with TrainState.create(model, opt) "
                "or opt.init(params)\nUNCHANGED\n")
    assert out == expected * 2


def test_a_moment_of_another_shape_or_dtype_is_refused():
    out = run_isolated("""
        model, opt = torch.nn.Linear(4, 2), optim.adam(1e-2)
        state = fbrain.TrainState.create(model, opt)
        step = fbrain.make_train_step(lambda p, b, x, r: fbrain.apply_module(model, p, b, x)[0].pow(2).mean(), opt)
        s = state.opt_state
        for bad in (s._replace(mu={**s.mu, "weight": torch.zeros(2, 3)}),
                    s._replace(nu={**s.nu, "bias": torch.zeros(2, dtype=torch.float64)})):
            attempt(step, state.replace(opt_state=bad), torch.randn(8, 4))
    """)
    lines = out.splitlines()
    assert lines[0].startswith("ERROR state.opt_state.mu['weight']: expected shape (2, 4) for params['weight'], "
                               "got (2, 3); the optimizer state was made for other parameters")
    assert lines[2].startswith("ERROR state.opt_state.nu['bias']: expected dtype torch.float32 for params['bias'], "
                               "got torch.float64")
    assert lines[1] == lines[3] == "UNCHANGED"


@pytest.mark.parametrize("made_by, stepped_by, where", [
    (optim.adam(1e-2), optim.sgd(0.1), "state.opt_state: expected SGDState"),
    (optim.adamax(), optim.nadam(), "state.opt_state.slots: expected the keys"),
    (optim.adam(), optim.adam(amsgrad=True), "state.opt_state.nu_max: expected the keys ['weight', 'bias'], got []"),
    (optim.sgd(0.1), optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1)), "state.opt_state: expected tuple"),
])
def test_a_state_made_by_another_optimizer_is_refused(made_by, stepped_by, where):
    model = torch.nn.Linear(4, 2)
    state = fbrain.TrainState.create(model, made_by)
    before = clone_tree(state)
    with pytest.raises(ValueError) as err:
        fbrain.make_train_step(loss_of(model), stepped_by)(state, torch.randn(8, 4))
    assert str(err.value).startswith(where)
    assert "the state was made by another optimizer" in str(err.value)
    assert trees_equal(state, before)


def test_the_check_accepts_changed_hyperparameters_and_checks_each_layout_once():
    model, opt = torch.nn.Linear(4, 2), optim.adam(1e-2)
    state = fbrain.TrainState.create(model, opt)
    state = state.replace(opt_state=optim.set_hyperparams(state.opt_state, lr=0.5, beta1=0.5, eps=1e-3))
    step = fbrain.make_train_step(loss_of(model), opt)
    state, _ = step(state, torch.randn(8, 4))
    state, _ = step(state, torch.randn(8, 4))
    assert int(state.counters.optimizer_step) == 2
    assert len(step._opt_layouts) == 1  # recorded by value: the second state's layout was the first's


@pytest.mark.parametrize("build, message", [
    (lambda: optim.adam(lr=NAN), "adam: lr: expected a finite number >= 0, got nan"),
    (lambda: optim.adam(lr=INF), "adam: lr: expected a finite number >= 0, got inf"),
    (lambda: optim.adam(lr=-1e-3), "adam: lr: expected a finite number >= 0, got -0.001"),
    (lambda: optim.adam(betas=(NAN, 0.999)), "adam: betas[0]: expected a finite number in [0, 1), got nan"),
    (lambda: optim.adamw(betas=(0.9, 1.0)), "adamw: betas[1]: expected a finite number in [0, 1), got 1.0"),
    (lambda: optim.adam(eps=-1.0), "adam: eps: expected a finite number >= 0"),
    (lambda: optim.sgd(lr=NAN), "sgd: lr: expected a finite number >= 0, got nan"),
    (lambda: optim.sgd(0.1, momentum=-0.5), "sgd: momentum: expected a finite number >= 0, got -0.5"),
    (lambda: optim.sgd(lr=10**400), "sgd: lr: expected a finite number >= 0, got an int of 1329 bits"),
    (lambda: optim.rmsprop(alpha=NAN), "rmsprop: alpha: expected a finite number in [0, 1], got nan"),
    (lambda: optim.adagrad(initial_accumulator_value=-1), "adagrad: initial_accumulator_value: expected a finite"),
    (lambda: optim.adadelta(rho=1.5), "adadelta: rho: expected a finite number in [0, 1], got 1.5"),
    (lambda: optim.adamax(betas=None), "adamax: betas: expected a pair (beta1, beta2), got None"),
    (lambda: optim.nadam(momentum_decay=INF), "nadam: momentum_decay: expected a finite number >= 0, got inf"),
    (lambda: optim.radam(weight_decay=-1), "radam: weight_decay: expected a finite number >= 0, got -1.0"),
    (lambda: optim.clip_by_global_norm(NAN), "clip_by_global_norm: max_norm: expected a finite number >= 0, got nan"),
    (lambda: optim.with_ema(optim.sgd(0.1), NAN), "with_ema: decay: expected a finite number in [0, 1], got nan"),
    (lambda: optim.adam(lr=torch.tensor(NAN)), "adam: lr: expected a finite number >= 0, got nan"),
    (lambda: optim.adam(lr="fast"), "adam: lr: expected a number, a 0-dim tensor or a schedule, got str"),
    (lambda: optim.sgd(lr=True), "sgd: lr: expected a number, a 0-dim tensor or a schedule, got bool"),
    (lambda: fbrain.make_train_step(lambda *a: 0, optim.sgd(0.1), max_grad_norm=NAN), "max_grad_norm: expected a finite float32 number"),
])
def test_bad_hyperparameters_are_named_by_optimizer_and_parameter(build, message):
    with pytest.raises((ValueError, TypeError)) as err:
        build()
    assert str(err.value).startswith(message)


def test_set_hyperparams_refuses_what_the_constructors_refuse_and_keeps_tensor_learning_rates():
    model = torch.nn.Linear(4, 2)
    state = fbrain.TrainState.create(model, optim.adam(1e-2))
    before = clone_tree(state)
    for values, message in [({"lr": NAN}, "set_hyperparams: lr: expected a finite number >= 0, got nan"),
                            ({"lr": torch.tensor(-1.0)}, "set_hyperparams: lr: expected a finite number >= 0, got -1.0"),
                            ({"beta1": 1.0}, "set_hyperparams: beta1: expected a finite number in [0, 1), got 1.0"),
                            ({"eps": "small"}, "set_hyperparams: eps: expected a number, got str")]:
        with pytest.raises((ValueError, TypeError)) as err:
            optim.set_hyperparams(state.opt_state, **values)
        assert str(err.value).startswith(message)
    assert trees_equal(state, before)
    # A tensor learning rate (meta-learning) stays allowed; one that requires grad is not read.
    lr = torch.tensor(0.05, requires_grad=True)
    opt_state = optim.set_hyperparams(state.opt_state, lr=lr)
    assert float(opt_state.hyperparams["lr"]) == pytest.approx(0.05)


def test_a_requires_grad_false_parameter_is_trained_unless_the_optimizer_freezes_it():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    names = {n for n, p in model.named_parameters() if not p.requires_grad}
    batch = torch.randn(8, 4)
    # The state holds no requires_grad flag: a plain optimizer trains every parameter (with a warning).
    with pytest.warns(UserWarning, match=r"params \['0.bias', '0.weight'\] have requires_grad=False"):
        state = fbrain.TrainState.create(model, optim.sgd(0.1))
    new, _ = fbrain.make_train_step(loss_of(model), optim.sgd(0.1))(state, batch)
    assert not torch.equal(new.params["0.weight"], state.params["0.weight"])
    # Frozen by the optimizer: no gradient, no state, no change; and no warning.
    opt = optim.partition({"train": optim.sgd(0.1), "frozen": optim.frozen()},
                          lambda n: "frozen" if n in names else "train")
    state = fbrain.TrainState.create(model, opt)
    new, _ = fbrain.make_train_step(loss_of(model), opt)(state, batch)
    assert all(torch.equal(new.params[n], state.params[n]) for n in names)
    assert not torch.equal(new.params["1.weight"], state.params["1.weight"])
    assert "make_train_step" in fbrain.TrainState.create.__doc__ and "optim.frozen" in fbrain.make_train_step.__doc__


# --- Any value for any hyperparameter: a named error, or a state that trains one step to finite params.

SPECIAL = [NAN, INF, -INF, -1.0, -1e-12, 0, 1, 1.0, 0.5, 0.999999, 1e-300, None, True, False, "0.1", "", [], (0.9,),
           2**63, -2**63, 10**400, -10**400, 1 + 0j, torch.tensor(NAN), torch.tensor(0.5), torch.tensor(-2.0),
           torch.tensor(3), torch.ones(2), torch.tensor(True)]
# Finite values beyond what float32 arithmetic holds (lr=1e300 makes a float32 step overflow) are the
# caller's to choose, as with torch.optim; the property covers values up to 2**63.
VALUES = st.one_of(st.sampled_from(SPECIAL), st.floats(-1e6, 1e6), st.integers(-10, 10))

CONSTRUCTORS = {
    "adam": (optim.adam, ["lr", "betas", "eps", "weight_decay"]),
    "adamw": (optim.adamw, ["lr", "betas", "eps", "weight_decay"]),
    "sgd": (optim.sgd, ["lr", "momentum", "dampening", "weight_decay"]),
    "rmsprop": (optim.rmsprop, ["lr", "alpha", "eps", "weight_decay", "momentum"]),
    "adagrad": (optim.adagrad, ["lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"]),
    "adadelta": (optim.adadelta, ["lr", "rho", "eps", "weight_decay"]),
    "adamax": (optim.adamax, ["lr", "betas", "eps", "weight_decay"]),
    "nadam": (optim.nadam, ["lr", "betas", "eps", "weight_decay", "momentum_decay"]),
    "radam": (optim.radam, ["lr", "betas", "eps", "weight_decay"]),
    "clip_by_global_norm": (lambda max_norm: optim.chain(optim.clip_by_global_norm(max_norm), optim.sgd(0.1)),
                            ["max_norm"]),
    "with_ema": (lambda decay: optim.with_ema(optim.sgd(0.1), decay), ["decay"]),
}


def trains_to_finite_params(opt, opt_state=None) -> None:
    model = torch.nn.Linear(3, 2)
    state = fbrain.TrainState.create(model, opt)
    if opt_state is not None:
        state = state.replace(opt_state=opt_state(state.opt_state))
    new, metrics = fbrain.make_train_step(loss_of(model), opt)(state, torch.randn(8, 3))
    assert not bool(metrics["skipped"])
    assert all(bool(torch.isfinite(p).all()) for p in new.params.values()), new.params


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_hyperparameter_value_is_a_named_error_or_trains_to_finite_params(data):
    owner = data.draw(st.sampled_from(sorted(CONSTRUCTORS)))
    build, names = CONSTRUCTORS[owner]
    name = data.draw(st.sampled_from(names))
    value = data.draw(st.one_of(VALUES, st.tuples(VALUES, VALUES)) if name == "betas" else VALUES)
    try:
        opt = build(**{name: value})
    except (ValueError, TypeError) as err:
        assert str(err).startswith(f"{owner}: {name}"), err
        event("a named error")
        return
    trains_to_finite_params(opt)
    event("trained")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_value_given_to_set_hyperparams_is_a_named_error_or_trains_to_finite_params(data):
    owner = data.draw(st.sampled_from(sorted(set(CONSTRUCTORS) - {"clip_by_global_norm", "with_ema"})))
    opt = CONSTRUCTORS[owner][0]()
    name = data.draw(st.sampled_from(sorted(optim.get_hyperparams(opt.init({"w": torch.zeros(1)})))))
    value = data.draw(VALUES)
    try:
        optim.set_hyperparams(opt.init({"w": torch.zeros(1)}), **{name: value})
    except (ValueError, TypeError) as err:
        assert str(err).startswith(f"set_hyperparams: {name}: expected"), err
        event("a named error")
        return
    trains_to_finite_params(opt, lambda s: optim.set_hyperparams(s, **{name: value}))
    event("trained")


@pytest.mark.parametrize("torch_ctor, twin, kwargs", [
    (torch.optim.Adam, optim.adam, {"lr": -1.0}),
    (torch.optim.Adam, optim.adam, {"eps": -1.0}),
    (torch.optim.Adam, optim.adam, {"betas": (1.0, 0.9)}),
    (torch.optim.SGD, optim.sgd, {"lr": 0.1, "momentum": -1.0}),
    (torch.optim.SGD, optim.sgd, {"lr": 0.1, "weight_decay": -1.0}),
    (torch.optim.Adadelta, optim.adadelta, {"rho": 1.5}),
    (torch.optim.Adagrad, optim.adagrad, {"initial_accumulator_value": -1.0}),
])
def test_what_torch_optim_refuses_is_refused(torch_ctor, twin, kwargs):
    with pytest.raises(ValueError):
        torch_ctor([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    with pytest.raises(ValueError, match=next(iter(k for k in kwargs if k != "lr" or len(kwargs) == 1))):
        twin(**kwargs)


# -- make_train_step's and TrainState.create's own arguments ------------------------------------------

ANY = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                st.sampled_from(["fp32", "bf16", "fp16", "true", "false"]))
STEP_ARGUMENTS = ("max_grad_norm", "precision", "accumulation", "per_example", "donate_state", "loss_scale")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(STEP_ARGUMENTS + ("seed",)), value=ANY)
def test_any_argument_to_make_train_step_or_create_is_a_named_error_or_a_finite_step(name, value):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = optim.sgd(0.1)
    try:
        state = fbrain.TrainState.create(model, opt, **({"seed": value} if name == "seed" else {}))
        step = fbrain.make_train_step(loss_of(model), opt, **({name: value} if name != "seed" else {}))
    except (TypeError, ValueError) as err:
        assert name in str(err), err
        event("named error")
        return
    accumulation = value if name == "accumulation" else 1
    if accumulation > 8:  # a valid, large micro-batch count: built; a run would only take long
        event("built")
        return
    batch = torch.randn(accumulation, 4, 3) if accumulation > 1 else torch.randn(4, 3)
    new, metrics = step(state, batch)
    assert all(torch.isfinite(p).all() for p in new.params.values())
    event("trained")
