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
from types import SimpleNamespace
from typing import Mapping

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fbrain import data as _data
from fbrain import optim
from fbrain import checkpoint as _checkpoint
from fbrain import distributed as _distributed
from fbrain import sharding
from fbrain.checkpoint import shards as _shards
from fbrain.brain.auto_compile import planned_train_steps
from fbrain.brain.binding import Binding
from fbrain.brain.checkpointing import INTRA_EPOCH_FLAG, IntraEpochSchedule, skip_batches
from fbrain.brain.contexts import PrecisionContext
from fbrain.brain.default_steps import DefaultSteps
from fbrain.brain.epoch_counter import EpochCounter
from fbrain.brain.grad_sync import GradientSync
from fbrain.brain.imperative import ImperativeUpdates
from fbrain.brain.module_compile import compile_modules
from fbrain.brain.optimizers import OptimizerLayout, layout_of, vector_weight_decay_groups
from fbrain.brain.preemption import Preemption
from fbrain.brain.profiling import TrainingProfiler
from fbrain.brain.inputs import checked_checkpointer, checked_epoch_counter, checked_seed, registration_conflict
from fbrain.brain.run_options import resolve_run_options
from fbrain.brain.running_mean import RunningMean
from fbrain.brain.stage import Stage
from fbrain.brain.train_loss import TrainLoss
from fbrain.brain.views import OptimizerView, ScalerView
from fbrain.checkpoint.recoverables import mark_as_loader, mark_as_preparer, mark_as_saver, register_with_speechbrain
from fbrain.devices import resolve_device, use_device
from fbrain.functional import swapped
from fbrain.loss_scale import DynamicLossScale
from fbrain.optim.base import GradientTransformation
from fbrain.state import TrainState

logger = logging.getLogger(__name__)

# What a Brain's checkpoint file holds (besides the TrainState), and the running loss's record.
_BRAIN_RECORD = {"state", "step", "optimizer_step", "train_loss", "nonfinite_base", "nonfinite_extra"}
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
            placement = {"device": self.device, "distributed_backend": self.distributed_backend}
            _distributed.ddp_init_group(placement)
            self.device = placement["device"]
        device = resolve_device(self.device)  # "cuda" -> the current one (cuda:LOCAL_RANK under torchrun)
        use_device(device)
        self.device, self.device_type = str(device), device.type
        if opt_class is not None and not isinstance(opt_class, GradientTransformation):
            optim.from_torch(opt_class)  # fails now, naming opt_class, rather than when fit starts
        self.opt_class = opt_class
        self.checkpointer = checked_checkpointer(checkpointer)
        self.modules = torch.nn.ModuleDict(modules or {}).to(self.device)
        self.raw_modules = self.modules
        if hparams is not None:
            self.hparams = SimpleNamespace(**hparams)
        # The Brain's own random stream (data order, dropout via state.rng): never the global RNG.
        self.seed = checked_seed(hparams)
        self.distributed_launch = _distributed.active()

        self.optimizer = None
        self.optimizers_dict = None
        self.train_sampler = None
        self.step = 0  # batches of the current stage so far (at the start of an epoch: where it resumes)
        self.optimizer_step = 0
        self.training_ctx = PrecisionContext(self.precision, self.device_type)
        self.evaluation_ctx = PrecisionContext(self.eval_precision, self.device_type)
        # Fixed for the Brain's life, as SpeechBrain's GradScaler is: both paths use this rule.
        self._imperative = ImperativeUpdates(self, self.precision, DynamicLossScale(), GradientSync())
        self.scaler = ScalerView(self._imperative, enabled=self.precision == "fp16")
        if not self.tqdm_colored_bar:
            self.tqdm_barcolor = dict.fromkeys(self.tqdm_barcolor, None)

        self._binding = Binding(self.modules)
        self._state: TrainState | None = None
        self._layout: OptimizerLayout | None = None
        self._steps = DefaultSteps(self, self._imperative.rule.loss_scale)
        self._pending: list = []
        custom_average = type(self).update_average is not Brain.update_average
        self._train_loss = TrainLoss(self.update_average if custom_average else None)
        self._nonfinite_base = None  # state.counters.nonfinite_count when the epoch started
        self._nonfinite_extra = 0  # what a recipe added to nonfinite_count itself
        self._nonfinite_checked = 0  # of those, what check_loss_isfinite counted (patience applies)
        self._intra_epoch = IntraEpochSchedule(self.ckpt_interval_steps, self.ckpt_interval_minutes)
        self._intra_epoch_due = False
        self._preemption = Preemption()
        self._profiler: TrainingProfiler | None = None  # profile_training, while fit runs
        #: With ``eval_with_ema``: the averaged weights while a valid or test stage runs (else None).
        self.eval_params = None
        self.eval_rng = None  # during an eval stage: the key its next batch draws from
        self._shards_written_to = None  # shard_optimizer_state: the folder this rank's shard went to
        if checkpointer is not None:
            conflict = registration_conflict(checkpointer, Brain)
            if conflict:
                raise ValueError(conflict)
            # SpeechBrain's own Checkpointer (a recipe's YAML may make one) finds hooks by class.
            register_with_speechbrain(Brain, EpochCounter)
            checkpointer.recoverables.pop("brain", None)  # an earlier Brain's: the newest Brain saves
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
        self._binding.check(new.params, new.buffers, "Brain.state")  # before anything changes
        self._state = new
        self._binding.bind(new.params, new.buffers)

    def _install_layout(self, layout: OptimizerLayout) -> None:
        """Use ``layout`` from now on: a fresh optimizer state (as SpeechBrain's fresh optimizers)."""
        self._layout = layout
        self._imperative.use_layout(layout)
        self._steps.clear()
        tx = layout.transformation()
        if self.shard_group is not None:  # this rank's shard only, never the whole state
            tx = sharding.initialising_shards(tx, self.shard_group)
        if self._state is None:
            self.state = TrainState.create(self.modules, tx, seed=self.seed, loss_scale=self._imperative.rule.loss_scale)
        else:
            self.state = self._state.replace(opt_state=tx.init(self._state.params))

    @property
    def shard_group(self):
        """The process group sharing the optimizer state (``shard_optimizer_state`` under torchrun),
        else None."""
        return torch.distributed.group.WORLD if self.shard_optimizer_state and _distributed.active() else None

    def _sharded(self, state: TrainState) -> TrainState:
        """``state`` (whole optimizer state) as this Brain keeps it: this rank's shard when sharded."""
        group = self.shard_group
        if group is None or self._layout is None:  # no optimizer yet (evaluate in a fresh process)
            return state
        return sharding.shard_state(state, self._layout.transformation(), group)

    @property
    def _fbrain_shard_saver(self):
        """What fbrain's Checkpointer calls on every rank before rank 0 saves the Brain, or None when
        nothing is sharded: with sharded optimizer state, each rank writes its own shard into the
        folder it is given (the whole state is never gathered); the Brain's file then holds
        everything else."""
        return self._save_shard if self.shard_group is not None and self._state is not None else None

    def _save_shard(self, folder) -> None:
        group = self.shard_group
        _shards.write(folder, torch.distributed.get_rank(group), torch.distributed.get_world_size(group),
                      self._state.opt_state)
        self._shards_written_to = folder

    def ensure_state(self) -> TrainState:
        """``brain.state`` and the optimizer views, made now if they are not yet (``fit`` does this
        after ``on_fit_start``, in case an overridden hook skipped it): the optimizers come from
        ``init_optimizers``. Returns the state."""
        if self._layout is None and not self._optimizer_objects():
            self.init_optimizers()
        unadopted = [o for o in self._optimizer_objects().values() if not isinstance(o, OptimizerView)]
        if self._layout is None or unadopted:
            self._adopt_optimizers()
        return self.state

    # -- checkpoints -------------------------------------------------------------------------------

    @mark_as_saver
    def _save(self, path):
        """The Brain's checkpoint file: its TrainState and where the epoch stands (the running loss
        exactly, pending losses included)."""
        state, shards = self.state, None
        if self.shard_group is not None:
            if self._shards_written_to != _shards.folder_of(path):
                raise _checkpoint.CheckpointError(
                    f"{path}: a Brain with shard_optimizer_state is saved by fbrain's Checkpointer (every rank "
                    "writes its shard of the optimizer state); use fbrain.Checkpointer in place of SpeechBrain's")
            # The optimizer state is in the shard files beside this one, with what reads it back.
            shards = sharding.shards_record(state, self._layout.transformation(), self.shard_group)
            self._shards_written_to = None  # each save's shards count once
            state = state.replace(opt_state=None)
        _checkpoint.save(path, {
            "state": state, "step": self.step, "optimizer_step": self.optimizer_step,
            "train_loss": self._train_loss.mean.record(),
            "nonfinite_base": self._nonfinite_base, "nonfinite_extra": self._nonfinite_extra,
            "nonfinite_checked": self._nonfinite_checked, "opt_state_shards": shards,
        })

    @mark_as_preparer
    def _prepare_recover(self, path, end_of_epoch=True):
        """Read and check the Brain's checkpoint file; the function returned puts it in place."""
        record = _checkpoint.load(path)  # verified, on the CPU: each part is placed once, below
        if not isinstance(record, dict) or not _BRAIN_RECORD <= record.keys():
            raise _checkpoint.CheckpointError(f"{path}: not a Brain's checkpoint (expected the fields "
                                              f"{sorted(_BRAIN_RECORD)})")
        counts = [record[k] for k in ("step", "optimizer_step", "nonfinite_extra")]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) or \
                not (record["nonfinite_base"] is None or isinstance(record["nonfinite_base"], torch.Tensor)):
            raise _checkpoint.CheckpointError(f"{path}: the Brain's counters are damaged ({counts!r:.80})")
        saved = record["state"]
        if record.get("opt_state_shards") is not None:  # saved sharded: each rank's file beside this one
            saved = sharding.read_opt_state_shards(saved, record["opt_state_shards"], _shards.folder_of(path))
        if self._layout is not None and isinstance(saved, TrainState):
            saved = saved.replace(opt_state=self._layout.upgrade(saved.opt_state))
        # Strict where it matters: the saved state must fit the modules and optimizers we have (and
        # lands on their devices).
        template = self._state
        if template is not None and self.shard_group is not None:  # checkpoints hold the whole state
            template = sharding.whole_shaped(template, self._layout.transformation(), self.shard_group)
        if template is not None and self._layout is not None and not self._layout.groups and \
                isinstance(saved, TrainState):
            # No optimizer here (a Brain made without opt_class to evaluate): the checkpoint's optimizer
            # state is not loaded, as SpeechBrain's Brain, which registers its optimizer with the
            # checkpointer only where it has one; parameters, buffers and counters are checked as ever.
            saved = saved.replace(opt_state=template.opt_state)
        state = _checkpoint.restore(saved, template, device=self.device if self._state is None else None)
        state = self._sharded(state)  # for this run's ranks, however many saved it
        train_loss = None if end_of_epoch else _checkpoint.restore(record["train_loss"], device=self.device)
        if train_loss is not None and not (isinstance(train_loss, dict) and RunningMean.RECORD <= train_loss.keys()):
            raise _checkpoint.CheckpointError(f"{path}: the running loss's record is damaged")

        def apply():
            self.state = state
            self.optimizer_step = record["optimizer_step"]
            if not end_of_epoch:
                # Resume in the middle of the epoch: the next epoch skips the batches already trained
                # on (self.step of them) and keeps the running loss exactly as it was.
                self.step = record["step"]
                self._train_loss.mean.restore(train_loss)
                self._nonfinite_base, self._nonfinite_extra = record["nonfinite_base"], record["nonfinite_extra"]
                # Checkpoints of fbrain 0.2 did not tell the two apart: all of them counted.
                self._nonfinite_checked = record.get("nonfinite_checked", record["nonfinite_extra"])
            else:
                # A fresh epoch starts: forget any position left from an earlier recovery.
                self.step = 0
                self._train_loss.reset(0.0)
                self._nonfinite_base, self._nonfinite_extra, self._nonfinite_checked = None, 0, 0
        return apply

    @mark_as_loader
    def _recover(self, path, end_of_epoch=True):
        self._prepare_recover(path, end_of_epoch)()

    def _save_intra_epoch_ckpt(self):
        """An intra-epoch checkpoint; only the newest one is kept (SpeechBrain's behaviour)."""
        self.checkpointer.save_and_keep_only(
            end_of_epoch=False, num_to_keep=1, meta={INTRA_EPOCH_FLAG: True},
            ckpt_predicate=lambda c: INTRA_EPOCH_FLAG in c.meta, verbosity=logging.DEBUG)

    def _stop_for_signal(self):
        """SIGTERM or Ctrl-C arrived: the step is done; save where the epoch stands, and exit."""
        if self.checkpointer is not None:
            self._save_intra_epoch_ckpt()
            logger.warning("saved a checkpoint at epoch step %d; run the same command again to resume", self.step)
        else:
            logger.warning("no checkpointer: nothing was saved")
        self._exit_for_signal()

    def _exit_for_signal(self):
        # Every rank stops at this step (see fbrain.brain.preemption), after its last collective.
        _distributed.leave()
        raise SystemExit(self._preemption.exit_status())

    def _after_train_batch(self):
        if self.checkpointer is None or not self._intra_epoch.enabled:
            return
        due = self._intra_epoch.due()
        if self._intra_epoch.every_seconds > 0 and _distributed.active():
            # Each rank's clock differs: save when any rank's interval has passed, on every rank at
            # the same step (a save is a collective now: rank 0 writes, sharded state is gathered).
            due = self._preemption.any_rank(due)
            if due:
                self._intra_epoch.restart()
        self._intra_epoch_due = due or self._intra_epoch_due
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
        elif self.remove_vector_weight_decay:
            self.optimizer = self.opt_class(vector_weight_decay_groups(self.modules))
        else:
            self.optimizer = self.opt_class(self.modules.parameters())
        self.optimizers_dict = {"opt_class": self.optimizer}

    def _optimizer_objects(self) -> dict:
        if self.optimizers_dict is not None:
            return dict(self.optimizers_dict)
        return {} if self.optimizer is None else {"optimizer": self.optimizer}

    def _adopt_optimizers(self) -> None:
        """Turn the optimizers ``init_optimizers`` made into one layout and views over the state."""
        old = self._optimizer_objects()
        layout, specs = layout_of(old, self.modules, self.ema_decay)
        self._install_layout(layout)
        for key, spec in specs.items():
            view = OptimizerView(self._imperative, spec)
            if self.optimizers_dict is not None:
                self.optimizers_dict[key] = view
            # Attributes that held the torch optimizer (self.optimizer, self.g_optimizer ...) get the view;
            # opt_class stays what was given (a transformation given as opt_class is also what
            # init_optimizers puts in self.optimizer), so a second fit makes its optimizer again.
            for attr, value in list(vars(self).items()):
                if value is old[key] and attr != "opt_class":
                    setattr(self, attr, view)

    def freeze_optimizers(self, optimizers):
        """The optimizers to step this time (override to freeze some); returns them all by default."""
        return optimizers

    def zero_grad(self, set_to_none=False):
        for opt in self._optimizer_objects().values():
            if isinstance(opt, torch.optim.Optimizer):
                opt.zero_grad(set_to_none=set_to_none)

    def optimizers_step(self):
        """Unscale, clip (every parameter of every optimizer together) and step, for imperative
        recipes: one :func:`fbrain.update.apply_gradients`, as the pure step's."""
        self.ensure_state()  # a recipe may have replaced an optimizer since the last step
        if self.optimizers_dict is not None:
            valid = self.freeze_optimizers(self.optimizers_dict)
        elif self.optimizer is not None:
            valid = {"optimizer": self.optimizer}
        else:
            return
        views = [opt for opt in valid.values() if isinstance(opt, OptimizerView)]
        self._imperative.optimizers_step(views, self.max_grad_norm)
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
        """Compile modules, create the optimizers and state, recover a checkpoint."""
        compile_modules(self.modules, self)
        self.init_optimizers()
        # New torch optimizers get a fresh optimizer state (SpeechBrain's fit does the same); an
        # init_optimizers that kept the previous ones (views already) keeps their state.
        self.ensure_state()
        if self.checkpointer is not None and hasattr(self.checkpointer, "recover_if_possible"):
            found = self.checkpointer.recover_if_possible()
            if found is not None:
                where = f"step {self.step} of epoch {int(self.state.counters.epoch)}" if self.step else \
                    f"the end of epoch {int(self.state.counters.epoch)}"
                logger.info("resumed from %s (%s, optimizer step %d)", getattr(found, "path", found), where,
                            self.optimizer_step)

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Recover the best checkpoint (``max_key`` / ``min_key``) into the Brain. Where checkpoints
        match but none can be loaded (damaged, or another model's), a CheckpointError naming each
        (SpeechBrain's recovery raises too): the untrained weights are never evaluated in their
        place. Where none has the key, nothing is recovered, after a warning (SpeechBrain's: an info line)."""
        if self.checkpointer is not None and hasattr(self.checkpointer, "recover_if_possible"):
            if isinstance(self.checkpointer, _checkpoint.Checkpointer):
                self.checkpointer.recover_if_possible(max_key=max_key, min_key=min_key, strict=True)
            else:  # SpeechBrain's Checkpointer raises by itself when a load fails
                self.checkpointer.recover_if_possible(max_key=max_key, min_key=min_key)

    # -- the default batch functions: the pure steps ----------------------------------------------

    def _run_train_step(self, batches: list):
        """One pure step on ``batches`` (micro-batches when more than one); returns (loss, outputs)."""
        self.ensure_state()  # a recipe may have replaced an optimizer since the last step
        active = None
        if type(self).freeze_optimizers is not Brain.freeze_optimizers and self.optimizers_dict:
            chosen = self.freeze_optimizers(self.optimizers_dict)
            active = frozenset(label for opt in chosen.values() for label in opt.labels)
        loss, outputs = self._steps.train(self._layout, active, batches)
        self.optimizer_step += 1
        self._train_loss.step_ran(len(batches))  # the step averaged it over the ranks
        return loss, outputs

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

    @torch.no_grad()
    def evaluate_batch(self, batch, stage):
        """The loss of one batch with the pure eval step (``eval_precision``)."""
        return self._steps.evaluate(batch, stage)

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
        """SpeechBrain's check (reads the loss on the host): count a non-finite loss, raise past patience.

        A loss that went through ``self.scaler.scale`` (SpeechBrain's default ``fit_batch`` checks the
        scaled loss) is counted by the step that skips it, not twice."""
        if not torch.isfinite(loss).all():
            counted_by_step = self._imperative.loss_pending()
            if not counted_by_step:
                self.nonfinite_count += 1
                self._nonfinite_checked += 1
            self._raise_if_patience_exhausted(pending=int(counted_by_step))

    def _raise_if_patience_exhausted(self, pending: int = 0) -> None:
        # Patience covers the steps skipped as non-finite and what check_loss_isfinite counted, as in
        # SpeechBrain; a recipe's own `self.nonfinite_count += 1` (the LibriMix recipe counts the
        # batches it skips on purpose) is reported, never enforced.
        skipped = 0 if self._state is None or self._nonfinite_base is None else \
            int(self._state.counters.nonfinite_count - self._nonfinite_base)
        counted = skipped + self._nonfinite_checked + pending
        if counted > self.nonfinite_patience:
            raise ValueError(
                f"Loss or gradients were not finite in {counted} steps this epoch, more than "
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
        with self._imperative.sync.paused() if use else contextlib.nullcontext():
            yield

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
        checked_epoch_counter(epoch_counter)
        if not isinstance(train_set, DataLoader):
            train_set = self.make_dataloader(train_set, stage=Stage.TRAIN, **dict(train_loader_kwargs))
        if valid_set is not None and not isinstance(valid_set, DataLoader):
            valid_set = self.make_dataloader(valid_set, stage=Stage.VALID, ckpt_prefix=None,
                                             **dict(valid_loader_kwargs))
        self.on_fit_start()
        self.ensure_state()
        if self.shard_group is not None and type(self).fit_batch is not Brain.fit_batch:
            raise ValueError(f"run option shard_optimizer_state: {type(self).__name__} overrides fit_batch; sharded "
                             "optimizer state works with the default fit_batch (the pure step) only")
        self._steps.plan_fit(self._planned_train_steps(epoch_counter, train_set))
        enable = (not self.noprogressbar) if progressbar is None else bool(progressbar)
        enable = enable and _distributed.is_main_process()  # one progress bar per run, not per rank
        self._profiler = None
        if self.profile_training:
            folder = getattr(getattr(self, "hparams", None), "output_folder", None) or os.getcwd()
            self._profiler = TrainingProfiler(self.profile_warmup, self.profile_steps, folder)
            self._profiler.start()
        try:
            with self._preemption.watching():
                for epoch in epoch_counter:
                    self._fit_train(train_set, epoch, enable)
                    self._fit_valid(valid_set, epoch, enable)
                    if self._preemption.settle():  # arrived after the epoch's last step
                        logger.warning("stopping after epoch %s; the next run resumes from the last checkpoint", epoch)
                        self._exit_for_signal()
                    if (self.debug and epoch == self.debug_epochs) or self._step_limit_reached():
                        break
        finally:
            if self._profiler is not None:
                self._profiler.finish()  # fit ended before the profiled steps: keep what was recorded
                self._profiler = None

    def _planned_train_steps(self, epoch_counter, train_set) -> int | None:
        """The train steps this fit will take, as far as known before it starts (compile_steps="auto")."""
        limits = []
        if self.optimizer_step_limit is not None:
            limits.append((self.optimizer_step_limit - self.optimizer_step) * self.grad_accumulation_factor)
        if self.debug:
            limits.append(self.debug_epochs * self.debug_batches)
        return planned_train_steps(epoch_counter, train_set, self.step, min(limits) if limits else None)

    def _step_limit_reached(self) -> bool:
        return self.optimizer_step_limit is not None and self.optimizer_step >= self.optimizer_step_limit

    def _start_epoch(self, epoch) -> None:
        c = self.state.counters
        epoch_value = epoch if isinstance(epoch, int) else 0
        self.state = self.state.replace(counters=c._replace(epoch=torch.full_like(c.epoch, epoch_value)))
        if not self.step:  # a fresh epoch, not one resumed in its middle
            self._nonfinite_base = self.state.counters.nonfinite_count.clone()
            self._nonfinite_extra = self._nonfinite_checked = 0
        if self.train_sampler is not None and hasattr(self.train_sampler, "set_epoch"):
            self.train_sampler.set_epoch(epoch)

    def _report(self, bar, stage_loss: TrainLoss | None, refresh: bool = False) -> None:
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
        shown = None if self._train_loss.custom else self._train_loss
        last_report = time.monotonic()
        train_set = skip_batches(train_set, self.step)  # batches already trained on before a restart
        # Under torchrun every rank must take the same number of steps: checked before the first one.
        _distributed.agree_on_count(len(train_set) if hasattr(train_set, "__len__") else None,
                                    f"train batches in epoch {epoch}")
        self._intra_epoch.restart()
        try:
            with tqdm(train_set, initial=self.step, dynamic_ncols=True, disable=not enable,
                      colour=self.tqdm_barcolor["train"]) as bar:
                given = 0
                for batch in bar:
                    given += 1
                    if self._step_limit_reached():
                        logger.info("Train iteration limit exceeded")
                        break
                    self.step += 1
                    self._train_loss.add(self.fit_batch(batch))
                    self._after_train_batch()
                    if self._profiler is not None and self._profiler.step():
                        raise SystemExit(0)  # SpeechBrain's behaviour: a profiling run ends here
                    if self._preemption.poll() and not self._pending:
                        self._stop_for_signal()
                    # The loss shows from the first step, then every 0.5 s, and at the epoch's last
                    # step (the bar closes when its iterator ends: a report after that is not drawn).
                    if time.monotonic() - last_report >= _REPORT_SECONDS or self.step in (1, bar.total):
                        self._report(bar, shown)
                        last_report = time.monotonic()
                    if self.debug and self.step == self.debug_batches:
                        break
                if not given and not self.step:  # (not an epoch whose batches all ran before a restart)
                    raise ValueError(
                        f"train_set: expected at least one batch in epoch {epoch}, got none (an empty dataset, or "
                        "drop_last with fewer examples than batch_size); check the data and train_loader_kwargs")
                if self._pending:
                    # Micro-batches left over at the end of an epoch are applied (SpeechBrain drops them).
                    loss, _ = self._run_train_step(self._pending)
                    self._pending = []
                    self._train_loss.add(loss)
                self._report(bar, shown, refresh=True)
        except BaseException:
            # An epoch cut short (an error, Ctrl-C): the next fit starts the epoch afresh, unless a
            # checkpoint it recovers says where to resume.
            self.step, self._pending = 0, []
            self._train_loss.reset(0.0)
            raise
        self.zero_grad(set_to_none=True)
        self.on_stage_end(Stage.TRAIN, self.avg_train_loss, epoch)
        self.avg_train_loss = 0.0
        self.step = 0

    def _eval_loop(self, dataset, stage, enable) -> float:
        mean, custom, avg, evaluated = RunningMean(), self._train_loss.custom, 0.0, 0
        # eval_with_ema: the averaged weights, found once per stage, sit in the modules for the
        # whole stage (an overridden evaluate_batch uses them) and go to the default eval step.
        self.eval_params = optim.ema_params(self.state.opt_state) if self.eval_with_ema else None
        self.eval_rng = self.state.rng  # the stage's random stream starts from the state's key
        weights = swapped(self.modules, self.eval_params, strict=False) if self.eval_params is not None \
            else contextlib.nullcontext()
        with torch.no_grad(), weights:
            for batch in tqdm(dataset, dynamic_ncols=True, disable=not enable,
                              colour=self.tqdm_barcolor["valid" if stage == Stage.VALID else "test"]):
                self.step += 1
                evaluated += 1
                loss = self.evaluate_batch(batch, stage=stage)
                if custom:
                    avg = self.update_average(loss, avg)
                else:
                    mean.add(loss)
                if self.debug and self.step == self.debug_batches:
                    break
        self.step, self.eval_params, self.eval_rng = 0, None, None
        if not evaluated:
            # SpeechBrain reports 0.0 here, which a min_key ranking would call the best checkpoint.
            name = "valid_set" if stage == Stage.VALID else "test_set"
            logger.warning("%s: expected at least one batch, got none; the %s stage's loss is nan", name, stage.name)
            return float("nan")
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
        # The state a checkpoint is recovered into, made as fit makes it (modules and the optimizers
        # init_optimizers gives): recovery checks the checkpoint against it exactly as fit's does
        # (parameter names, shapes, dtypes, the optimizer state), and changes nothing on a mismatch.
        self.ensure_state()
        self.on_evaluate_start(max_key=max_key, min_key=min_key)
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
