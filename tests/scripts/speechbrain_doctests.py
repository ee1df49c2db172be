"""SpeechBrain's own doctests of the Brain's companions, run against fbrain's objects.

Each doctest of the modules below runs with the names it exercises (Brain, Stage, Checkpointer,
EpochCounter, run_on_main, MetricStats, PaddedBatch, average_checkpoints ...) bound to fbrain's
objects; the schedulers' doctests get, for every ``torch.optim.<Optimizer>(params, ...)`` they make,
the optimizer view of an fbrain Brain over those parameters (``brain.optimizer``), so SpeechBrain's
schedulers drive fbrain's TrainState. Prints one JSON object: doctest name -> "ok" or the failure.

Usage: python tests/scripts/speechbrain_doctests.py OUTPUT_FOLDER
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import json
import pathlib
import sys

import torch

import fbrain
from fbrain import checkpoint, distributed

MODULES = {
    "speechbrain.utils.checkpoints": {
        "Checkpointer": checkpoint.Checkpointer, "average_checkpoints": checkpoint.average_checkpoints,
        "average_state_dicts": checkpoint.average_state_dicts, "mark_as_saver": checkpoint.mark_as_saver,
        "mark_as_loader": checkpoint.mark_as_loader},
    "speechbrain.utils.epoch_loop": {"EpochCounter": fbrain.EpochCounter},
    "speechbrain.utils.distributed": {"run_on_main": distributed.run_on_main, "ddp_barrier": distributed.ddp_barrier,
                                      "if_main_process": distributed.if_main_process,
                                      "main_process_only": distributed.main_process_only},
    "speechbrain.core": {"Brain": fbrain.Brain, "Stage": fbrain.Stage},
    "speechbrain.nnet.schedulers": {},
    "speechbrain.utils.metric_stats": {"MetricStats": fbrain.MetricStats},
    "speechbrain.dataio.batch": {"PaddedBatch": fbrain.PaddedBatch},
}
# Doctests of SpeechBrain objects fbrain does not replace (they would test SpeechBrain, not fbrain).
NOT_FBRAINS = {"ClassificationStats", "EER", "ErrorRateStats", "MultiMetricStats", "minDCF", "BatchsizeGuesser",
               "EpochCounterWithStopper", "get_default_hook", "register_checkpoint_hooks", "torch_recovery",
               "run_once_per_node"}


class _Holder(torch.nn.Module):
    """A module owning given parameters, so a Brain can train them."""

    def __init__(self, params):
        super().__init__()
        for i, p in enumerate(params):
            self.register_parameter(f"p{i}", p)

    def forward(self, x):
        return x


@contextlib.contextmanager
def optimizers_are_brain_views():
    """``torch.optim.X(params, ...)`` gives the optimizer view of an fbrain Brain over ``params``."""
    originals = {name: getattr(torch.optim, name) for name in ("SGD", "Adam", "AdamW", "RMSprop")}

    def view_factory(cls):
        def make(params, *args, **kwargs):
            brain = fbrain.Brain({"holder": _Holder(list(params))}, lambda p: cls(p, *args, **kwargs),
                                 run_opts={"noprogressbar": True})
            brain.init_optimizers()
            return brain.optimizer
        return make

    try:
        for name, cls in originals.items():
            setattr(torch.optim, name, view_factory(cls))
        yield
    finally:
        for name, cls in originals.items():
            setattr(torch.optim, name, cls)


def main(folder: pathlib.Path) -> dict[str, str]:
    results = {}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for module_name, replacements in MODULES.items():
        module = importlib.import_module(module_name)
        for test in doctest.DocTestFinder().find(module):
            short = test.name.split(".")[-1]
            if not test.examples or short in NOT_FBRAINS:
                continue
            tmp = folder / test.name
            tmp.mkdir(parents=True, exist_ok=True)
            test.globs = {**test.globs, **replacements, "getfixture": lambda name, tmp=tmp: tmp}
            out = io.StringIO()
            schedulers = module_name.endswith("schedulers")
            with optimizers_are_brain_views() if schedulers else contextlib.nullcontext():
                outcome = runner.run(test, out=out.write, clear_globs=True)
            results[test.name] = "ok" if outcome.failed == 0 else out.getvalue()[-1500:]
    return results


if __name__ == "__main__":
    print(json.dumps(main(pathlib.Path(sys.argv[1]))))
