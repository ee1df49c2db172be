"""This checkout's fbrain against another revision's, side by side in one process.

    git worktree add /tmp/before <revision>
    python -m benchmarks.versions --before /tmp/before [--repeats 15] [--steps 20] [--brain-steps 50]
    python -m benchmarks.versions --before /tmp/before --checkpoints [--repeats 15]

The other revision's ``fbrain`` package is copied into a temporary folder as ``fbrain_before`` (its
own imports renamed), so both load in this process and are timed interleaved (A B A B ...) on the
same machine state: the pure step (eager, and with a donated state) and the Brain's ``fit`` per
batch, on the tutorial's ``Linear(10, 10)``, an MLP and a small conv model, all with Adam. Medians
in microseconds per step, and after/before ratios; the final losses show both computed the same.
With ``--checkpoints``: ``checkpoint.save`` (atomic, fsynced) and ``checkpoint.load`` (verified, into
a template) of the enhancement masker's TrainState (2.04 M parameters with Adam moments) and of a
synthetic 20 M-parameter one, the two revisions interleaved on the same files' folder (page cache
warm for both), in milliseconds.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import platform
import re
import shutil
import sys
import tempfile
import time

import torch

from benchmarks.step_overhead import SmallConv, mlp
from benchmarks.timing import interleaved, summary

WORKLOADS = {
    "tiny-linear": (lambda: torch.nn.Linear(10, 10), lambda g: torch.rand(10, 10, generator=g),
                    lambda g, x: torch.rand(10, 10, generator=g), torch.nn.functional.mse_loss),
    "mlp": (mlp, lambda g: torch.randn(64, 256, generator=g), lambda g, x: torch.randint(0, 10, (64,), generator=g),
            torch.nn.functional.cross_entropy),
    "conv": (SmallConv, lambda g: torch.randn(8, 4000, generator=g), lambda g, x: torch.randint(0, 10, (8,), generator=g),
             torch.nn.functional.cross_entropy),
}
# The package name where code uses it (imports, dotted names), not a string such as the file format's.
_RENAME = re.compile(r"\bfbrain\b(?=\.|\s+import\b|\s+as\b|\s*$)", re.MULTILINE)


def load_before(checkout: str) -> object:
    """``<checkout>/fbrain`` imported as ``fbrain_before``."""
    source = pathlib.Path(checkout) / "fbrain"
    if not (source / "__init__.py").is_file():
        raise SystemExit(f"--before {checkout}: expected a checkout of fbrain (no fbrain/__init__.py in it)")
    target = pathlib.Path(tempfile.mkdtemp(prefix="fbrain-before-")) / "fbrain_before"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in target.rglob("*.py"):
        path.write_text(_RENAME.sub("fbrain_before", path.read_text()))
    sys.path.insert(0, str(target.parent))
    return importlib.import_module("fbrain_before")


def systems_for(module, label: str, workload: str, brain_steps: int, losses: dict) -> dict:
    """``{name: step function}`` for one fbrain package; each records its last loss in ``losses``."""
    build, make_x, make_y, loss_of = WORKLOADS[workload]
    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(0)
    x = make_x(g)
    y = make_y(g, x)
    opt = module.optim.adam(1e-3)
    systems = {}

    def loss_fn(params, buffers, batch, rng):
        out, _ = module.apply_module(model, params, buffers, batch[0], check=False)
        return loss_of(out, batch[1])

    for kind, donate in (("step", False), ("step-donated", True)):
        step = module.make_train_step(loss_fn, opt, donate_state=donate)
        box = [module.TrainState.create(model, opt)]
        name = f"{kind} {label}"

        def run(step=step, box=box, name=name):
            box[0], metrics = step(box[0], (x, y))
            losses[name] = metrics["loss"]
        systems[name] = run

    class Timed(module.Brain):
        def compute_forward(self, batch, stage):
            return self.modules.model(batch[0])

        def compute_objectives(self, predictions, batch, stage):
            return loss_of(predictions, batch[1])

        def init_optimizers(self):
            if self.optimizer is None:  # one optimizer for all fits: Adam's moments carry over
                super().init_optimizers()

        def on_fit_batch_end(self, batch, outputs, loss, should_step):
            losses[f"brain {label}"] = loss

    torch.manual_seed(0)
    brain = Timed({"model": build()}, opt_class=lambda p: torch.optim.Adam(p, lr=1e-3),
                  run_opts={"noprogressbar": True, "max_grad_norm": 0.0})
    loader = torch.utils.data.DataLoader([(x, y)] * brain_steps, batch_size=None)
    epoch = [0]

    def fit(brain=brain, loader=loader, epoch=epoch):
        brain.fit(range(epoch[0], epoch[0] + 1), loader, progressbar=False)
        epoch[0] += 1
    systems[f"brain {label}"] = fit
    return systems


def checkpoint_systems(module, label: str, folder: str) -> dict:
    """``{"<op> <state> <label>": fn}``: save and load of two TrainStates with one fbrain package."""
    from fbrain.models import SpectralMasker
    torch.manual_seed(0)
    states = {"masker": module.TrainState.create(SpectralMasker(), module.optim.adam(1e-3)),
              "20M": module.TrainState.create(torch.nn.Linear(4000, 5000), module.optim.adam(1e-3))}
    systems = {}
    for name, state in states.items():
        path = os.path.join(folder, f"{name}-{label}.ckpt")
        module.checkpoint.save(path, state)
        systems[f"save-{name} {label}"] = lambda m=module, p=path, s=state: m.checkpoint.save(p, s)
        systems[f"load-{name} {label}"] = lambda m=module, p=path, s=state: m.checkpoint.load(p, template=s)
    return systems


def compare_checkpoints(before, after, repeats: int) -> None:
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as folder:
        systems = {**checkpoint_systems(before, "before", folder), **checkpoint_systems(after, "after", folder)}
        samples = interleaved(systems, steps=1, repeats=repeats, warmup=1)
    print("\n## checkpoints\n\n| operation | ms median | min | max | after / before |\n|---|---:|---:|---:|---:|")
    for name in sorted(systems, key=lambda n: (n.split()[0], n.split()[1] != "before")):
        st = summary(samples[name])
        op, label = name.split()
        ratio = f"{st['median'] / summary(samples[f'{op} before'])['median']:.2f}" if label == "after" else ""
        print(f"| {name} | {st['median'] / 1e3:.1f} | {st['min'] / 1e3:.1f} | {st['max'] / 1e3:.1f} | {ratio} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a checkout of the revision to compare with")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="calls of a pure step per sample")
    parser.add_argument("--brain-steps", type=int, default=50, help="batches per Brain.fit sample")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--checkpoints", action="store_true", help="time checkpoint save and load instead")
    args = parser.parse_args(argv)
    import fbrain as after

    before = load_before(args.before)
    print(f"# fbrain {os.getcwd()} (after) against {args.before} (before) — {platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    if args.checkpoints:
        return compare_checkpoints(before, after, args.repeats)
    for workload in args.workloads:
        systems, losses = {}, {}
        for module, label in ((before, "before"), (after, "after")):
            systems.update(systems_for(module, label, workload, args.brain_steps, losses))
        # A Brain sample is one fit of brain_steps batches: time per batch is what it reports.
        per_call = {name: (1 if name.startswith("brain") else args.steps) for name in systems}
        steps = {k: v for k, v in systems.items() if per_call[k] > 1}
        fits = {k: v for k, v in systems.items() if per_call[k] == 1}
        order = sorted(systems, key=lambda n: (n.split()[0], n.split()[1] != "before"))
        samples = interleaved(steps, steps=args.steps, repeats=args.repeats, warmup=5)
        samples.update({k: [t / args.brain_steps for t in v]
                        for k, v in interleaved(fits, steps=1, repeats=args.repeats, warmup=1).items()})
        print(f"\n## {workload}\n\n| system | us/step median | min | max | after / before | final loss |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in order:
            st = summary(samples[name])
            kind, label = name.split()
            ratio = ""
            if label == "after":
                ratio = f"{st['median'] / summary(samples[f'{kind} before'])['median']:.2f}"
            print(f"| {name} | {st['median']:.0f} | {st['min']:.0f} | {st['max']:.0f} | {ratio} | "
                  f"{float(losses[name].detach()):.6g} |")


if __name__ == "__main__":
    main()
