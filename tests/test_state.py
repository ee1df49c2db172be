"""TrainState: creation without aliasing, pytree behaviour, replace and to()."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fbrain
from fbrain import optim
from conftest import ConvNet, trees_equal


def test_create_copies_parameters_and_buffers():
    model = ConvNet(0)
    state = fbrain.TrainState.create(model, optim.adam(1e-3), seed=3)
    assert state.params.keys() == dict(model.named_parameters()).keys()
    assert state.buffers.keys() == dict(model.named_buffers()).keys()
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p)
        assert state.params[name].data_ptr() != p.data_ptr()
        assert not state.params[name].requires_grad
    with torch.no_grad():
        model.conv.weight.add_(1.0)
    assert not torch.equal(state.params["conv.weight"], model.conv.weight)
    assert state.rng.dtype == torch.uint8 and torch.equal(state.rng, fbrain.rng.new_key(3))


def test_state_is_frozen_and_replace_makes_a_new_one():
    state = fbrain.TrainState.create(ConvNet(0), optim.sgd(0.1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.params = {}
    new = state.replace(params={})
    assert new.params == {} and state.params != {}
    assert new.buffers is state.buffers


def test_state_is_a_pytree():
    state = fbrain.TrainState.create(ConvNet(0), optim.adam(1e-3))
    leaves, spec = fbrain.tree.tree_flatten(state)
    assert all(isinstance(x, torch.Tensor) for x in leaves)
    rebuilt = fbrain.tree.tree_unflatten(leaves, spec)
    assert isinstance(rebuilt, fbrain.TrainState) and trees_equal(rebuilt, state)
    doubled = fbrain.tree.tree_map(lambda x: x * 2 if x.is_floating_point() else x, state)
    assert torch.equal(doubled.params["conv.weight"], state.params["conv.weight"] * 2)


def test_to_moves_everything_but_the_rng_key():
    state = fbrain.TrainState.create(ConvNet(0), optim.adam(1e-3))
    moved = state.to(torch.device("meta"))
    leaves = [x for x in fbrain.tree.tree_leaves(moved.replace(rng=None)) if x is not None]
    assert leaves and all(x.device.type == "meta" for x in leaves)
    assert moved.rng.device.type == "cpu"


def test_a_non_floating_parameter_is_rejected_at_creation():
    model = torch.nn.Linear(2, 2)
    model.register_parameter("steps", torch.nn.Parameter(torch.zeros(1, dtype=torch.int64), requires_grad=False))
    with pytest.raises(TypeError, match=r"params\['steps'\].*floating"):
        fbrain.TrainState.create(model, optim.sgd())
    with pytest.raises(TypeError, match="module"):
        fbrain.TrainState.create("model", optim.sgd())


def test_rng_key_needs_an_int_seed():
    with pytest.raises(TypeError, match="seed"):
        fbrain.rng.new_key(1.5)
