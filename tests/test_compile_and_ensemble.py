"""torch.compile of the whole step, and vmap ensembles over stacked states."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import fbrain
from fbrain import optim
from conftest import ConvNet, batches, conv_batches, max_abs_diff, mlp, regression_loss, trees_equal


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_compiled_step_equals_eager_and_does_not_recompile_when_lr_changes(kind):
    model = mlp(0) if kind == "mlp" else ConvNet(0)
    data = batches(6) if kind == "mlp" else conv_batches(6)
    opt = optim.adam(1e-2)
    state = fbrain.TrainState.create(model, opt)
    step = fbrain.make_train_step(regression_loss(model), opt, max_grad_norm=1.0)
    compiled = torch.compile(step, fullgraph=True)
    eager_state = compiled_state = state
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, batch in enumerate(data):
            if i == 3:  # a manual learning-rate change must not recompile
                eager_state = eager_state.replace(opt_state=optim.set_hyperparams(eager_state.opt_state, lr=1e-3))
                compiled_state = compiled_state.replace(
                    opt_state=optim.set_hyperparams(compiled_state.opt_state, lr=1e-3))
            eager_state, m_eager = step(eager_state, batch)
            compiled_state, m_compiled = compiled(compiled_state, batch)
            assert abs(float(m_eager["loss"]) - float(m_compiled["loss"])) <= 1e-5
    assert max_abs_diff(eager_state.params, compiled_state.params) <= 1e-5
    assert max_abs_diff(eager_state.buffers, compiled_state.buffers) <= 1e-5 if eager_state.buffers else True
    assert int(compiled_state.counters.step) == 6


def test_train_step_compile_keeps_randomness_a_function_of_the_state():
    model = mlp(0, dropout=0.5)
    opt = optim.sgd(0.1)
    state = fbrain.TrainState.create(model, opt)
    step = fbrain.make_train_step(regression_loss(model), opt).compile(fullgraph=True)
    batch = batches(1)[0]
    torch.manual_seed(0)
    a, ma = step(state, batch)
    torch.manual_seed(1)
    b, mb = step(state, batch)
    assert trees_equal(a, b) and trees_equal(ma, mb)
    _, mc = step(a, batch)
    assert not torch.equal(a.rng, state.rng) and float(mc["loss"]) != float(ma["loss"])


def test_compiled_dropout_masks_follow_the_key_even_after_a_batchnorm():
    # Linear(bias=False) -> BatchNorm -> ReLU -> Dropout is the pattern torch 2.11's inductor
    # mis-compiles when dropout runs as bernoulli_ (the forward read an unfilled mask): the losses
    # were the same for every key. fbrain's compiled steps route dropout through native_dropout.
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16, bias=False), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))

    def loss_fn(params, buffers, batch, rng):
        out, new_buffers = fbrain.apply_module(model, params, buffers, batch[0])
        return torch.nn.functional.mse_loss(out, batch[1]), {"buffers": new_buffers}

    opt = optim.sgd(0.1)
    state = fbrain.TrainState.create(model, opt)
    step = fbrain.make_train_step(loss_fn, opt).compile(fullgraph=True)
    batch = (torch.randn(4, 4), torch.randn(4, 1))
    losses = [float(step(state.replace(rng=fbrain.rng.new_key(k)), batch)[1]["loss"]) for k in (1, 2, 1, 3)]
    assert losses[0] == losses[2]  # the same key: the same masks
    assert len({losses[0], losses[1], losses[3]}) == 3  # other keys: other masks
    # torch.compile(train_step) straight away: random ops then draw from the caller's generator.
    plain = torch.compile(fbrain.make_train_step(loss_fn, opt), fullgraph=True)
    drawn = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        drawn.append(float(plain(state, batch)[1]["loss"]))
    assert drawn[0] == drawn[2] and drawn[0] != drawn[1]
    model[3].p = 0.0
    with torch.no_grad():
        no_dropout = float(loss_fn(state.params, state.buffers, batch, state.rng)[0])
    assert all(abs(loss - no_dropout) > 1e-6 for loss in losses + drawn)  # dropout really ran


def test_ensemble_with_different_seeds_and_learning_rates_equals_separate_runs():
    opt = optim.adam(1e-2)
    models = [mlp(seed) for seed in range(3)]
    states = [fbrain.TrainState.create(m, opt) for m in models]
    states = [s.replace(opt_state=optim.set_hyperparams(s.opt_state, lr=lr))
              for s, lr in zip(states, [1e-2, 3e-3, 1e-3])]
    step = fbrain.make_train_step(regression_loss(models[0]), opt, max_grad_norm=1.0)
    ensemble = fbrain.ensemble_step(step)
    stacked = fbrain.stack_states(states)
    for batch in batches(5):
        stacked, metrics = ensemble(stacked, batch)
        states = [step(s, batch)[0] for s in states]
        assert metrics["loss"].shape == (3,)
    for alone, together in zip(states, fbrain.unstack_states(stacked)):
        assert max_abs_diff(alone.params, together.params) <= 1e-6
        assert int(together.counters.optimizer_step) == 5


def test_ensemble_with_one_batch_per_member():
    opt = optim.sgd(0.1)
    model = mlp(0)
    state = fbrain.TrainState.create(model, opt)
    step = fbrain.make_train_step(regression_loss(model), opt)
    data = batches(2)
    stacked_batch = fbrain.stack_micro_batches(data)  # leading axis = ensemble member
    together, _ = fbrain.ensemble_step(step, shared_batch=False)(fbrain.stack_states([state, state]), stacked_batch)
    parts = fbrain.unstack_states(together)
    for member, batch in zip(parts, data):
        assert max_abs_diff(member.params, step(state, batch)[0].params) <= 1e-6


def test_stack_states_names_a_mismatch():
    a = fbrain.TrainState.create(mlp(0), optim.sgd(0.1))
    b = fbrain.TrainState.create(mlp(0), optim.adam(0.1))
    with pytest.raises(ValueError, match=r"states\[1\]"):
        fbrain.stack_states([a, b])
    with pytest.raises(ValueError, match="at least one"):
        fbrain.stack_states([])


def test_stacking_states_whose_static_hyperparameters_differ_names_the_hyperparameter():
    model = mlp(0)
    a = fbrain.TrainState.create(model, optim.adam(1e-3, betas=(0.9, 0.999)))
    b = fbrain.TrainState.create(model, optim.adam(1e-2, betas=(0.8, 0.999)))
    with pytest.raises(ValueError, match=r"states\[1\] has beta1=0.8, states\[0\] has 0.9.*schedule"):
        fbrain.stack_states([a, b])
    # Learning rates are tensors: those may differ.
    fbrain.stack_states([a, fbrain.TrainState.create(model, optim.adam(1e-2, betas=(0.9, 0.999)))])
