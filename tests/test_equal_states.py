"""Equal states give equal results: a step is a function of the state's values and the batch only.

No cache keyed by tensor identity decides the arithmetic (which kernel runs, how it rounds): a state
cloned, loaded from a checkpoint, with a hyperparameter set again to its value, or rebuilt in another
process trains bit for bit like the original, for every optimizer with a fused kernel and without.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import fbrain
from fbrain import checkpoint, optim
from conftest import batches, mlp, regression_loss, trees_equal

TESTS = pathlib.Path(__file__).resolve().parent

OPTIMIZERS = {
    "adam": "optim.adam(1e-2)",
    "adamw": "optim.adamw(1e-2, weight_decay=0.1)",
    "sgd-nesterov": "optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)",
    "rmsprop": "optim.rmsprop(1e-3, centered=True, momentum=0.5)",
}
FIRST, REST = 5, 45  # 50 steps: the copies are made after FIRST of them, from a state with moments


def train(state, step, data):
    for x, y in data:
        state, _ = step(state, (x, y))
    return state


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_equal_valued_states_train_bit_for_bit_alike(name, tmp_path):
    opt = eval(OPTIMIZERS[name])
    model = mlp(0, dropout=0.1)  # dropout: the rng key is part of the state too
    step = fbrain.make_train_step(regression_loss(model), opt, max_grad_norm=1.0)
    data = batches(FIRST + REST)
    middle = train(fbrain.TrainState.create(model, opt, seed=3), step, data[:FIRST])
    lr = float(optim.get_hyperparams(middle.opt_state)["lr"])

    checkpoint.save(tmp_path / "state.ckpt", middle)
    copies = {
        "cloned": fbrain.tree.tree_map(torch.clone, middle),
        "loaded into a template": checkpoint.load(tmp_path / "state.ckpt", middle),
        "loaded without a template": checkpoint.load(tmp_path / "state.ckpt"),
        "lr set again": middle.replace(opt_state=optim.set_hyperparams(middle.opt_state, lr=lr)),
        "every hyperparameter set again": middle.replace(opt_state=optim.set_hyperparams(
            middle.opt_state, **{k: torch.tensor(float(v), dtype=torch.float64) for k, v in optim.get_hyperparams(middle.opt_state).items()})),
    }
    reference = train(middle, step, data[FIRST:])
    for how, copy in copies.items():
        assert trees_equal(train(copy, step, data[FIRST:]), reference), how

    # Rebuilt from scratch in another process (its own allocator, no shared Python objects).
    out = tmp_path / "other_process.ckpt"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import fbrain
        from fbrain import checkpoint, optim
        from conftest import batches, mlp, regression_loss
        opt = {OPTIMIZERS[name]}
        model = mlp(0, dropout=0.1)
        step = fbrain.make_train_step(regression_loss(model), opt, max_grad_norm=1.0)
        state = fbrain.TrainState.create(model, opt, seed=3)
        for x, y in batches({FIRST + REST}):
            state, _ = step(state, (x, y))
        checkpoint.save({str(out)!r}, state)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert trees_equal(checkpoint.load(out, reference), reference)
