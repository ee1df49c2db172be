"""``Brain``: SpeechBrain's training loop as a thin stateful shell over the pure steps.

The Brain holds one :class:`~fbrain.TrainState` (``brain.state``), runs SpeechBrain's hooks, and
trains with :func:`~fbrain.make_train_step` / :func:`~fbrain.make_eval_step`. Porting a recipe
means changing its import to ``import fbrain as sb``.

* The default ``fit_batch`` runs the pure train step; its loss function swaps the state's
  parameters and buffers into ``self.modules`` for the duration of ``compute_forward`` +
  ``compute_objectives``.
* After every step the modules' parameters are rebound to the new state's tensors (no copy), so
  code that reads ``self.modules`` sees the current weights, and an imperative ``fit_batch``
  (``loss.backward()``, ``self.optimizer.step()``) works through :mod:`fbrain.brain.views`.
* The running loss stays on the device; it is read on the host only when the progress bar is
  refreshed (at most a few times a second), a hook reads ``avg_train_loss``, or a stage ends.

Example::

    >>> import torch
    >>> import fbrain as sb
    >>> class SimpleBrain(sb.Brain):
    ...     def compute_forward(self, batch, stage):
    ...         return self.modules.model(batch[0] * self.hparams.scalar)
    ...     def compute_objectives(self, predictions, batch, stage):
    ...         return torch.nn.functional.l1_loss(predictions, batch[0])
    >>> brain = SimpleBrain({"model": torch.nn.Linear(10, 10)}, opt_class=lambda x: torch.optim.SGD(x, lr=0.1),
    ...                     hparams={"scalar": 5}, run_opts={"noprogressbar": True})
    >>> brain.fit(range(1), ([torch.rand(10, 10), torch.rand(10, 10)],))
    >>> int(brain.state.counters.optimizer_step)
    1
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from types import SimpleNamespace
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fbrain import data as _data
from fbrain import optim
from fbrain import checkpoint as _checkpoint
from fbrain import distributed as _distributed
from fbrain.brain.binding import Binding
from fbrain.brain.checkpointing import (INTRA_EPOCH_FLAG, IntraEpochSchedule, brain_record,
                                        restore_running_mean, skip_batches)
from fbrain.brain.compiled_steps import StepCompiler
from fbrain.brain.contexts import PrecisionContext
from fbrain.brain.optimizers import OptimizerLayout, apply_grads, average_grads, twin_of_group
from fbrain.brain.run_options import resolve_run_options
from fbrain.brain.running_mean import RunningMean
from fbrain.brain.stage import Stage
from fbrain.brain.views import OptimizerView, ScalerView
from fbrain.checkpoint.checkpointer import mark_as_loader, mark_as_saver
from fbrain.functional import swapped
from fbrain.loss_scale import DynamicLossScale
from fbrain.optim.base import GradientTransformation
from fbrain.optim.hyperparams import mirror_hyperparams, set_hyperparams
from fbrain.state import TrainState
from fbrain.step import MicroBatches, check_state, make_eval_step, make_train_step

logger = logging.getLogger(__name__)

_OUTPUTS = "fbrain.brain.outputs"  # aux key carrying compute_forward's outputs out of the step
_REPORT_SECONDS = 0.5  # how often the running loss and the non-finite count are read on the host


class Brain:
    """SpeechBrain's ``Brain`` API over a :class:`~fbrain.TrainState`.

    Args:
        modules: ``{name: torch.nn.Module}``; a ``torch.nn.ModuleDict`` on the device (``self.modules.model``).
        opt_class: a callable ``params -> torch.optim.Optimizer`` (SGD, Adam, AdamW or RMSprop, which
            have functional twins), or an :mod:`fbrain.optim` transformation.
        hparams: a dict, available as ``self.hparams`` (a SimpleNamespace). Entries named like run
            options set them unless ``run_opts`` does.
        run_opts: run options (see :mod:`fbrain.brain.run_options`); they win over hparams.
        checkpointer: an :class:`fbrain.checkpoint.Checkpointer`: the Brain registers itself as the
            recoverable ``"brain"``, recovers the newest checkpoint when fitting starts, the best one
            when evaluating with ``max_key``/``min_key``, and saves intra-epoch checkpoints every
            ``ckpt_interval_steps`` steps or ``ckpt_interval_minutes`` minutes.
    """

    #: The default fit_batch lets the step write the new parameters and optimizer state into the
    #: old state's tensors (``make_train_step(donate_state=True)``), as torch optimizers update in
    #: place: no copy of the weights and moments per step. A ``brain.state`` kept from before a step
    #: then sees the update; copy it (``fbrain.tree.map_tensors(torch.clone, brain.state)``) to keep a
    #: snapshot, or set ``donate_state = False`` on the Brain for steps that leave old states as they were.
    #: Compiled steps (``compile_steps``) never donate: for the length of a step they hold the old
    #: and the new parameters and moments.
    donate_state = True

    def __init__(self, modules=None, opt_class=None, hparams=None, run_opts=None, checkpointer=None):
        if hparams is not None and not isinstance(hparams, Mapping):
            raise TypeError(f"hparams: expected a dict, got {type(hparams).__name__}")
        for name, value in resolve_run_options(run_opts, hparams).items():
            setattr(self, name, value)
        if _distributed.launched():
            # Started by torchrun: join the process group, one device per rank.
            placement = {"device": str(self.device), "distributed_backend": self.distributed_backend}
            _distributed.ddp_init_group(placement)
            self.device = placement["device"]
        self.device = str(self.device)
        self.device_type = self.device.split(":")[0]
        if self.device_type == "cuda":
            torch.cuda.set_device(torch.device(self.device))
        if opt_class is not None and not isinstance(opt_class, GradientTransformation):
            optim.from_torch(opt_class)  # fails now, naming opt_class, rather than when fit starts
        self.opt_class = opt_class
        self.checkpointer = checkpointer
        self.modules = torch.nn.ModuleDict(modules or {}).to(self.device)
        self.raw_modules = self.modules
        if hparams is not None:
            self.hparams = SimpleNamespace(**hparams)
        seed = (hparams or {}).get("seed", 0)
        # The Brain's own random stream (data order, dropout via state.rng): never the global RNG.
        self.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
        self.distributed_launch = _distributed.active()

        self.optimizer = None
        self.optimizers_dict = None
        self.train_sampler = None
        self.step = 0
        self.optimizer_step = 0
        self.training_ctx = PrecisionContext(self.precision, self.device_type)
        self.evaluation_ctx = PrecisionContext(self.eval_precision, self.device_type)
        self._loss_scale = DynamicLossScale()
        self.scaler = ScalerView(self, enabled=self.precision == "fp16")
        if not self.tqdm_colored_bar:
            self.tqdm_barcolor = dict.fromkeys(self.tqdm_barcolor, None)

        self._binding = Binding(self.modules)
        self._state: TrainState | None = None
        self._layout: OptimizerLayout | None = None
        self._train_steps: dict = {}
        self._eval_step = None
        self._step_compilers: dict = {}  # compile_steps: "train"/"eval" -> StepCompiler
        self._eval_stage = Stage.VALID
        self._pending: list = []
        self._loss_weight = 1
        self._train_loss = RunningMean()
        self._nonfinite_base = None
        self._nonfinite_extra = 0
        self._resume_skip = 0  # batches of the current epoch already trained on before a restart
        self._intra_epoch = IntraEpochSchedule(self.ckpt_interval_steps, self.ckpt_interval_minutes)
        self._intra_epoch_due = False
        self._grad_sync_off = False  # inside no_sync()
        self._synced_grads: dict = {}  # id(param) -> (weakref to the .grad averaged, its version)
        self._loss_is_global = False  # the last fit_batch ran the pure step (its loss is averaged)
        if checkpointer is not None and hasattr(checkpointer, "add_recoverable") and \
                "brain" not in getattr(checkpointer, "recoverables", {}):
            checkpointer.add_recoverable("brain", self)
        self.print_trainable_parameters()

    # -- the state ---------------------------------------------------------------------------------

    @property
    def state(self) -> TrainState:
        """The current TrainState (None until fitting or evaluation starts)."""
        return self._state

    @state.setter
    def state(self, new: TrainState) -> None:
        if not isinstance(new, TrainState):
            raise TypeError(f"Brain.state: expected an fbrain.TrainState, got {type(new).__name__}")
        self._state = new
        self._binding.bind(new.params, new.buffers)

    def _install_layout(self, layout: OptimizerLayout) -> None:
        """Use ``layout`` from now on: a fresh optimizer state (as SpeechBrain's fresh optimizers)."""
        self._layout = layout
        tx = layout.transformation()
        if self._state is None:
            self.state = TrainState.create(self.modules, tx, seed=self.seed, loss_scale=self._loss_scale)
        else:
            self.state = self._state.replace(opt_state=tx.init(self._state.params))
        self._train_steps.clear()

    def _ensure_state(self) -> None:
        """A state and optimizer views even if an overridden hook skipped the defaults."""
        unadopted = [o for o in self._optimizer_objects().values() if not isinstance(o, OptimizerView)]
        if self._layout is None or unadopted:
            self._adopt_optimizers()

    def _set_hyperparams(self, label: str, **values) -> None:
        layout = self._layout
        sub = set_hyperparams(layout.sub_state(self.state.opt_state, label), **values)
        self.state = self.state.replace(opt_state=layout.with_sub_state(self.state.opt_state, label, sub))

    # -- checkpoints -------------------------------------------------------------------------------

    @mark_as_saver
    def _save(self, path):
        """The Brain's checkpoint file: its TrainState and where the epoch stands."""
        _checkpoint.save(path, brain_record(self))

    @mark_as_loader
    def _recover(self, path, end_of_epoch=True):
        record = _checkpoint.load(path, device=self.device)
        # Strict where it matters: the saved state must fit the modules and optimizers we have.
        state = record["state"] if self._state is None else _checkpoint.restore(record["state"], self._state)
        self.state = state
        self.optimizer_step = record["optimizer_step"]
        if not end_of_epoch:
            # Resume in the middle of the epoch: skip the batches already trained on, keep the
            # running loss exactly as it was.
            self.step = self._resume_skip = record["step"]
            restore_running_mean(self._train_loss, record["train_loss"])
            self._nonfinite_base, self._nonfinite_extra = record["nonfinite_base"], record["nonfinite_extra"]
        else:
            # A fresh epoch starts: forget any position a newer (intra-epoch) checkpoint set before
            # one of its later files turned out damaged and recovery fell back to this one.
            self.step = self._resume_skip = 0
            self._train_loss.reset(0.0)
            self._nonfinite_base, self._nonfinite_extra = None, 0

    def _save_intra_epoch_ckpt(self):
        """An intra-epoch checkpoint; only the newest one is kept (SpeechBrain's behaviour)."""
        self.checkpointer.save_and_keep_only(
            end_of_epoch=False, num_to_keep=1, meta={INTRA_EPOCH_FLAG: True},
            ckpt_predicate=lambda c: INTRA_EPOCH_FLAG in c.meta, verbosity=logging.DEBUG)

    def _after_train_batch(self):
        if self.checkpointer is None or not self._intra_epoch.enabled:
            return
        self._intra_epoch_due = self._intra_epoch.due() or self._intra_epoch_due
        # Only between optimizer steps: collected micro-batches are not part of the state.
        if self._intra_epoch_due and not self._pending:
            self._save_intra_epoch_ckpt()
            self._intra_epoch_due = False

    # -- optimizers --------------------------------------------------------------------------------

    def init_optimizers(self):
        """Create the optimizer from ``opt_class`` (override to create several, SpeechBrain-style)."""
        if self.opt_class is None:
            logger.info("No opt_class was given to this Brain: no optimizer is initialised")
            return
        if isinstance(self.opt_class, GradientTransformation):
            self.optimizer = self.opt_class
        else:
            self.optimizer = self.opt_class(self.modules.parameters())
        self.optimizers_dict = {"opt_class": self.optimizer}

    def _optimizer_objects(self) -> dict:
        if self.optimizers_dict is not None:
            return dict(self.optimizers_dict)
        return {} if self.optimizer is None else {"optimizer": self.optimizer}

    def _adopt_optimizers(self) -> None:
        """Turn the optimizers ``init_optimizers`` made into one layout and views over the state."""
        names = {id(p): n for n, p in self.modules.named_parameters()}
        groups, specs = {}, {}
        for key, opt in self._optimizer_objects().items():
            if isinstance(opt, GradientTransformation):
                named = [(n, p) for n, p in self.modules.named_parameters()]
                groups[key] = (opt, [n for n, p in named if p.requires_grad])
                specs[key] = [(key, named, {})]
                continue
            if not isinstance(opt, torch.optim.Optimizer) or isinstance(opt, OptimizerView):
                raise TypeError(
                    f"optimizers_dict[{key!r}]: expected a torch.optim.Optimizer made by init_optimizers, "
                    f"got {type(opt).__name__}"
                )
            specs[key] = []
            for i, group in enumerate(opt.param_groups):
                label = key if len(opt.param_groups) == 1 else f"{key}[{i}]"
                named = []
                for p in group["params"]:
                    if id(p) not in names:
                        raise ValueError(
                            f"optimizer {key!r}: it optimizes a parameter of shape {tuple(p.shape)} that is not "
                            "in self.modules; every optimized parameter must belong to a module in `modules`"
                        )
                    named.append((names[id(p)], p))
                groups[label] = (twin_of_group(opt, group), [n for n, p in named if p.requires_grad])
                extras = {k: v for k, v in group.items() if k != "params"}
                specs[key].append((label, named, extras))
        self._install_layout(OptimizerLayout(groups, [n for n, _ in self.modules.named_parameters()]))
        old = self._optimizer_objects()
        for key, spec in specs.items():
            view = OptimizerView(self, spec)
            if self.optimizers_dict is not None:
                self.optimizers_dict[key] = view
            # Attributes that held the torch optimizer (self.optimizer, self.g_optimizer ...) get the view.
            for attr, value in list(vars(self).items()):
                if value is old[key]:
                    setattr(self, attr, view)

    def _apply_grads(self, labels, grads, found_inf=None) -> None:
        """Used by the optimizer views: one functional update of ``labels`` from ``.grad`` tensors."""
        self.state = apply_grads(self._layout, self.state, labels, grads, found_inf)

    def _sync_grads(self, named, found_inf=None):
        """Under torchrun, average the ``.grad`` of ``named`` over the ranks (one flat all-reduce),
        once per backward: what DDP does during ``backward()``, done here when the gradients are
        first used (``scaler.unscale_``, ``optimizers_step``'s clipping, ``optimizer.step``).

        Gradients already averaged and not changed since are not sent again, and nothing is sent
        inside :meth:`no_sync`. Returns ``found_inf``, true on every rank if it was on one.
        """
        if self._grad_sync_off or not _distributed.active():
            return found_inf

        def mark(p):
            return (None, None) if p.grad is None else (weakref.ref(p.grad), p.grad._version)

        def synced(p):
            entry = self._synced_grads.get(id(p))
            if entry is None:
                return False
            if p.grad is None:
                return entry[0] is None
            return entry[0] is not None and entry[0]() is p.grad and entry[1] == p.grad._version

        pending = [p for _, p in named if p.requires_grad and not synced(p)]
        if not pending:
            return found_inf
        found_inf = average_grads(pending, torch.distributed.group.WORLD, found_inf)
        self._synced_grads.update((id(p), mark(p)) for p in pending)
        return found_inf

    def _forget_synced(self, named) -> None:
        """After a step: the next gradients of ``named`` are new and must be averaged again."""
        for _, p in named:
            self._synced_grads.pop(id(p), None)

    def freeze_optimizers(self, optimizers):
        """The optimizers to step this time (override to freeze some); returns them all by default."""
        return optimizers

    def zero_grad(self, set_to_none=False):
        for opt in self._optimizer_objects().values():
            if isinstance(opt, torch.optim.Optimizer):
                opt.zero_grad(set_to_none=set_to_none)

    def optimizers_step(self):
        """Unscale, clip (every parameter of every optimizer together) and step, for imperative recipes."""
        if self.optimizers_dict is not None:
            valid = self.freeze_optimizers(self.optimizers_dict)
        elif self.optimizer is not None:
            valid = {"optimizer": self.optimizer}
        else:
            return
        for opt in valid.values():
            if isinstance(opt, OptimizerView):
                self._sync_grads(opt._named)  # averaged over the ranks once, before unscaling and clipping
        with self.no_sync():  # clipping changes the averaged gradients in place: do not send them again
            for opt in valid.values():
                self.scaler.unscale_(opt)
            if self.max_grad_norm is not None and self.max_grad_norm > 0:
                params = [p for opt in valid.values() for g in opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            for opt in valid.values():
                self.scaler.step(opt)
        self.scaler.update()
        for opt in valid.values():
            opt.zero_grad(set_to_none=True)
        self.optimizer_step += 1

    # -- hooks to override -------------------------------------------------------------------------

    def compute_forward(self, batch, stage):
        raise NotImplementedError(
            f"{type(self).__name__}.compute_forward is not overridden: subclass fbrain.Brain and define "
            "compute_forward(self, batch, stage) returning the predictions"
        )

    def compute_objectives(self, predictions, batch, stage):
        raise NotImplementedError(
            f"{type(self).__name__}.compute_objectives is not overridden: subclass fbrain.Brain and define "
            "compute_objectives(self, predictions, batch, stage) returning the loss"
        )

    def on_stage_start(self, stage, epoch=None):
        pass

    def on_stage_end(self, stage, stage_loss, epoch=None):
        pass

    def on_fit_batch_start(self, batch, should_step):
        pass

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        pass

    def on_fit_start(self):
        """Check the unsupported options, create the optimizers and state, recover a checkpoint."""
        self._compile()
        self._wrap_distributed()
        self.init_optimizers()
        # New torch optimizers get a fresh optimizer state (SpeechBrain's fit does the same); an
        # init_optimizers that kept the previous ones (views already) keeps their state.
        self._ensure_state()
        if self.checkpointer is not None and hasattr(self.checkpointer, "recover_if_possible"):
            self.checkpointer.recover_if_possible()

    def on_evaluate_start(self, max_key=None, min_key=None):
        if self.checkpointer is not None and hasattr(self.checkpointer, "recover_if_possible"):
            self.checkpointer.recover_if_possible(max_key=max_key, min_key=min_key)

    @staticmethod
    def _compile_module(module: torch.nn.Module, **compile_kwargs) -> None:
        """``torch.compile`` ``module``'s calls in place: its names, Parameters and buffers stay as they are.

        What ``nn.Module.compile`` means to do, but that compiles ``_call_impl`` itself, a frame in
        torch.nn that dynamo skips, so a torch.nn module (Sequential, Linear, LSTM ...) would silently
        stay eager. The call goes through a function of ours, which dynamo traces, inlining the module
        (what ``torch.compile(module)``'s ``OptimizedModule`` does, without renaming anything).
        """
        call = module._call_impl

        def call_module(*args, **kwargs):
            return call(*args, **kwargs)

        module._compiled_call_impl = torch.compile(call_module, **compile_kwargs)

    def _compile(self):
        """``torch.compile`` the modules named by ``compile_module_keys`` (all when None), SpeechBrain-style.

        SpeechBrain replaces each module with ``torch.compile(module)``, an ``OptimizedModule`` whose
        parameters are renamed (``model._orig_mod.weight``); the state, the parameter binding, the pure
        step's reparametrisation and the checkpoints all go by the uncompiled names, so here each module
        is compiled in place instead (:meth:`_compile_module`): same names, same Parameter objects,
        ``self.modules.model(x)`` runs the compiled graph. As in SpeechBrain, a module that fails to
        compile stays eager with a warning, and a module already compiled is left alone.
        ``jit`` (TorchScript) is not supported: a scripted module cannot run with the state's tensors.
        """
        compile_keys: set = set()
        if self.compile:
            compile_keys = set(self.modules) if self.compile_module_keys is None else set(self.compile_module_keys)
        jit_keys: set = set()
        if self.jit:
            jit_keys = set(self.modules) if self.jit_module_keys is None else set(self.jit_module_keys)
        for name in sorted(compile_keys | jit_keys):
            if name not in self.modules:
                option = "compile_module_keys" if name in compile_keys else "jit_module_keys"
                raise ValueError(f"run option {option}: module {name!r} is not in modules {sorted(self.modules)}")
        for name in sorted(compile_keys):
            module = self.modules[name]
            if module._compiled_call_impl is None:  # not compiled by an earlier fit
                try:
                    self._compile_module(module, mode=self.compile_mode, fullgraph=self.compile_using_fullgraph,
                                         dynamic=self.compile_using_dynamic_shape_tracing)
                except Exception as e:  # SpeechBrain's behaviour: skip it, keep training eagerly
                    logger.warning("module %r in compile_module_keys failed to compile and stays eager: %s", name, e)
                    continue
            jit_keys.discard(name)
        if jit_keys:
            raise NotImplementedError(
                f"run option jit: fbrain.Brain cannot TorchScript modules {sorted(jit_keys)} (a scripted module "
                "cannot run with the state's parameters); use compile=True instead"
            )

    def _wrap_distributed(self):
        # Under torchrun nothing is wrapped: the pure step averages gradients across ranks itself.
        if self.data_parallel_backend:
            raise NotImplementedError(
                "run option data_parallel_backend: fbrain.Brain has no single-process DataParallel; "
                "launch with torchrun for data parallelism"
            )

    # -- the default batch functions: the pure steps ----------------------------------------------

    def _train_loss_fn(self, params, buffers, batch, rng):
        # BatchNorm updates its running statistics in place: give it private copies, return them.
        tensors = {**params, **{n: b.clone() for n, b in buffers.items()}}
        with swapped(self.modules, tensors, strict=False):
            outputs = self.compute_forward(batch, Stage.TRAIN)
            loss = self.compute_objectives(outputs, batch, Stage.TRAIN)
        return loss, {"buffers": {n: tensors[n] for n in buffers}, _OUTPUTS: outputs}

    def _eval_loss_fn(self, params, buffers, batch, rng):
        with swapped(self.modules, {**params, **buffers}, strict=False):
            outputs = self.compute_forward(batch, self._eval_stage)
            loss = self.compute_objectives(outputs, batch, self._eval_stage)
        return loss

    def _train_step_for(self, count: int):
        active = None
        if type(self).freeze_optimizers is not Brain.freeze_optimizers and self.optimizers_dict:
            chosen = self.freeze_optimizers(self.optimizers_dict)
            active = frozenset(label for opt in chosen.values() for label in opt._labels)
        key = (count, active)
        if key not in self._train_steps:
            check_state(self.state)
            self._train_steps[key] = make_train_step(
                self._train_loss_fn, self._layout.transformation(active), max_grad_norm=self.max_grad_norm,
                precision=self.precision, accumulation=count, loss_scale=self._loss_scale,
                donate_state=self.donate_state,
                process_group=torch.distributed.group.WORLD if _distributed.active() else None)
        return self._train_steps[key]

    def _compiler(self, kind: str) -> StepCompiler:
        """The Brain's compiler for ``kind`` steps (``compile_steps``), made once and kept across fits."""
        if kind not in self._step_compilers:
            # dynamic=None: torch's automatic dynamic shapes (a second shape recompiles once, for
            # all shapes), unless compile_using_dynamic_shape_tracing asks for dynamic from the start.
            self._step_compilers[kind] = StepCompiler(kind, mode=self.compile_mode,
                                                      dynamic=self.compile_using_dynamic_shape_tracing or None)
        return self._step_compilers[kind]

    def _run_train_step(self, batches: list):
        """One pure step on ``batches`` (micro-batches when more than one); returns (loss, outputs)."""
        step = self._train_step_for(len(batches))
        # Micro-batches stay apart: padded batches of different lengths cannot be stacked.
        batch = batches[0] if len(batches) == 1 else MicroBatches(batches)
        if self.compile_steps:
            self.state, metrics = self._compiler("train")(step, self.state, batch)
        else:
            self.state, metrics = step(self.state, batch)
        self.optimizer_step += 1
        self._loss_weight = len(batches)
        self._loss_is_global = True  # the step averaged it over the ranks
        return metrics["loss"], metrics.get(_OUTPUTS)

    def fit_batch(self, batch):
        """Train on one batch with the pure train step; returns the (device) loss.

        With ``grad_accumulation_factor`` k, batches are collected and every k-th one runs a step
        on all k; the others return None. Left-over batches are applied when the epoch ends.
        """
        k = self.grad_accumulation_factor
        should_step = self.step % k == 0
        self.on_fit_batch_start(batch, should_step)
        if k == 1:
            loss, outputs = self._run_train_step([batch])
        else:
            self._pending.append(batch)
            loss = outputs = None
            if should_step:
                loss, outputs = self._run_train_step(self._pending)
                self._pending = []
        self.on_fit_batch_end(batch, outputs, loss, should_step)
        return loss

    def _flush_pending(self) -> None:
        """Apply micro-batches left over at the end of an epoch (SpeechBrain drops them)."""
        if self._pending:
            loss, _ = self._run_train_step(self._pending)
            self._pending = []
            self._record_train_loss(loss)

    @torch.no_grad()
    def evaluate_batch(self, batch, stage):
        """The loss of one batch with the pure eval step (``eval_precision``)."""
        if self._eval_step is None:
            self._eval_step = make_eval_step(self._eval_loss_fn, precision=self.eval_precision)
        self._eval_stage = stage
        if self.compile_steps:
            return self._compiler("eval")(self._eval_step, self.state, batch)["loss"].detach()
        return self._eval_step(self.state, batch)["loss"].detach()

    # -- SpeechBrain's checks, for imperative recipes ----------------------------------------------

    @property
    def nonfinite_count(self) -> int:
        """Non-finite steps this epoch: those the steps skipped plus what a recipe added itself."""
        if self._state is None or self._nonfinite_base is None:
            return self._nonfinite_extra
        return self._nonfinite_extra + int(self._state.counters.nonfinite_count - self._nonfinite_base)

    @nonfinite_count.setter
    def nonfinite_count(self, value: int) -> None:
        self._nonfinite_extra = 0
        self._nonfinite_extra = int(value) - self.nonfinite_count

    def check_loss_isfinite(self, loss):
        """SpeechBrain's check (reads the loss on the host): count a non-finite loss, raise past patience."""
        if not torch.isfinite(loss).all():
            self.nonfinite_count += 1
            self._raise_if_patience_exhausted()

    def _raise_if_patience_exhausted(self) -> None:
        if self.nonfinite_count > self.nonfinite_patience:
            raise ValueError(
                f"Loss or gradients were not finite in {self.nonfinite_count} steps this epoch, more than "
                f"nonfinite_patience={self.nonfinite_patience} (those steps were skipped). To debug, wrap fit() "
                "in torch.autograd.detect_anomaly()"
            )

    def check_gradients(self):
        """Set non-finite gradients to None (SpeechBrain's ``skip_nonfinite_grads``; reads on the host)."""
        for name, param in self.modules.named_parameters():
            if param.requires_grad and param.grad is not None and not torch.isfinite(param.grad).all():
                param.grad = None
                logger.warning("Gradients of %s contain NaN or Inf; setting them to None", name)

    @contextlib.contextmanager
    def no_sync(self, use=True):
        """DDP's ``no_sync``: inside it, an optimizer step does not average gradients across ranks.

        Imperative recipes need it less than with DDP: gradients are averaged when they are first
        used (``unscale_``, clipping, ``optimizer.step()``), not in ``backward()``, so micro-batches
        accumulated before a step are communicated once anyway. Without torchrun it does nothing.
        """
        if not use:
            yield
            return
        outer, self._grad_sync_off = self._grad_sync_off, True
        try:
            yield
        finally:
            self._grad_sync_off = outer

    def update_average(self, loss, avg_loss):
        """SpeechBrain's running average (a host read per call); only called when overridden."""
        if torch.isfinite(loss):
            avg_loss -= avg_loss / self.step
            avg_loss += float(loss) / self.step
        return avg_loss

    # -- losses ------------------------------------------------------------------------------------

    @property
    def avg_train_loss(self) -> float:
        """The mean training loss of this epoch so far (one host read)."""
        return self._train_loss.value()

    @avg_train_loss.setter
    def avg_train_loss(self, value: float) -> None:
        self._train_loss.reset(value)

    def _custom_average(self) -> bool:
        return type(self).update_average is not Brain.update_average

    def _mean_loss_across_ranks(self, loss):
        """Under torchrun, ``loss`` averaged over the ranks (a small all-reduce), so the running
        train loss, the progress bar and ``on_stage_end`` show the run's loss, not rank 0's."""
        if loss is None or not _distributed.active():
            return loss
        loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        _, mean = _distributed.mean_across_ranks({}, loss.reshape(()).float(), torch.distributed.group.WORLD)
        return mean

    def _record_train_loss(self, loss) -> None:
        if self._custom_average():
            if loss is not None:
                self.avg_train_loss = self.update_average(loss, self.avg_train_loss)
            return
        self._train_loss.add(loss, self._loss_weight)
        self._loss_weight = 1

    # -- data --------------------------------------------------------------------------------------

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """A DataLoader with SpeechBrain's semantics; shuffling draws from the Brain's seeded generator."""
        loader, sampler = _data.make_dataloader(dataset, train=stage == Stage.TRAIN, seed=self.seed,
                                                sorting=getattr(getattr(self, "hparams", None), "sorting", None),
                                                **loader_kwargs)
        if stage == Stage.TRAIN and sampler is not None:
            self.train_sampler = sampler
        return loader

    # -- the loops ---------------------------------------------------------------------------------

    def fit(self, epoch_counter, train_set, valid_set=None, progressbar=None, train_loader_kwargs={},
            valid_loader_kwargs={}):
        """Train for each epoch of ``epoch_counter`` on ``train_set``, validating on ``valid_set``."""
        if self.test_only:
            logger.info("Test only mode: skipping training and validation")
            return
        if not isinstance(train_set, DataLoader):
            train_set = self.make_dataloader(train_set, stage=Stage.TRAIN, **dict(train_loader_kwargs))
        if valid_set is not None and not isinstance(valid_set, DataLoader):
            valid_set = self.make_dataloader(valid_set, stage=Stage.VALID, ckpt_prefix=None,
                                             **dict(valid_loader_kwargs))
        self.on_fit_start()
        self._ensure_state()
        # A recovered checkpoint's hyperparameters are new tensors: mirror them on the host once,
        # so the fused CPU optimizer kernels serve the steps (they never read a tensor in a step).
        mirror_hyperparams(self.state.opt_state)
        enable = (not self.noprogressbar) if progressbar is None else bool(progressbar)
        enable = enable and _distributed.is_main_process()  # one progress bar per run, not per rank
        for epoch in epoch_counter:
            self._fit_train(train_set, epoch, enable)
            self._fit_valid(valid_set, epoch, enable)
            if (self.debug and epoch == self.debug_epochs) or self._optimizer_step_limit_exceeded:
                break

    @property
    def _optimizer_step_limit_exceeded(self) -> bool:
        return self.optimizer_step_limit is not None and self.optimizer_step >= self.optimizer_step_limit

    def _start_epoch(self, epoch) -> None:
        c = self.state.counters
        epoch_value = epoch if isinstance(epoch, int) else 0
        self.state = self.state.replace(counters=c._replace(epoch=torch.full_like(c.epoch, epoch_value)))
        if not self._resume_skip:
            self._nonfinite_base = self.state.counters.nonfinite_count.clone()
            self._nonfinite_extra = 0
        if self.train_sampler is not None and hasattr(self.train_sampler, "set_epoch"):
            self.train_sampler.set_epoch(epoch)

    def _report(self, bar, stage_loss: RunningMean | None, refresh: bool = False) -> None:
        """The only host reads of a stage: the running loss for the bar and the non-finite count."""
        if stage_loss is not None and not bar.disable:
            bar.set_postfix(train_loss=stage_loss.value(), refresh=refresh)
        self._raise_if_patience_exhausted()

    def _fit_train(self, train_set, epoch, enable):
        self.on_stage_start(Stage.TRAIN, epoch)
        self.modules.train()
        self.zero_grad()
        self._start_epoch(epoch)
        self._pending = []
        shown = None if self._custom_average() else self._train_loss
        last_report = time.monotonic()
        train_set, self._resume_skip = skip_batches(train_set, self._resume_skip), 0
        self._intra_epoch.restart()
        with tqdm(train_set, initial=self.step, dynamic_ncols=True, disable=not enable,
                  colour=self.tqdm_barcolor["train"]) as bar:
            for batch in bar:
                if self._optimizer_step_limit_exceeded:
                    logger.info("Train iteration limit exceeded")
                    break
                self.step += 1
                self._loss_weight = 1
                self._loss_is_global = False
                loss = self.fit_batch(batch)
                if not self._loss_is_global:
                    loss = self._mean_loss_across_ranks(loss)  # an imperative fit_batch's local loss
                self._record_train_loss(loss)
                self._after_train_batch()
                if time.monotonic() - last_report >= _REPORT_SECONDS:
                    self._report(bar, shown)
                    last_report = time.monotonic()
                if self.debug and self.step == self.debug_batches:
                    break
            self._flush_pending()
            self._report(bar, shown, refresh=True)
        self.zero_grad(set_to_none=True)
        self.on_stage_end(Stage.TRAIN, self.avg_train_loss, epoch)
        self.avg_train_loss = 0.0
        self.step = 0

    def _eval_loop(self, dataset, stage, enable) -> float:
        mean, custom, avg = RunningMean(), self._custom_average(), 0.0
        with torch.no_grad():
            for batch in tqdm(dataset, dynamic_ncols=True, disable=not enable,
                              colour=self.tqdm_barcolor["valid" if stage == Stage.VALID else "test"]):
                self.step += 1
                loss = self.evaluate_batch(batch, stage=stage)
                if custom:
                    avg = self.update_average(loss, avg)
                else:
                    mean.add(loss)
                if self.debug and self.step == self.debug_batches:
                    break
        self.step = 0
        return avg if custom else mean.value()

    def _fit_valid(self, valid_set, epoch, enable):
        if valid_set is None:
            return
        self.on_stage_start(Stage.VALID, epoch)
        self.modules.eval()
        avg_valid_loss = self._eval_loop(valid_set, Stage.VALID, enable)
        with torch.no_grad():
            self.on_stage_end(Stage.VALID, avg_valid_loss, epoch)

    def evaluate(self, test_set, max_key=None, min_key=None, progressbar=None, test_loader_kwargs={}):
        """The average loss on ``test_set`` (after ``on_evaluate_start`` recovers the best checkpoint)."""
        enable = (not self.noprogressbar) if progressbar is None else bool(progressbar)
        if not isinstance(test_set, DataLoader):
            kwargs = {**test_loader_kwargs, "ckpt_prefix": None}
            test_set = self.make_dataloader(test_set, Stage.TEST, **kwargs)
        self.on_evaluate_start(max_key=max_key, min_key=min_key)
        if self._state is None:
            self._install_layout(OptimizerLayout({}, [n for n, _ in self.modules.named_parameters()]))
        self.on_stage_start(Stage.TEST, epoch=None)
        self.modules.eval()
        avg_test_loss = self._eval_loop(test_set, Stage.TEST, enable)
        with torch.no_grad():
            self.on_stage_end(Stage.TEST, avg_test_loss, None)
        return avg_test_loss

    def print_trainable_parameters(self):
        total = sum(p.numel() for p in self.modules.parameters())
        trainable = sum(p.numel() for p in self.modules.parameters() if p.requires_grad)
        share = 100.0 * trainable / total if total else 0.0
        logger.info("%s: %d trainable parameters of %d (%.2f%%)", type(self).__name__, trainable, total, share)
