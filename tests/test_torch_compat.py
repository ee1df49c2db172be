"""The private torch APIs of fbrain.torch_compat, checked on the torch these tests run with (CI runs
them on two releases). A torch that moves one fails here, by name, not deep inside a step."""

from __future__ import annotations

import ast
import re

import torch
import torch.distributed as dist

import fbrain
from fbrain import optim, torch_compat
from fbrain.tree import path_str
from conftest import REPO, mlp, trees_equal

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


def test_reparametrize_module_swaps_a_modules_tensors_for_the_block_only():
    model = torch.nn.Linear(2, 1)
    own = model.weight
    with torch_compat.reparametrize_module(model, {"weight": torch.zeros(1, 2)}, tie_weights=True, strict=False):
        assert torch.equal(model(torch.ones(1, 2)).detach(), model.bias.detach().view(1, 1))  # 0 * x + bias
    assert model.weight is own


def test_jit_profiling_switches_read_and_set_back():
    before = torch_compat.jit_profiling()
    assert before is not None and all(isinstance(flag, bool) for flag in before), before
    try:
        torch_compat.set_jit_profiling((not before[0], before[1]))
        assert torch_compat.jit_profiling() == (not before[0], before[1])  # reading changes nothing
        assert torch_compat.jit_profiling() == (not before[0], before[1])
    finally:
        torch_compat.set_jit_profiling(before)
    assert torch_compat.jit_profiling() == before


FBRAIN_SOURCES = sorted((REPO / "fbrain").rglob("*.py"))


def test_every_foreach_kernel_fbrain_calls_exists_on_this_torch():
    # fbrain calls torch's multi-tensor kernels (torch._foreach_*, what torch.optim itself runs)
    # directly, for speed; they are private, so this keeps each one honest across torch releases.
    # The ones fbrain.optim._foreach looks up by a built name (getattr at import) fail on import.
    called = {name for path in FBRAIN_SOURCES
              for name in re.findall(r"\btorch\._foreach_([A-Za-z0-9_]+)", path.read_text())}
    assert len(called) >= 5, f"found only {sorted(called)}: has the scan stopped finding fbrain's calls?"
    missing = sorted(name for name in called if not callable(getattr(torch, f"_foreach_{name}", None)))
    assert not missing, f"torch {torch.__version__} lacks torch._foreach_{{{', '.join(missing)}}}"


def _private_torch_uses(tree: ast.AST) -> list[str]:
    """``torch.<...>._x`` in imports and in attribute chains on the name ``torch`` (dunders, and the
    foreach kernels the test above checks, left out)."""
    def private(part):
        return part.startswith("_") and not part.startswith("__")

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "torch"
                      and any(private(p) for p in a.name.split("."))]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            parts = node.module.split(".")
            found += [f"{node.module}.{a.name}" for a in node.names
                      if any(private(p) for p in parts) or private(a.name)]
        elif isinstance(node, ast.Attribute):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "torch":
                dotted = ".".join(["torch", *reversed(chain)])
                if any(private(p) for p in chain) and not node.attr.startswith("_foreach_"):
                    found.append(dotted)
    return found


def test_private_torch_modules_are_reached_only_through_torch_compat():
    uses = {str(path.relative_to(REPO)): _private_torch_uses(ast.parse(path.read_text()))
            for path in FBRAIN_SOURCES if path.name != "torch_compat.py"}
    uses = {path: sorted(set(found)) for path, found in uses.items() if found}
    assert not uses, (f"private torch APIs outside fbrain/torch_compat.py: {uses}; move each into "
                      "torch_compat.py (with what happens where a torch lacks it) and use it from there")


def test_the_private_api_scan_finds_imports_and_attribute_chains():
    source = ("import torch.utils._pytree as p\nfrom torch.utils.data._utils.collate import default_collate\n"
              "from torch import _C\ntorch._C._x()\ntorch._foreach_add_(a, b)\ntorch.__version__\n"
              "from torch.utils.data import default_convert\n")
    assert set(_private_torch_uses(ast.parse(source))) == {
        "torch.utils._pytree", "torch.utils.data._utils.collate.default_collate", "torch._C", "torch._C._x"}
