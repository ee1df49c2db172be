"""The pure train step: purity, determinism, skipping, loss scaling, accumulation, buffers."""

from __future__ import annotations

import pytest
import torch

import fbrain
from fbrain import optim
from conftest import (ConvNet, batches, bitwise_equal, clone_tree, conv_batches, fused_kernel_calls, max_abs_diff,
                      mlp, regression_loss, trees_equal)


def make(model=None, opt=None, **kwargs):
    model = model if model is not None else mlp(0)
    opt = opt if opt is not None else optim.adam(1e-2)
    state = fbrain.TrainState.create(model, opt)
    return model, state, fbrain.make_train_step(regression_loss(model), opt, **kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"max_grad_norm": 1.0}, {"precision": "fp16"},
                                    {"precision": "bf16"}, {"accumulation": 2}])
def test_a_step_leaves_its_inputs_bitwise_unchanged(kwargs):
    model = ConvNet(0)
    _, state, step = make(model, **kwargs)
    x, y = conv_batches(1)[0]
    batch = (x, y) if kwargs.get("accumulation", 1) == 1 else fbrain.stack_micro_batches([(x, y), (x, y)])
    state_before, batch_before = clone_tree(state), clone_tree(batch)
    module_before = clone_tree(dict(model.state_dict()))
    new_state, _ = step(state, batch)
    assert trees_equal(state, state_before)
    assert trees_equal(batch, batch_before)
    assert trees_equal(dict(model.state_dict()), module_before)
    assert not trees_equal(new_state.params, state.params)


def test_same_inputs_give_bitwise_same_outputs_with_dropout_and_leave_global_rng_alone():
    model = mlp(0, dropout=0.5)
    _, state, step = make(model)
    batch = batches(1)[0]
    torch.manual_seed(123)
    global_before = torch.get_rng_state()
    a_state, a_metrics = step(state, batch)
    torch.rand(5)  # disturb the global generator between the calls
    b_state, b_metrics = step(state, batch)
    assert trees_equal(a_state, b_state) and trees_equal(a_metrics, b_metrics)
    torch.manual_seed(123)
    assert torch.equal(torch.get_rng_state(), global_before)
    step(state, batch)
    assert torch.equal(torch.get_rng_state(), global_before)  # the step restored it


def test_the_rng_key_advances_so_dropout_masks_differ_between_steps():
    model = mlp(0, dropout=0.5)
    opt = optim.sgd(0.0)  # no learning: only the dropout mask changes the loss
    state = fbrain.TrainState.create(model, opt, seed=7)
    step = fbrain.make_train_step(regression_loss(model), opt)
    batch = batches(1)[0]
    s1, m1 = step(state, batch)
    _, m2 = step(s1, batch)
    assert not torch.equal(s1.rng, state.rng)
    assert float(m1["loss"]) != float(m2["loss"])
    other = fbrain.TrainState.create(model, opt, seed=8)
    assert float(step(other, batch)[1]["loss"]) != float(m1["loss"])


def test_autograd_and_torch_func_gradients_are_identical(monkeypatch):
    model, state, step = make(ConvNet(0), max_grad_norm=0.5)
    batch = conv_batches(1)[0]
    eager, m_eager = step.pure(state, batch)  # eager: torch.autograd.grad
    monkeypatch.setattr(fbrain.gradients, "traced", lambda: True)  # what compile and vmap take
    func, m_func = step.pure(state, batch)
    assert trees_equal(eager, func) and trees_equal(m_eager, m_func)


def poisoned_loss(model, poison_at):
    """Loss whose value is inf on the batches listed in ``poison_at`` (by the batch's first value)."""
    base = regression_loss(model)

    def loss_fn(params, buffers, batch, rng):
        loss, aux = base(params, buffers, batch[:2], rng)
        return loss * batch[2], aux

    return loss_fn


@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_a_nonfinite_loss_skips_the_update_and_is_counted(poison):
    model = ConvNet(0)
    opt = optim.adam(1e-2)
    state = fbrain.TrainState.create(model, opt)
    step = fbrain.make_train_step(poisoned_loss(model, None), opt, max_grad_norm=5.0)
    x, y = conv_batches(1)[0]
    good, _ = step(state, (x, y, torch.tensor(1.0)))
    bad, metrics = step(good, (x, y, torch.tensor(poison)))
    assert bool(metrics["skipped"])
    assert trees_equal(bad.params, good.params)
    assert trees_equal(bad.opt_state, good.opt_state)
    assert trees_equal(bad.buffers, good.buffers)
    c = bad.counters
    assert (int(c.step), int(c.optimizer_step), int(c.nonfinite_count), int(c.nonfinite_streak)) == (2, 1, 1, 1)
    again, _ = step(bad, (x, y, torch.tensor(poison)))
    assert int(again.counters.nonfinite_streak) == 2
    recovered, metrics = step(again, (x, y, torch.tensor(1.0)))
    assert not bool(metrics["skipped"])
    assert (int(recovered.counters.nonfinite_count), int(recovered.counters.nonfinite_streak)) == (2, 0)


def test_an_inf_gradient_with_finite_loss_is_skipped():
    model = mlp(0)
    opt = optim.sgd(0.1)
    state = fbrain.TrainState.create(model, opt)

    def loss_fn(params, buffers, batch, rng):
        # sqrt at 0 has an infinite derivative while the loss stays finite.
        return torch.sqrt(params["2.bias"] * 0).sum()

    new, metrics = fbrain.make_train_step(loss_fn, opt)(state, None)
    assert bool(metrics["skipped"]) and torch.isfinite(metrics["loss"])
    assert trees_equal(new.params, state.params)


def test_loss_scale_sequence_equals_gradscaler():
    """Same finite/non-finite sequence through torch.amp.GradScaler and through fp16 steps."""
    interval = 3
    pattern = [1, 1, 1, 1, float("inf"), 1, 1, 1, 1, float("nan"), float("inf"), 1, 1, 1, 1, 1, 1]
    rule = fbrain.DynamicLossScale(init_scale=2.0**10, growth_interval=interval)
    model = mlp(0)
    opt = optim.sgd(1e-3)
    state = fbrain.TrainState.create(model, opt, loss_scale=rule)
    step = fbrain.make_train_step(poisoned_loss(model, None), opt, precision="fp16", loss_scale=rule)

    reference = mlp(0)
    torch_opt = torch.optim.SGD(reference.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=interval)
    x, y = batches(1)[0]
    ours, theirs = [], []
    for factor in pattern:
        state, metrics = step(state, (x, y, torch.tensor(factor)))
        ours.append(float(state.scaler.scale))
        torch_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(reference(x), y) * factor
        scaler.scale(loss).backward()
        scaler.step(torch_opt)
        scaler.update()
        theirs.append(scaler.get_scale())
    assert ours == theirs
    assert len(set(ours)) > 2  # the sequence both grew and shrank


def test_loss_scale_rule_alone():
    rule = fbrain.DynamicLossScale(init_scale=4.0, growth_interval=2)
    s = rule.init()
    seq = []
    for found_inf in [False, False, True, False, False, False]:
        s = rule.update(s, torch.tensor(found_inf))
        seq.append((float(s.scale), int(s.growth_tracker)))
    assert seq == [(4.0, 1), (8.0, 0), (4.0, 0), (4.0, 1), (8.0, 0), (8.0, 1)]


def test_accumulation_equals_one_big_batch():
    model = mlp(0)
    opt = optim.sgd(0.1, momentum=0.9)
    state = fbrain.TrainState.create(model, opt)
    big = fbrain.make_train_step(regression_loss(model), opt, max_grad_norm=1.0)
    accumulated = fbrain.make_train_step(regression_loss(model), opt, max_grad_norm=1.0, accumulation=4)
    s_big, s_acc = state, state
    for x, y in batches(5, batch_size=16):
        s_big, m_big = big(s_big, (x, y))
        micro = [(x[i * 4:(i + 1) * 4], y[i * 4:(i + 1) * 4]) for i in range(4)]
        s_acc, m_acc = accumulated(s_acc, fbrain.stack_micro_batches(micro))
        assert float(m_acc["loss"]) == pytest.approx(float(m_big["loss"]), abs=1e-6)
    assert max_abs_diff(s_big.params, s_acc.params) <= 1e-6
    assert int(s_acc.counters.step) == 5


def test_accumulation_rejects_a_batch_without_the_micro_batch_axis():
    _, state, step = make(accumulation=3)
    with pytest.raises(ValueError, match="leading micro-batch axis of size 3"):
        step(state, batches(1)[0])


def test_batchnorm_buffers_update_functionally_like_the_module():
    model = ConvNet(0)
    reference = ConvNet(0)
    _, state, step = make(model, optim.sgd(0.0))
    for x, y in conv_batches(3):
        state, _ = step(state, (x, y))
        reference.train()
        reference(x)
    for name, value in reference.named_buffers():
        assert torch.allclose(state.buffers[name], value, atol=1e-6), name
    assert int(state.buffers["norm.num_batches_tracked"]) == 3
    assert int(model.norm.num_batches_tracked) == 0  # the module itself was not touched


def test_max_grad_norm_clips_like_torch_and_nonpositive_disables_it():
    model, reference = mlp(0), mlp(0)
    opt = optim.sgd(0.1)
    state = fbrain.TrainState.create(model, opt)
    x, y = batches(1)[0]
    y = y * 100  # large gradients
    clipped, metrics = fbrain.make_train_step(regression_loss(model), opt, max_grad_norm=0.5)(state, (x, y))
    torch.nn.functional.mse_loss(reference(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    assert torch.equal(metrics["grad_norm"], norm)
    assert max_abs_diff(clipped.params, {k: v.detach() for k, v in reference.named_parameters()}) <= 1e-7
    for off in (None, 0.0, -1.0):
        unclipped, _ = fbrain.make_train_step(regression_loss(model), opt, max_grad_norm=off)(state, (x, y))
        plain, _ = fbrain.make_train_step(regression_loss(model), opt)(state, (x, y))
        assert trees_equal(unclipped.params, plain.params)
        assert not trees_equal(unclipped.params, clipped.params)


def test_per_example_gradients_equal_a_loop_over_examples():
    model = mlp(0)
    state = fbrain.TrainState.create(model, optim.sgd(0.1))
    x, y = batches(1, batch_size=5)[0]
    loss_fn = regression_loss(model)

    def loss_no_buffers(params, buffers, batch, rng):
        return loss_fn(params, buffers, batch, rng)[0]

    losses, grads = fbrain.per_example_grads(loss_no_buffers)(state.params, state.buffers, (x, y))
    for i in range(5):
        reference = mlp(0)
        loss = torch.nn.functional.mse_loss(reference(x[i:i + 1]), y[i:i + 1])
        loss.backward()
        assert float(losses[i]) == pytest.approx(float(loss.detach()), abs=1e-6)
        for name, p in reference.named_parameters():
            assert torch.allclose(grads[name][i], p.grad, atol=1e-6), name


def test_per_example_step_clips_each_example():
    model = mlp(0)
    opt = optim.sgd(1.0)
    state = fbrain.TrainState.create(model, opt)

    def loss_fn(params, buffers, batch, rng):
        return regression_loss(model)(params, buffers, batch, rng)[0]

    x, y = batches(1, batch_size=6)[0]
    y = y * 50
    step = fbrain.make_train_step(loss_fn, opt, per_example=True, max_grad_norm=0.1)
    new, metrics = step(state, (x, y))
    assert metrics["per_example_loss"].shape == (6,)
    assert bool((metrics["per_example_grad_norm"] > 0.1).all())
    moved = torch.linalg.vector_norm(torch.cat([(new.params[k] - state.params[k]).flatten() for k in new.params]))
    assert float(moved) <= 0.1 + 1e-5  # the mean of vectors of norm <= 0.1, times lr 1
    # Without clipping, the per-example mean equals the ordinary batch gradient.
    plain_new, _ = fbrain.make_train_step(loss_fn, opt)(state, (x, y))
    per_new, _ = fbrain.make_train_step(loss_fn, opt, per_example=True)(state, (x, y))
    assert max_abs_diff(plain_new.params, per_new.params) <= 1e-4


def test_per_example_refuses_buffer_updates():
    _, state, step = make(ConvNet(0), per_example=True)
    with pytest.raises(ValueError, match="per_example=True"):
        step(state, conv_batches(1)[0])


def test_eval_step_computes_loss_without_touching_state():
    model = ConvNet(0)
    state = fbrain.TrainState.create(model, optim.sgd(0.1))
    model.eval()
    eval_step = fbrain.make_eval_step(regression_loss(model))
    x, y = conv_batches(1)[0]
    before = clone_tree(state)
    metrics = eval_step(state, (x, y))
    assert trees_equal(state, before)
    assert float(metrics["loss"]) == pytest.approx(float(torch.nn.functional.mse_loss(model(x), y).detach()), abs=1e-6)
    assert "buffers" not in metrics


def test_bf16_and_fp16_steps_train():
    for precision in ("bf16", "fp16"):
        _, state, step = make(precision=precision)
        first = None
        for x, y in batches(30) * 2:
            state, metrics = step(state, (x, y))
            first = first if first is not None else float(metrics["loss"])
        assert float(metrics["loss"]) < first


# Every way Python turns a tensor into a host value. `__index__` is what int(), range() and
# indexing use; `__float__`/`__int__` are float(t)/int(t).
HOST_READS = ("item", "__bool__", "tolist", "cpu", "numpy", "__float__", "__int__", "__index__")


CHAINED = lambda: optim.chain(optim.clip_by_global_norm(2.0),  # noqa: E731
                              optim.adamw(1e-3, weight_decay=optim.schedules.cosine_decay(1e-2, 10)))


@pytest.mark.parametrize("kwargs,make_opt", [
    ({}, CHAINED), ({"max_grad_norm": 1.0, "precision": "fp16"}, CHAINED), ({"accumulation": 2}, CHAINED),
    ({"precision": "bf16"}, CHAINED), ({"per_example": True, "max_grad_norm": 1.0}, CHAINED),
    # The plain optimizers take the fused CPU kernels (checked below): their float hyperparameters
    # are Static numbers in the state, never read from a tensor.
    ({}, lambda: optim.adam(1e-3, weight_decay=1e-4, amsgrad=True)),
    ({"max_grad_norm": 1.0}, lambda: optim.adamw(1e-3, betas=(0.8, 0.99))),
    ({"precision": "fp16"}, lambda: optim.sgd(0.1, momentum=0.9, weight_decay=1e-4)),
    ({}, lambda: optim.sgd(0.1, momentum=0.9, nesterov=True)),
], ids=["chain", "chain-fp16", "chain-accumulation", "chain-bf16", "chain-per-example", "adam", "adamw",
        "sgd-momentum-fp16", "sgd-nesterov"])
def test_a_step_never_reads_tensor_values_on_the_host(kwargs, make_opt, request):
    model = ConvNet(0) if not kwargs.get("per_example") else mlp(0, dropout=0.1)
    opt = make_opt()
    state = fbrain.TrainState.create(model, opt)
    loss_fn = regression_loss(model)
    if kwargs.get("per_example"):
        base = loss_fn
        loss_fn = lambda p, b, batch, r: base(p, b, batch, r)[0]  # noqa: E731
        x, y = batches(1)[0]
    else:
        x, y = conv_batches(1)[0]
    batch = (x, y) if kwargs.get("accumulation", 1) == 1 else fbrain.stack_micro_batches([(x, y), (x, y)])
    step = fbrain.make_train_step(loss_fn, opt, **kwargs)
    eval_step = fbrain.make_eval_step(loss_fn)
    with fused_kernel_calls() as calls, pytest.MonkeyPatch.context() as mp:
        for name in HOST_READS:
            def raiser(*args, _name=name, **kw):
                raise AssertionError(f"host synchronisation: Tensor.{_name} called inside a step")
            mp.setattr(torch.Tensor, name, raiser)
        for read in (lambda t: t.item(), float, int, lambda t: [0, 1][t]):
            with pytest.raises(AssertionError, match="host synchronisation"):
                read(torch.ones((), dtype=torch.int64))  # the patches are in force
        new_state, metrics = step(state, batch)
        new_state, metrics = step(new_state, batch)
        eval_step(new_state, (x, y))
    assert int(new_state.counters.step) == 2
    if "chain" not in request.node.callspec.id:  # the chained adamw has a scheduled weight decay
        assert len(calls) == 2  # the fused kernels ran, not the multi-tensor arithmetic


@pytest.mark.parametrize("call,match", [
    (lambda: fbrain.make_train_step(lambda *a: 0, optim.sgd(), precision="fp8"), "precision.*'fp8'"),
    (lambda: fbrain.make_train_step(lambda *a: 0, torch.optim.SGD), "optimizer.*from_torch"),
    (lambda: fbrain.make_train_step(lambda *a: 0, optim.sgd(), accumulation=0), "accumulation"),
    (lambda: fbrain.make_train_step("loss", optim.sgd()), "loss_fn"),
    (lambda: fbrain.TrainState.create(mlp(0), "adam"), "optimizer"),
])
def test_bad_configuration_is_named(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_state_and_model_that_do_not_match_are_named():
    model = mlp(0)
    _, state, step = make(model)
    batch = batches(1)[0]

    def with_params(params):  # an optimizer state made for them: the model is what does not match
        return state.replace(params=params, opt_state=optim.adam(1e-2).init(params))

    renamed = with_params({("x." + k if k == "0.weight" else k): v for k, v in state.params.items()})
    with pytest.raises(KeyError, match=r"missing \['0.weight'\], unexpected \['x.0.weight'\]"):
        step(renamed, batch)
    reshaped = with_params({**state.params, "2.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"params\['2.bias'\]: expected shape \(2,\).*got \(3,\)"):
        step(reshaped, batch)


def test_a_non_floating_parameter_is_named():
    _, state, step = make()
    bad = state.replace(params={**state.params, "0.bias": torch.zeros(16, dtype=torch.int64)})
    with pytest.raises(TypeError, match=r"params\['0.bias'\].*floating"):
        step(bad, batches(1)[0])
    with pytest.raises(TypeError, match="state"):
        step({"params": {}}, batches(1)[0])


def test_a_batch_of_another_structure_is_named():
    _, state, step = make()
    x, y = batches(1)[0]
    state, _ = step(state, (x, y))
    with pytest.raises(TypeError, match="batch: its layout of tensors differs"):
        step(state, {"x": x, "y": y})


def test_a_loss_that_is_not_a_scalar_is_named():
    model = mlp(0)
    opt = optim.sgd()
    state = fbrain.TrainState.create(model, opt)
    step = fbrain.make_train_step(lambda p, b, batch, r: fbrain.apply_module(model, p, b, batch)[0], opt)
    with pytest.raises(TypeError, match=r"scalar \(0-dim\) loss.*\(4, 2\)"):
        step(state, torch.randn(4, 8))


def test_errors_leave_the_state_untouched():
    _, state, step = make(accumulation=2)
    before = clone_tree(state)
    with pytest.raises(ValueError):
        step(state, batches(1)[0])
    assert trees_equal(state, before)


def test_a_donated_state_gives_the_same_result_as_the_pure_step():
    model = mlp(0)
    opt = optim.adamw(1e-2, weight_decay=0.1)
    state = fbrain.TrainState.create(model, opt)
    pure = fbrain.make_train_step(regression_loss(model), opt, max_grad_norm=1.0)
    donating = fbrain.make_train_step(regression_loss(model), opt, max_grad_norm=1.0, donate_state=True)
    a, b = state, clone_tree(state)
    for x, y in batches(4):
        a, _ = pure(a, (x, y))
        b, _ = donating(b, (x, y))
    assert trees_equal(a.params, b.params) and trees_equal(a.opt_state, b.opt_state)
    # Donation reuses the input's storage: that is the point of it.
    c = clone_tree(b)
    d, _ = donating(c, batches(1)[0])
    assert d.params["0.weight"].data_ptr() == c.params["0.weight"].data_ptr()


@pytest.mark.parametrize("shape_of_loss,compiled", [("a+b", False), ("view(a)+b", False), ("sum(a)", False),
                                                    ("a+b", True)])
def test_a_donated_step_with_gradients_sharing_memory_equals_the_pure_step(shape_of_loss, compiled):
    """autograd hands one gradient tensor to both sides of a + b (views of one for a.view(-1) + b,
    an expanded one for a.sum()): the in-place update must treat each as a gradient of its own,
    eagerly and compiled."""
    forms = {"a+b": lambda p, x: ((p["a"] + p["b"]) * x).pow(2).sum(),
             "view(a)+b": lambda p, x: ((p["a"].view(-1) + p["b"]) * x).pow(2).sum(),
             "sum(a)": lambda p, x: p["a"].sum() + (p["b"] * x).pow(2).sum()}
    form = forms[shape_of_loss]
    pair = torch.nn.Module()
    pair.a = torch.nn.Parameter(torch.randn(2, 3) if shape_of_loss == "view(a)+b" else torch.randn(6))
    pair.b = torch.nn.Parameter(torch.randn(6))

    def loss_fn(p, buffers, x, rng):
        return form(p, x)

    opt = optim.adam(1e-2, fused=False)
    state = fbrain.TrainState.create(pair, opt)
    pure = fbrain.make_train_step(loss_fn, opt, max_grad_norm=0.5)
    donating = fbrain.make_train_step(loss_fn, opt, max_grad_norm=0.5, donate_state=True)
    if compiled:
        donating = donating.compile(fullgraph=True)
    a, b = state, clone_tree(state)
    for i in range(5):
        x = torch.randn(6, generator=torch.Generator().manual_seed(10 + i))
        a, _ = pure(a, x)
        b, _ = donating(b, x)
    if compiled:  # inductor rounds differently: within 1e-5 (a gradient clipped twice: ~1e-2 off)
        pairs = zip(fbrain.tree.tree_leaves((a.params, a.opt_state)), fbrain.tree.tree_leaves((b.params, b.opt_state)))
        assert all(torch.allclose(u, v, rtol=0, atol=1e-5) for u, v in pairs if isinstance(u, torch.Tensor))
    else:
        assert trees_equal(a.params, b.params) and trees_equal(a.opt_state, b.opt_state)


def test_call_with_swaps_tensors_around_any_function_of_the_module():
    model = ConvNet(0)
    state = fbrain.TrainState.create(model, optim.sgd(0.1))
    zeroed = {k: torch.zeros_like(v) for k, v in state.params.items()}
    x = conv_batches(1)[0][0]
    out, new_buffers = fbrain.functional.call_with(model, zeroed, state.buffers, lambda m, v: m(v) + m.head.bias, x)
    assert torch.equal(out, torch.zeros(8, 2))  # all weights zero
    assert int(new_buffers["norm.num_batches_tracked"]) == 1
    assert int(model.norm.num_batches_tracked) == 0 and not torch.equal(model.head.weight, zeroed["head.weight"])
    with pytest.raises(KeyError, match="missing"):
        fbrain.functional.call_with(model, {}, state.buffers, lambda m: None)


def test_micro_batches_kept_apart_equal_stacked_ones():
    model = mlp(0)
    opt = optim.adam(1e-2)
    state = fbrain.TrainState.create(model, opt)
    step = fbrain.make_train_step(regression_loss(model), opt, accumulation=2)
    a, b = batches(2, batch_size=4)
    stacked, _ = step(state, fbrain.stack_micro_batches([a, b]))
    apart, _ = fbrain.make_train_step(regression_loss(model), opt, accumulation=2)(state, fbrain.MicroBatches([a, b]))
    assert trees_equal(stacked.params, apart.params)
    fresh = fbrain.make_train_step(regression_loss(model), opt, accumulation=2)
    with pytest.raises(ValueError, match="expects 2 micro-batches, got 3"):
        fresh(state, fbrain.MicroBatches([a, b, a]))


def test_a_shorter_last_batch_with_fewer_ids_is_the_same_layout():
    model = mlp(0)
    opt = optim.sgd(0.1)
    state = fbrain.TrainState.create(model, opt)

    def loss_fn(params, buffers, batch, rng):
        return regression_loss(model)(params, buffers, (batch["x"], batch["y"]), rng)

    step = fbrain.make_train_step(loss_fn, opt)
    (x, y), = batches(1)
    state, _ = step(state, {"x": x, "y": y, "id": ["a", "b", "c"]})
    state, _ = step(state, {"x": x[:2], "y": y[:2], "id": ["d", "e"]})
    with pytest.raises(TypeError, match="layout of tensors differs"):
        step(state, {"x": x, "y": y, "id": ["a"], "extra": x})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_is_finite_agrees_with_torch_isfinite(dtype):
    from fbrain.update import is_finite
    values = [0.0, -0.0, 1.5, -3.0, 6e4 if dtype == torch.float16 else 3e38, float("inf"), float("-inf"), float("nan")]
    for a in values:
        t = torch.tensor(a, dtype=dtype)
        assert bool(is_finite(t)) == bool(torch.isfinite(t)), a
