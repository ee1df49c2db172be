"""The Brain's default ``fit_batch`` and ``evaluate_batch``: pure steps built from its hooks.

A step's loss function swaps the state's parameters and buffers into the Brain's modules for the
duration of ``compute_forward`` + ``compute_objectives`` (:func:`fbrain.functional.swapped`), so a
recipe's hooks run unchanged inside a pure step. Steps are built once per (number of micro-batches,
optimizers that step) and kept; with the ``compile_steps`` run option they run compiled
(:mod:`fbrain.brain.compiled_steps`; ``"auto"``, the default: :mod:`fbrain.brain.auto_compile`).

Example::

    steps = DefaultSteps(brain, DynamicLossScale())
    loss, outputs = steps.train(layout, None, [batch])   # one pure step; brain.state advances
"""

from __future__ import annotations

import logging

import torch

from fbrain import distributed as _distributed
from fbrain.batches import MicroBatches
from fbrain.brain.auto_compile import compiles_train_step
from fbrain.brain.compiled_steps import StepCompiler
from fbrain.brain.stage import Stage
from fbrain.functional import swapped
from fbrain.step import make_eval_step, make_train_step

logger = logging.getLogger(__name__)

_OUTPUTS = "fbrain.brain.outputs"  # aux key carrying compute_forward's outputs out of the step


class DefaultSteps:
    """The pure train and eval steps of one Brain (read through its public attributes only)."""

    def __init__(self, brain, loss_scale):
        self.brain = brain
        self.loss_scale = loss_scale
        self._train: dict = {}
        self._eval = None
        self._eval_stage = Stage.VALID
        self._compilers: dict = {}  # compile_steps: "train"/"eval" -> StepCompiler, kept across fits
        self._planned: int | None = None  # train steps the current fit plans (compile_steps="auto")

    def plan_fit(self, planned: int | None) -> None:
        """A fit starts that plans ``planned`` train steps (None: unknown): with compile_steps="auto"
        this decides whether its train step runs compiled (:mod:`fbrain.brain.auto_compile`)."""
        brain = self.brain
        self._planned = planned
        if brain.compile_steps == "auto" and self.compile_train:
            logger.info("compile_steps=auto: this fit plans %d train steps (>= auto_compile_min_steps=%d); the "
                        "train step runs compiled (compile_steps=false keeps it eager)", planned,
                        brain.auto_compile_min_steps)

    @property
    def compile_train(self) -> bool:
        brain = self.brain
        return compiles_train_step(brain.compile_steps, self._planned, brain.auto_compile_min_steps)

    @property
    def compile_eval(self) -> bool:
        return self.brain.compile_steps is True

    def clear(self) -> None:
        """Forget the built train steps (a new optimizer layout)."""
        self._train.clear()

    def train_loss_fn(self, params, buffers, batch, rng):
        brain = self.brain
        # BatchNorm updates its running statistics in place: give it private copies, return them.
        tensors = {**params, **{n: b.clone() for n, b in buffers.items()}}
        with swapped(brain.modules, tensors, strict=False):
            outputs = brain.compute_forward(batch, Stage.TRAIN)
            loss = brain.compute_objectives(outputs, batch, Stage.TRAIN)
        return loss, {"buffers": {n: tensors[n] for n in buffers}, _OUTPUTS: outputs}

    def eval_loss_fn(self, params, buffers, batch, rng):
        brain, stage = self.brain, self._eval_stage
        with swapped(brain.modules, {**params, **buffers}, strict=False):
            outputs = brain.compute_forward(batch, stage)
            loss = brain.compute_objectives(outputs, batch, stage)
        return loss

    def _compiler(self, kind: str) -> StepCompiler:
        if kind not in self._compilers:
            brain = self.brain
            # dynamic=None: torch's automatic dynamic shapes (a second shape recompiles once, for
            # all shapes), unless compile_using_dynamic_shape_tracing asks for dynamic from the start.
            self._compilers[kind] = StepCompiler(kind, mode=brain.compile_mode,
                                                 dynamic=brain.compile_using_dynamic_shape_tracing or None)
        return self._compilers[kind]

    def _train_step(self, layout, key):
        if key not in self._train:
            brain = self.brain
            self._train[key] = make_train_step(
                self.train_loss_fn, layout.transformation(key[1]), max_grad_norm=brain.max_grad_norm,
                precision=brain.precision, accumulation=key[0], loss_scale=self.loss_scale,
                donate_state=brain.donate_state,
                process_group=torch.distributed.group.WORLD if _distributed.active() else None,
                shard_optimizer_state=brain.shard_group is not None)
        return self._train[key]

    def train(self, layout, active: frozenset | None, batches: list):
        """One pure step on ``batches`` (micro-batches when more than one) with the optimizers of
        ``layout`` (those labelled in ``active`` only, unless None); returns ``(loss, outputs)``."""
        brain = self.brain
        step = self._train_step(layout, (len(batches), active))
        # Micro-batches stay apart: padded batches of different lengths cannot be stacked.
        batch = batches[0] if len(batches) == 1 else MicroBatches(batches)
        if self.compile_train:
            brain.state, metrics = self._compiler("train")(step, brain.state, batch)
        else:
            brain.state, metrics = step(brain.state, batch)
        return metrics["loss"], metrics.get(_OUTPUTS)

    def evaluate(self, batch, stage):
        """The loss of one batch with the pure eval step (``eval_precision``)."""
        brain = self.brain
        if self._eval is None:
            self._eval = make_eval_step(self.eval_loss_fn, precision=brain.eval_precision)
        self._eval_stage = stage
        # One random stream per stage, from the state's key (SpeechBrain draws fresh numbers for
        # every batch; each batch starting from the state's own key would repeat the same draws).
        state = brain.state.replace(rng=brain.eval_rng if brain.eval_rng is not None else brain.state.rng)
        if brain.eval_params is not None:  # eval_with_ema: the averaged weights for this stage
            state = state.replace(params={**state.params, **brain.eval_params})
        if self.compile_eval:
            metrics = self._compiler("eval")(self._eval, state, batch)
        else:
            metrics = self._eval(state, batch)
        brain.eval_rng = metrics["rng"]
        return metrics["loss"].detach()
