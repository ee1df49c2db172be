"""Continue a SpeechBrain run on fbrain: read a SpeechBrain checkpoint folder into a TrainState.

A SpeechBrain checkpoint (``CKPT+<time>/`` with ``CKPT.yaml``) holds one file per recoverable:

- modules: ``torch.save`` of a ``state_dict`` (``model.ckpt`` ...) -> ``params`` and ``buffers``;
- the torch optimizer: ``torch.save`` of ``optimizer.state_dict()`` (``optimizer.ckpt``) -> ``opt_state``
  (Adam/AdamW ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``/``step``, SGD ``momentum_buffer``,
  RMSprop ``square_avg``/``grad_avg``/``momentum_buffer``/``step``, and each group's hyperparameters);
- the GradScaler (``scaler.ckpt``) -> ``scaler``;
- the epoch counter (``counter.ckpt``, the epoch number as text) -> ``counters.epoch``;
- the Brain (``brain.ckpt``, YAML: ``step``, ``avg_train_loss``, ``optimizer_step``) -> ``counters``.

Torch files are read with ``torch.load(weights_only=True)`` and YAML with a safe loader, so reading
a checkpoint never runs code. Every entry is checked against the target: a missing or unexpected
parameter, a shape or dtype mismatch, an optimizer of another kind raises a
:class:`~fbrain.checkpoint.CheckpointError` naming the file and the parameter.

Example (``brain`` is an :class:`fbrain.Brain` built like the SpeechBrain one)::

    from fbrain.checkpoint import import_speechbrain
    import_speechbrain("results/save", brain)   # the newest CKPT+ folder; brain.state is now it
    brain.fit(epoch_counter, train_set)          # continues from SpeechBrain's last checkpoint
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

from fbrain.checkpoint import torch_files
from fbrain.checkpoint.checkpointer import META_FILE
from fbrain.checkpoint.checkpointer import PREFIX as CKPT_PREFIX
from fbrain.checkpoint.serialization import CheckpointError
from fbrain.loss_scale import LossScaleState
from fbrain.optim.hyperparams import get_hyperparams, set_hyperparams
from fbrain.state import Counters, TrainState

log = logging.getLogger(__name__)

PREFIX = CKPT_PREFIX + "+"
SUFFIX = ".ckpt"
BRAIN_FILE = "brain"
COUNTER_NAMES = ("counter", "epoch_counter")

# torch per-parameter state key -> fbrain optimizer-state field, for each optimizer state type.
_PER_PARAM = {
    "AdamState": {"exp_avg": "mu", "exp_avg_sq": "nu", "max_exp_avg_sq": "nu_max"},
    "SGDState": {"momentum_buffer": "momentum_buffer"},
    "RMSpropState": {"square_avg": "square_avg", "grad_avg": "grad_avg", "momentum_buffer": "momentum_buffer"},
}
SUPPORTED = "Adam, AdamW, SGD, RMSprop, Adagrad, Adadelta, Adamax, NAdam, RAdam"


def _torch_slots(sub) -> dict[str, dict[str, torch.Tensor]] | None:
    """An fbrain optimizer state's per-parameter tensors under torch.optim's state keys
    (``{"exp_avg": {param name: tensor}, ...}``, new dicts), or None for a state torch has no form of.
    The adaptive twins (:class:`~fbrain.optim.AdaptiveState`) keep their buffers under torch's keys."""
    kind = type(sub).__name__
    if kind == "AdaptiveState":
        return {key: dict(tensors) for key, tensors in sub.slots.items()}
    mapping = _PER_PARAM.get(kind)
    return None if mapping is None else {key: dict(getattr(sub, field)) for key, field in mapping.items()}


def _with_torch_slots(sub, slots: dict[str, dict[str, torch.Tensor]]):
    """``sub`` with the per-parameter tensors ``slots`` (as :func:`_torch_slots` names them)."""
    if type(sub).__name__ == "AdaptiveState":
        return sub._replace(slots=slots)
    return sub._replace(**{field: slots[key] for key, field in _PER_PARAM[type(sub).__name__].items()})


_PAIRS = {"betas": ("beta1", "beta2")}


# -- finding and reading the files -----------------------------------------------------------------

def find_speechbrain_checkpoint(ckpt_dir: str | os.PathLike) -> str:
    """``ckpt_dir`` itself if it is a ``CKPT+`` folder, else its newest ``CKPT+`` folder."""
    ckpt_dir = os.fspath(ckpt_dir)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: no such checkpoint folder")
    if os.path.basename(os.path.normpath(ckpt_dir)).startswith(PREFIX):
        return ckpt_dir
    found = []
    for entry in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, entry)
        if entry.startswith(PREFIX) and ".incomplete-" not in entry and os.path.isdir(path):
            try:
                unixtime = float(_read_yaml(os.path.join(path, META_FILE)).get("unixtime", 0.0))
            except (OSError, CheckpointError, TypeError, ValueError):
                unixtime = 0.0
            found.append((unixtime, entry, path))
    if not found:
        raise FileNotFoundError(f"{ckpt_dir}: no SpeechBrain checkpoint in it (no {PREFIX}... folder)")
    return max(found)[2]


def parse_flat_yaml(text: str, name: str = "yaml") -> dict:
    """The flat ``key: scalar`` mappings SpeechBrain writes (brain.ckpt, CKPT.yaml), without PyYAML."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#") or line.strip() == "---":
            continue
        if line[0].isspace() or ":" not in line:
            raise CheckpointError(f"{name}: not a flat YAML mapping (line {line!r}); install PyYAML to read it")
        key, _, value = line.partition(":")
        out[key.strip().strip("'\"")] = _yaml_scalar(value.strip())
    return out


def _yaml_scalar(value: str):
    low = value.lower()
    if low in ("", "null", "~"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if low in (".nan",):
        return math.nan
    if low in (".inf", "+.inf", "-.inf"):
        return -math.inf if low.startswith("-") else math.inf
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value.strip("'\"")


def _read_yaml(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        import yaml
    except ImportError:
        data = parse_flat_yaml(text, path)
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise CheckpointError(f"{path}: not readable YAML ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a YAML mapping, found {type(data).__name__}")
    return data


def _is_torch_file(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def _kind(content) -> str:
    if isinstance(content, dict):
        if "state" in content and "param_groups" in content:
            return "optimizer"
        if "scale" in content and "_growth_tracker" in content:
            return "scaler"
        if content and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items()):
            return "module"
    return "other"


class _Files:
    """The files of one SpeechBrain checkpoint, sorted by what they hold."""

    def __init__(self, folder: str):
        self.folder = folder
        meta_path = os.path.join(folder, META_FILE)
        self.meta = _read_yaml(meta_path) if os.path.exists(meta_path) else {}
        self.end_of_epoch = bool(self.meta.get("end-of-epoch", True))
        self.modules: dict[str, dict] = {}
        self.optimizers: dict[str, dict] = {}
        self.scalers: dict[str, dict] = {}
        self.texts: dict[str, str] = {}
        self.brain: dict | None = None
        self.ignored: list[str] = []
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if not entry.endswith(SUFFIX) or not os.path.isfile(path):
                continue
            stem = entry[:-len(SUFFIX)]
            if _is_torch_file(path):
                content = torch_files.load(path)
                kind = _kind(content)
                if kind == "other":
                    self.ignored.append(entry)
                else:
                    {"module": self.modules, "optimizer": self.optimizers, "scaler": self.scalers}[kind][stem] = content
            elif stem == BRAIN_FILE:
                self.brain = _read_yaml(path)
            else:
                with open(path, encoding="utf-8", errors="replace") as f:
                    self.texts[stem] = f.read().strip()

    def path(self, stem: str) -> str:
        return os.path.join(self.folder, stem + SUFFIX)

    def epoch(self, name: str | None) -> int | None:
        """The epoch counter's value, from the file ``name`` or the one that looks like a counter."""
        if name is None:
            candidates = [s for s in COUNTER_NAMES if s in self.texts] or \
                [s for s, t in self.texts.items() if not s.startswith("dataloader") and t.lstrip("-").isdigit()]
            if not candidates:
                return None
            if len(candidates) > 1:
                raise CheckpointError(f"{self.folder}: several files could be the epoch counter {candidates}; "
                                      "name it with epoch_counter=...")
            name = candidates[0]
        if name not in self.texts:
            raise CheckpointError(f"{self.path(name)}: no such epoch counter file (text files: {sorted(self.texts)})")
        try:
            return int(self.texts[name])
        except ValueError:
            raise CheckpointError(f"{self.path(name)}: an epoch number expected, "
                                  f"file has {self.texts[name][:40]!r}") from None


# -- modules -> params and buffers -----------------------------------------------------------------

def _copy_into(target: dict, name: str, value: torch.Tensor, where: str) -> None:
    old = target[name]
    if value.shape != old.shape:
        raise CheckpointError(f"{where}: shape {tuple(old.shape)} expected, file has {tuple(value.shape)}")
    if value.dtype != old.dtype:
        raise CheckpointError(f"{where}: dtype {old.dtype} expected, file has {value.dtype}")
    target[name] = value.to(old.device).clone()


def _import_modules(files: _Files, params: dict, buffers: dict, modules: dict | None, allow_partial: bool):
    params, buffers = dict(params), dict(buffers)
    known = list(params) + list(buffers)
    seen: set[str] = set()
    for stem, state_dict in files.modules.items():
        path = files.path(stem)
        if modules is not None and stem in modules:
            prefix = modules[stem]
        elif any(n.startswith(stem + ".") for n in known):
            prefix = stem
        elif all(k in params or k in buffers for k in state_dict):
            prefix = ""
        else:
            raise CheckpointError(
                f"{path}: a module state_dict that fits no module here (no parameter starts with {stem + '.'!r}, "
                f"and its keys are not parameter names); map it with modules={{{stem!r}: '<prefix>'}}")
        if prefix is None:
            continue  # modules={stem: None}: leave that file out
        for key, value in state_dict.items():
            name = f"{prefix}.{key}" if prefix else key
            where = f"{path}: {name!r}"
            if name in params:
                _copy_into(params, name, value, f"{path}: params[{name!r}]")
            elif name in buffers:
                _copy_into(buffers, name, value, f"{path}: buffers[{name!r}]")
            elif not allow_partial:
                raise CheckpointError(f"{where}: this parameter is not in the target (unexpected key)")
            seen.add(name)
    missing = [n for n in known if n not in seen]
    if missing and not allow_partial:
        raise CheckpointError(f"{files.folder}: no module file holds {missing} (pass allow_partial=True to keep "
                              "their current values)")
    return params, buffers


# -- the torch optimizer -> opt_state --------------------------------------------------------------

def _group_names(torch_state: dict, names_in_order: list[str], path: str) -> list[list[str]]:
    """The parameter names of each torch param group (torch numbers parameters across the groups)."""
    groups = []
    for i, group in enumerate(torch_state["param_groups"]):
        idx = list(group["params"])
        if any(not 0 <= j < len(names_in_order) for j in idx):
            raise CheckpointError(f"{path}: param_groups[{i}] refers to parameter #{max(idx)}, but the target "
                                  f"optimizer has {len(names_in_order)} parameters")
        groups.append([names_in_order[j] for j in idx])
    total = sum(len(g) for g in groups)
    if total != len(names_in_order):
        raise CheckpointError(f"{path}: the optimizer has {total} parameters, the target's has {len(names_in_order)}")
    return groups


def _fill_sub_state(sub, torch_state: dict, group: dict, names: list[str], index_of: dict, path: str,
                    label: str, optimizer_step: int | None):
    kind = type(sub).__name__
    slots = _torch_slots(sub)
    if slots is None:
        raise CheckpointError(f"{path}: cannot import into an fbrain {kind} (supported: {SUPPORTED})")
    steps = set()
    missing_state = []
    for name in names:
        entry = torch_state["state"].get(index_of[name])
        if entry is None:
            missing_state.append(name)
            continue
        for key, value in entry.items():
            where = f"{path}: state of {name!r} ({key})"
            if key == "step":
                steps.add(int(value))
                continue
            if key not in slots:
                raise CheckpointError(f"{where}: fbrain's {kind} has nothing for {key!r}; was this checkpoint made "
                                      "by another optimizer class?")
            if value is None:  # SGD without momentum keeps momentum_buffer None
                continue
            if name not in slots[key]:
                raise CheckpointError(f"{where}: the fbrain optimizer keeps no {key!r} for it (built with other "
                                      "options: amsgrad / centered / momentum?)")
            _copy_into(slots[key], name, value, where)
        for key, tensors in slots.items():
            if name in tensors and key not in entry and key != "momentum_buffer":
                raise CheckpointError(f"{path}: state of {name!r}: {key!r} missing, the fbrain {kind} needs it")
    if missing_state and len(missing_state) < len(names):
        log.warning("%s: no optimizer state for %s (never updated in SpeechBrain); starting them from zero",
                    path, missing_state)
    if len(steps) > 1:
        raise CheckpointError(f"{path}: param group {label!r} has parameters at different steps {sorted(steps)}; "
                              "fbrain keeps one step count per group")
    if steps:
        count = steps.pop()
    elif kind == "SGDState" and len(missing_state) < len(names):
        # torch's SGD keeps no step count; any count > 0 says "the momentum buffers exist".
        count = max(int(optimizer_step or 1), 1)
    else:
        count = 0
    new = _with_torch_slots(sub, slots)._replace(count=torch.full_like(sub.count, count))
    # The group's hyperparameters as SpeechBrain last set them (schedulers change the lr).
    known = get_hyperparams(new)
    values = {}
    for key, value in group.items():
        if key in _PAIRS:
            values.update({k: float(v) for k, v in zip(_PAIRS[key], value) if k in known})
        elif key in known and isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool):
            values[key] = float(value)
    return set_hyperparams(new, **values) if values else new


def _substate_for(opt_state, names: list[str], path: str):
    """(label, state) of the one optimizer state in ``opt_state`` that holds ``names``."""
    if hasattr(opt_state, "_fields"):
        return None, opt_state
    if isinstance(opt_state, dict):
        for label, sub in opt_state.items():
            if hasattr(sub, "_fields"):
                slots = _torch_slots(sub) or {}
                if any(names[0] in d for d in slots.values()):
                    return label, sub
    raise CheckpointError(f"{path}: found no optimizer state here for parameter {names[0]!r}; import into a Brain, "
                          "or give a TrainState built with the same optimizer")


def _import_optimizer(opt_state, torch_state: dict, names_in_order: list[str], path: str,
                      optimizer_step: int | None, labels: list[str] | None = None):
    groups = _group_names(torch_state, names_in_order, path)
    index_of = {n: i for i, n in enumerate(names_in_order)}
    for i, (group, names) in enumerate(zip(torch_state["param_groups"], groups)):
        if not names:
            continue
        if labels is not None:  # a Brain's optimizer: its layout's labels, one per param group
            label, sub = labels[i], opt_state[labels[i]]
        else:
            label, sub = _substate_for(opt_state, names, path)
        new = _fill_sub_state(sub, torch_state, group, names, index_of, path, str(label), optimizer_step)
        opt_state = new if label is None else {**opt_state, label: new}
    return opt_state


def export_optimizer(opt_state, labels: list[str], names_per_group: list[list[str]], param_groups: list[dict]) -> dict:
    """The state of one Brain optimizer (its layout ``labels``) as ``torch.optim.Optimizer.state_dict()``
    shapes it: parameters numbered across groups in order, per-parameter tensors under torch's keys
    (copies), ``step`` as a float tensor, and each group's hyperparameters. The inverse of
    :func:`_import_optimizer` (what ``OptimizerView.load_state_dict`` calls)."""
    state, groups, index = {}, [], 0
    for label, names, group in zip(labels, names_per_group, param_groups):
        sub = opt_state[label]
        kind = type(sub).__name__
        slots = _torch_slots(sub)
        if slots is None:
            raise TypeError(f"optimizer state_dict: an fbrain {kind} has no torch.optim form (supported: {SUPPORTED}); "
                            "checkpoint brain.state (the TrainState) instead")
        ids = list(range(index, index + len(names)))
        index += len(names)
        count = int(sub.count)
        # torch keeps no state for a parameter it never stepped, except Adagrad (its sums start at
        # initial_accumulator_value) and SGD (a momentum buffer of None).
        kept_unstepped = kind == "AdaptiveState" and "sum" in slots
        for i, name in zip(ids, names):
            entry = {key: tensors[name].detach().clone() for key, tensors in slots.items() if name in tensors}
            if (count == 0 and not kept_unstepped) or not entry and kind != "SGDState":
                continue
            if kind != "SGDState":
                entry["step"] = torch.tensor(float(count))
            state[i] = entry
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}


def _import_scaler(scaler: LossScaleState, content: dict) -> LossScaleState:
    return LossScaleState(torch.full_like(scaler.scale, float(content["scale"])),
                          torch.full_like(scaler.growth_tracker, int(content["_growth_tracker"])))


# -- the entry point -------------------------------------------------------------------------------

def import_speechbrain(ckpt_dir: str | os.PathLike, brain_or_state, *, modules: dict | None = None,
                       optimizers: dict | None = None, epoch_counter: str | None = None,
                       param_names: list[str] | None = None, allow_partial: bool = False,
                       save: bool = True) -> TrainState:
    """Read a SpeechBrain checkpoint into a TrainState; install it when given a Brain.

    Args:
        ckpt_dir: a ``CKPT+...`` folder, or a checkpoints folder (its newest ``CKPT+`` folder is used).
        brain_or_state: an :class:`fbrain.Brain` (built with the same modules and ``opt_class`` as the
            SpeechBrain one) or a :class:`~fbrain.TrainState` to fill (its structure is the template).
        modules: ``{file stem: parameter-name prefix}`` where the default (a file ``model.ckpt`` holds the
            parameters named ``model.*``, or the full names) does not fit; a prefix of None skips the file.
        optimizers: ``{file stem: key in brain.optimizers_dict}`` where the default (``optimizer.ckpt``
            for the single ``opt_class`` optimizer, else equal names) does not fit.
        epoch_counter: the stem of the epoch counter's file (default ``counter`` or the only number file).
        param_names: for a TrainState, the parameter names in the order the torch optimizer got them
            (default: the order of ``state.params``, which is ``module.parameters()``'s).
        allow_partial: keep parameters no module file holds (otherwise an error).
        save: with a Brain that has a checkpointer, save the imported state as an fbrain checkpoint there,
            so ``fit()`` (which rebuilds its optimizers and recovers the newest checkpoint) continues from it.

    Returns:
        The imported TrainState (with a Brain: also ``brain.state``; ``brain.optimizer_step``, the epoch
        counter in its checkpointer and, for an intra-epoch checkpoint, the position and running loss too).
    """
    files = _Files(find_speechbrain_checkpoint(ckpt_dir))
    if files.ignored:
        log.info("%s: not imported (not model, optimizer or scaler state): %s", files.folder, files.ignored)
    brain_record = files.brain or {}
    optimizer_step = brain_record.get("optimizer_step", brain_record.get("step"))
    epoch = files.epoch(epoch_counter)

    if isinstance(brain_or_state, TrainState):
        state = brain_or_state
        brain = None
    elif hasattr(brain_or_state, "ensure_state") and hasattr(brain_or_state, "modules"):
        brain = brain_or_state
        state = brain.ensure_state()  # as fit() does: the optimizers from opt_class, then views over a state
    else:
        raise TypeError(f"brain_or_state: expected an fbrain.Brain or fbrain.TrainState, "
                        f"got {type(brain_or_state).__name__}")

    params, buffers = _import_modules(files, state.params, state.buffers, modules, allow_partial)
    opt_state = _import_optimizers(files, brain, state, optimizers, param_names, optimizer_step)
    scaler = state.scaler
    if files.scalers:
        (stem, content), *rest = files.scalers.items()
        if rest:
            raise CheckpointError(f"{files.folder}: several GradScaler files {sorted(files.scalers)}")
        scaler = _import_scaler(scaler, content)
    c = state.counters
    steps = optimizer_step if optimizer_step is not None else int(c.optimizer_step)
    counters = Counters(step=torch.full_like(c.step, int(steps)),
                        optimizer_step=torch.full_like(c.optimizer_step, int(steps)),
                        epoch=torch.full_like(c.epoch, epoch if epoch is not None else int(c.epoch)),
                        nonfinite_count=c.nonfinite_count, nonfinite_streak=c.nonfinite_streak)
    new_state = state.replace(params=params, buffers=buffers, opt_state=opt_state, scaler=scaler,
                              counters=counters)
    if brain is not None:
        _install(brain, new_state, files, brain_record, epoch, epoch_counter, save)
    return new_state


def _import_optimizers(files: _Files, brain, state: TrainState, optimizers, param_names, optimizer_step):
    if not files.optimizers:
        return state.opt_state
    opt_state = state.opt_state
    if brain is None:
        if len(files.optimizers) > 1:
            raise CheckpointError(f"{files.folder}: several optimizer files {sorted(files.optimizers)}; "
                                  "import into a Brain to map each onto its optimizer")
        (stem, torch_state), = files.optimizers.items()
        names = list(param_names) if param_names is not None else list(state.params)
        return _import_optimizer(opt_state, torch_state, names, files.path(stem), optimizer_step)

    views = dict(brain.optimizers_dict or {}) or ({"optimizer": brain.optimizer} if brain.optimizer is not None else {})
    name_of = {id(p): n for n, p in brain.modules.named_parameters()}
    for stem, torch_state in files.optimizers.items():
        path = files.path(stem)
        key = (optimizers or {}).get(stem)
        if key is None:
            if stem in views:
                key = stem
            elif len(views) == 1 and len(files.optimizers) == 1:
                key = next(iter(views))
            else:
                raise CheckpointError(f"{path}: which of the Brain's optimizers {sorted(views)} is it? "
                                      f"map it with optimizers={{{stem!r}: '<key>'}}")
        view = views.get(key)
        if view is None or not hasattr(view, "labels"):
            raise CheckpointError(f"{path}: the Brain has no optimizer {key!r} (it has {sorted(views)})")
        if len(view.param_groups) != len(torch_state["param_groups"]):
            raise CheckpointError(f"{path}: {len(torch_state['param_groups'])} param groups, the Brain's optimizer "
                                  f"{key!r} has {len(view.param_groups)}")
        names = [name_of[id(p)] for g in view.param_groups for p in g["params"]]
        # Parameters that do not require gradients stay frozen in fbrain's layout.
        active = {n for n, p in view.named if p.requires_grad}
        # Parameters that do not require gradients are in the torch optimizer but not in fbrain's state.
        torch_state = _without(torch_state, names, active)
        opt_state = _import_optimizer(opt_state, torch_state, [n for n in names if n in active], path,
                                      optimizer_step, labels=view.labels)
    return opt_state


def _without(torch_state: dict, names: list[str], active: set) -> dict:
    """``torch_state`` renumbered to the ``active`` parameters only."""
    if len(active) == len(names):
        return torch_state
    new_index, n = {}, 0
    for i, name in enumerate(names):
        if name in active:
            new_index[i] = n
            n += 1
    groups = [{**g, "params": [new_index[i] for i in g["params"] if i in new_index]} for g in torch_state["param_groups"]]
    state = {new_index[i]: s for i, s in torch_state["state"].items() if i in new_index}
    return {"state": state, "param_groups": groups}


def _install(brain, state: TrainState, files: _Files, record: dict, epoch, epoch_counter, save: bool) -> None:
    brain.state = state
    brain.optimizer_step = int(record.get("optimizer_step", record.get("step", brain.optimizer_step)))
    checkpointer = getattr(brain, "checkpointer", None)
    recoverables = getattr(checkpointer, "recoverables", {}) or {}
    counter = None
    if epoch is not None:
        wanted = [epoch_counter] if epoch_counter else list(COUNTER_NAMES)
        counter = next((recoverables[n] for n in wanted if n in recoverables and hasattr(recoverables[n], "current")),
                       None)
        if counter is not None:
            counter.current = epoch
    intra = not files.end_of_epoch
    if intra:
        # As SpeechBrain's Brain._recover: the position in the epoch and the running loss.
        brain.step = int(record.get("step", 0))
        brain.avg_train_loss = float(record.get("avg_train_loss", 0.0))
    if save and checkpointer is not None and hasattr(checkpointer, "save_checkpoint"):
        checkpointer.save_checkpoint(meta={"imported_from": os.path.abspath(files.folder)},
                                     end_of_epoch=files.end_of_epoch)
    if intra:
        # What recovering that checkpoint gives: the epoch runs again from brain.step, skipping what
        # was done.
        if counter is not None:
            counter.current = epoch - 1
