"""The private torch APIs of fbrain.torch_compat, checked on the torch these tests run with (CI runs
them on two releases). A torch that moves one fails here, by name, not deep inside a step."""

from __future__ import annotations

import torch
import torch.distributed as dist

import fbrain
from fbrain import optim, torch_compat
from fbrain.tree import path_str
from conftest import mlp, trees_equal

adam_module = __import__("fbrain.optim.adam", fromlist=["adam"])


def test_this_torch_is_in_the_supported_range():
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert (2, 11) <= (major, minor) < (3, 0), torch.__version__


def test_pytree_registration_with_keys_round_trips_fbrains_types():
    state = fbrain.TrainState.create(mlp(0), optim.adam(1e-3))
    leaves, spec = torch_compat.pytree.tree_flatten(state)
    assert trees_equal(torch_compat.pytree.tree_unflatten(leaves, spec), state)
    paths = [path_str(p) for p, _ in torch_compat.pytree.tree_flatten_with_path(state)[0]]
    assert "opt_state.mu['0.weight']" in paths
    assert torch_compat.flatten_one_level({"a": 1, "b": 2}) == ("dict", [1, 2])
    assert torch_compat.flatten_one_level(3) is None


def test_the_fused_kernels_exist_on_this_torch():
    for name in ("_fused_adam_", "_fused_adamw_", "_fused_sgd_"):
        assert callable(torch_compat.fused_kernel(name)), name
    assert torch_compat.fused_kernel("_no_such_kernel_") is None
    for name in ("add", "mul", "addcmul_", "norm", "sqrt", "lerp_"):
        assert hasattr(torch, f"_foreach_{name}"), name


def test_without_a_fused_kernel_the_optimizers_take_their_arithmetic(monkeypatch):
    state = fbrain.TrainState.create(mlp(0), optim.adam(1e-2))
    grads = {k: torch.full_like(v, 0.1) for k, v in state.params.items()}
    tx = optim.adam(1e-2)
    fused_params, _ = optim.apply(tx, grads, state.opt_state, state.params, torch.tensor(False))
    monkeypatch.setattr(adam_module, "fused_kernel", lambda name: None)
    plain_params, _ = optim.apply(tx, grads, state.opt_state, state.params, torch.tensor(False))
    for name in fused_params:
        assert torch.allclose(fused_params[name], plain_params[name], rtol=1e-6, atol=1e-7)


def test_dynamo_failures_are_exception_classes():
    assert torch_compat.COMPILE_FAILURES, "no dynamo exception found in this torch"
    assert all(issubclass(e, BaseException) for e in torch_compat.COMPILE_FAILURES)


def test_functorch_level_and_batched_tensors():
    assert not torch_compat.in_functorch_transform()
    seen = []

    def probe(x):
        seen.append((torch_compat.in_functorch_transform(), torch_compat.is_batched(x)))
        return x * 2

    torch.vmap(probe)(torch.ones(3, 2))
    assert seen == [(True, True)] and not torch_compat.is_batched(torch.ones(2))


def test_functional_all_reduce_on_a_one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        out = torch_compat.funcol.wait_tensor(torch_compat.funcol.all_reduce(torch.arange(3.0), "sum", dist.group.WORLD))
        assert torch.equal(out, torch.arange(3.0))
    finally:
        dist.destroy_process_group()
