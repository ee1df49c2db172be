"""fbrain: SpeechBrain's training loop as pure functions over one immutable TrainState.

Example::

    >>> import torch, fbrain
    >>> from fbrain import optim
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = optim.adam(lr=1e-2)
    >>> state = fbrain.TrainState.create(model, opt, seed=0)
    >>> def loss_fn(params, buffers, batch, rng):
    ...     pred, _ = fbrain.apply_module(model, params, buffers, batch["x"])
    ...     return ((pred - batch["y"]) ** 2).mean()
    >>> step = fbrain.make_train_step(loss_fn, opt)
    >>> state, metrics = step(state, {"x": torch.randn(4, 3), "y": torch.randn(4, 1)})
"""

from fbrain import distributed, functional, optim, rng, tree
from fbrain.ensemble import ensemble_step, stack_states, unstack_states
from fbrain.functional import apply_module
from fbrain.gradients import per_example_grads
from fbrain.loss_scale import DynamicLossScale, LossScaleState
from fbrain.state import Counters, TrainState
from fbrain.batches import MicroBatches, micro_batches, stack_micro_batches
from fbrain.step import EvalStep, TrainStep, make_eval_step, make_train_step
from fbrain.update import UpdateRule, apply_gradients
from fbrain.brain import Brain, EpochCounter, Stage, create_experiment_directory, parse_arguments
from fbrain.data import PaddedBatch, PaddedData
from fbrain.distributed import ddp_init_group, run_on_main
from fbrain.metrics import MetricStats
from fbrain.train_logger import FileTrainLogger, TensorboardLogger, WandBLogger
from fbrain.checkpoint import Checkpointer

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``import fbrain as sb`` recipes: sb.dataio, sb.utils, sb.nnet ... are SpeechBrain's packages
    # seen through fbrain (fbrain's objects where it has them), loaded on first use.
    import importlib

    speechbrain_names = importlib.import_module("fbrain.speechbrain_names")  # not `from fbrain import`: that calls this
    if name in speechbrain_names.PACKAGES:
        return speechbrain_names.namespace(name)
    raise AttributeError(f"module 'fbrain' has no attribute {name!r}")


__all__ = [
    "Counters", "DynamicLossScale", "EvalStep", "distributed", "functional", "LossScaleState", "TrainState", "TrainStep",
    "MicroBatches", "UpdateRule", "apply_gradients", "apply_module", "ensemble_step", "make_eval_step", "make_train_step", "micro_batches",
    "optim", "per_example_grads", "rng", "stack_micro_batches", "stack_states", "tree",
    "unstack_states",
    "Brain", "EpochCounter", "FileTrainLogger", "MetricStats", "PaddedBatch", "PaddedData", "Stage",
    "Checkpointer", "TensorboardLogger", "WandBLogger",
    "create_experiment_directory", "ddp_init_group", "parse_arguments", "run_on_main",
]
