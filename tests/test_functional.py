"""``fbrain.functional.swapped``: the cached tensor swap behind apply_module, call_with and Brain.

Each test compares against ``torch.func.functional_call`` (the reference semantics) or checks that
the module is left exactly as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

import fbrain
from fbrain.functional import swapped


class Tied(torch.nn.Module):
    """An encoder and a decoder sharing one weight, and one submodule reached by two names."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(6, 4, bias=False)
        self.dec = torch.nn.Linear(4, 6, bias=False)
        self.shared = torch.nn.Linear(6, 6)
        self.again = self.shared
        self.dec.weight = torch.nn.Parameter(self.enc.weight.detach().t().contiguous())
        self.enc.weight = self.dec.weight  # tied after creation: enc.weight is an alias of dec.weight

    def forward(self, x):
        return self.again(self.shared(x)) + (x @ self.enc.weight) @ self.dec.weight.t()


class Counter(torch.nn.Module):
    """Reassigns (not updates in place) a buffer: the new tensor must reach the caller."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls = self.calls + 1
        return self.lin(x)


def new_tensors(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    named = dict(module.named_parameters()) | dict(module.named_buffers())
    return {n: torch.randn(t.shape, generator=g) for n, t in named.items()}


def test_tied_weights_and_shared_submodules_follow_functional_call():
    model, x = Tied(), torch.randn(5, 6)
    tensors = new_tensors(model)
    assert "dec.weight" not in tensors and "again.weight" not in tensors  # aliases go by their first names
    before = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    with swapped(model, dict(tensors)):
        out = model(x)
    # On a copy: functional_call itself leaves a submodule reached by two names holding the
    # swapped-in tensors (torch 2.11); swapped restores it.
    expected = functional_call(copy.deepcopy(model), tensors, (x,), tie_weights=True, strict=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert model.enc.weight is model.dec.weight and model.again is model.shared


def test_the_module_gets_its_tensors_back_when_the_block_raises():
    model = torch.nn.Linear(2, 2)
    weight = model.weight
    with pytest.raises(ZeroDivisionError):
        with swapped(model, new_tensors(model)):
            assert model.weight is not weight
            1 / 0
    assert model.weight is weight and isinstance(model.weight, torch.nn.Parameter)


def test_a_reassigned_buffer_is_written_back_to_the_callers_dict():
    model, x = Counter(), torch.randn(2, 3)
    params = {n: p.detach() for n, p in model.named_parameters()}
    _, new_buffers = fbrain.apply_module(model, params, {"calls": torch.tensor(4.0)}, x)
    assert float(new_buffers["calls"]) == 5.0
    assert float(model.calls) == 0.0  # the module's own buffer is untouched


def test_a_replaced_submodule_is_seen_on_the_next_call():
    model, x = torch.nn.Sequential(torch.nn.Linear(3, 3)), torch.randn(2, 3)
    first = new_tensors(model, seed=1)
    with swapped(model, first):
        model(x)  # the slots are now cached
    model[0] = torch.nn.Linear(3, 3)  # a new module object under the same names
    second = new_tensors(model, seed=2)
    with swapped(model, second):
        out = model(x)
    torch.testing.assert_close(out, x @ second["0.weight"].t() + second["0.bias"], rtol=0, atol=0)


def test_a_submodule_added_later_is_an_error_not_a_silent_fallback():
    model, x = torch.nn.Sequential(torch.nn.Linear(3, 3)), torch.randn(2, 3)
    tensors = new_tensors(model)
    with swapped(model, dict(tensors)):
        model(x)
    model.append(torch.nn.Linear(3, 3))
    with pytest.raises(KeyError, match=r"missing \['1.bias', '1.weight'\]"):
        with swapped(model, dict(tensors)):
            pass


def test_unexpected_names_are_named_in_the_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(KeyError, match=r"unexpected \['extra'\]"):
        with swapped(model, {**new_tensors(model), "extra": torch.zeros(1)}):
            pass


def test_an_lstm_runs_with_the_swapped_weights():
    # nn.LSTM reads a cached list of its weights; it must notice the swap (and the restore).
    model, x = torch.nn.LSTM(4, 3, batch_first=True), torch.randn(2, 5, 4)
    tensors = new_tensors(model)
    with swapped(model, dict(tensors)):
        out, _ = model(x)
    expected, _ = functional_call(model, tensors, (x,))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    own, _ = model(x)
    reference, _ = functional_call(model, dict(model.named_parameters()), (x,))
    torch.testing.assert_close(own, reference, rtol=0, atol=0)


def test_gradients_flow_to_the_swapped_tensors():
    model, x = Tied(), torch.randn(5, 6)
    tensors = {n: t.requires_grad_() for n, t in new_tensors(model).items()}
    with swapped(model, dict(tensors)):
        model(x).square().sum().backward()
    assert all(t.grad is not None for t in tensors.values())
    assert all(p.grad is None for p in model.parameters())


class SharedNorm(torch.nn.Module):
    """One BatchNorm reached by two names: its running statistics must come back once, updated."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(3)
        self.alias = self.norm

    def forward(self, x):
        return self.alias(x)


def test_a_shared_submodule_returns_its_updated_buffers():
    model, x = SharedNorm(), torch.randn(8, 3) + 2.0
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    assert set(buffers) == {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
    _, new_buffers = fbrain.apply_module(model, params, buffers, x)
    assert int(new_buffers["norm.num_batches_tracked"]) == 1
    assert torch.all(new_buffers["norm.running_mean"] > 0.1)
    assert int(model.norm.num_batches_tracked) == 0 and torch.all(model.norm.running_mean == 0)


class TiedBuffer(torch.nn.Module):
    """One buffer registered in two modules, reassigned by the forward pass."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Module(), torch.nn.Module()
        self.a.register_buffer("count", torch.zeros(()))
        self.b.register_buffer("count", self.a.count)
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x):
        self.a.count = self.a.count + 1
        return self.lin(x)


def test_a_tied_buffer_reassigned_in_one_place_comes_back_updated():
    model, x = TiedBuffer(), torch.randn(3, 2)
    params = {n: p.detach() for n, p in model.named_parameters()}
    _, new_buffers = fbrain.apply_module(model, params, {"a.count": torch.tensor(4.0)}, x)
    assert float(new_buffers["a.count"]) == 5.0
    assert model.a.count is model.b.count and float(model.a.count) == 0.0


def test_a_swap_nested_in_a_swap_of_the_same_module():
    model, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    outer, inner = new_tensors(model, seed=1), new_tensors(model, seed=2)
    weight = model.weight
    with swapped(model, dict(outer)):
        with swapped(model, dict(inner)):
            torch.testing.assert_close(model(x), x @ inner["weight"].t() + inner["bias"], rtol=0, atol=0)
        torch.testing.assert_close(model(x), x @ outer["weight"].t() + outer["bias"], rtol=0, atol=0)
    assert model.weight is weight
    with swapped(model, dict(inner)):  # the cache still describes the module, not the outer tensors
        assert model.weight is inner["weight"]


def test_an_entry_deleted_inside_the_block_is_restored():
    model = torch.nn.Linear(2, 2)
    weight, bias = model.weight, model.bias
    with swapped(model, new_tensors(model)):
        del model.weight
    assert model.weight is weight and model.bias is bias
