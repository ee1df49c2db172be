"""The systems the suite compares. Each trains one workload step by step on shared batches.

A system has ``run(steps)`` (advance that many training steps, return seconds) and ``loss()`` (the
last loss as a float, read once the timing is over). Batch ``i`` of the workload is used by every
system's ``i``-th step, so after the same number of steps the losses must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

import fbrain
from fbrain import optim
from fbrain.functional import call_with
from benchmarks.workloads import Workload

LR = 1e-3
# Clipping at a norm no gradient reaches: the Brains pay for the norm (SpeechBrain always does),
# and every system applies the same updates, so their losses stay comparable.
NO_CLIP = 1e9


class Batches:
    """The workload's batch stream, made once and kept on the device."""

    def __init__(self, workload: Workload, count: int, device: torch.device):
        self.items = [tuple(t.to(device) for t in workload.batch(i)) for i in range(count)]

    def __getitem__(self, i):
        return self.items[i % len(self.items)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Stepper:
    """A system whose step is a Python callable on batch ``i``."""

    def __init__(self, workload, batches, device):
        self.workload, self.batches, self.device = workload, batches, device
        self.i = 0
        self.last = None

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.last = self.step(self.batches[self.i])
            self.i += 1
        _sync(self.device)
        return time.perf_counter() - start

    def loss(self) -> float:
        return float(self.last.detach())


class TorchLoop(_Stepper):
    """A hand-written loop: zero_grad, forward, backward, torch.optim.Adam (fused where supported)."""

    name = "torch-loop"

    def __init__(self, workload, batches, device):
        super().__init__(workload, batches, device)
        self.model = workload.build().to(device)
        try:
            self.opt = torch.optim.Adam(self.model.parameters(), lr=LR, fused=True)
        except RuntimeError:
            self.opt = torch.optim.Adam(self.model.parameters(), lr=LR, foreach=True)

    def step(self, batch):
        self.opt.zero_grad(set_to_none=True)
        loss = self.workload.loss(self.model, batch)
        loss.backward()
        self.opt.step()
        return loss


class ForwardBackward(_Stepper):
    """Forward and backward only: the floor the others are measured against (no update)."""

    name = "fwd+bwd"
    trains = False

    def __init__(self, workload, batches, device):
        super().__init__(workload, batches, device)
        self.model = workload.build().to(device)

    def step(self, batch):
        for p in self.model.parameters():
            p.grad = None
        loss = self.workload.loss(self.model, batch)
        loss.backward()
        return loss


class FbrainStep(_Stepper):
    """The pure train step, eager."""

    name = "fbrain-step"
    compiled = False

    def __init__(self, workload, batches, device):
        super().__init__(workload, batches, device)
        self.model = workload.build().to(device)
        opt = optim.adam(LR)
        self.state = fbrain.TrainState.create(self.model, opt)

        def loss_fn(params, buffers, batch, rng):
            loss, new_buffers = call_with(self.model, params, buffers, workload.loss, batch)
            return loss, {"buffers": new_buffers}

        step = fbrain.make_train_step(loss_fn, opt)
        self.train_step = self.make(step, device)

    def make(self, step, device):
        return step

    def step(self, batch):
        self.state, metrics = self.train_step(self.state, batch)
        return metrics["loss"]


class FbrainStepCompiled(FbrainStep):
    """The same step under torch.compile (fullgraph; on CUDA with CUDA graphs too)."""

    name = "fbrain-step-compiled"

    def make(self, step, device):
        mode = "reduce-overhead" if device.type == "cuda" else None
        return step.compile(fullgraph=True, mode=mode)


class FbrainBrain:
    """fbrain.Brain.fit over one epoch of ``steps`` batches per call (a DataLoader without batching)."""

    name = "fbrain-brain"

    def __init__(self, workload, batches, device):
        self.workload, self.batches, self.device = workload, batches, device
        self.i = 0
        loss_of = workload.loss

        class Timed(fbrain.Brain):
            def compute_forward(self, batch, stage):
                return batch

            def compute_objectives(self, predictions, batch, stage):
                return loss_of(self.modules.model, batch)

            def init_optimizers(self):
                # fit() calls this every time; keep one optimizer so Adam's moments carry over
                # (the SpeechBrain worker does the same).
                if self.optimizer is None:
                    super().init_optimizers()

            def on_fit_batch_end(self, batch, outputs, loss, should_step):
                self.last_loss = loss  # read once, after the timing

        self.brain = Timed(modules={"model": workload.build()}, opt_class=lambda p: torch.optim.Adam(p, lr=LR),
                           run_opts={"device": str(device), "noprogressbar": True, "max_grad_norm": NO_CLIP,
                                     **self.run_options(device)})
        self.epoch = 0

    def run_options(self, device) -> dict:
        return {}

    def run(self, steps: int) -> float:
        loader = torch.utils.data.DataLoader([self.batches[self.i + k] for k in range(steps)], batch_size=None)
        start = time.perf_counter()
        self.brain.fit(range(self.epoch, self.epoch + 1), loader, progressbar=False)
        _sync(self.device)
        elapsed = time.perf_counter() - start
        self.i += steps
        self.epoch += 1
        return elapsed

    def loss(self) -> float:
        return float(self.brain.last_loss.detach())


class FbrainBrainCompiled(FbrainBrain):
    """The same Brain with ``compile_steps=True``: each step one torch.compile graph (a step that
    cannot compile, the BiLSTM's, runs eagerly after a warning)."""

    name = "fbrain-brain-compiled"

    def run_options(self, device) -> dict:
        return {"compile_steps": True, "compile_mode": "reduce-overhead" if device.type == "cuda" else "default"}


class SpeechBrainWorker:
    """speechbrain.Brain.fit in a worker process (importing SpeechBrain changes global torch flags).

    The worker builds the same model and batches and answers "run N steps" requests, so it takes its
    turn in the interleaved schedule like the in-process systems.
    """

    name = "speechbrain"

    def __init__(self, workload, batches, device):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.sb_worker", workload.name, str(device), str(len(batches.items))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._ask({"op": "ready"})

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the SpeechBrain worker exited (code {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"SpeechBrain worker: {reply['error']}")
        return reply

    def run(self, steps: int) -> float:
        return self._ask({"op": "run", "steps": steps})["seconds"]

    def loss(self) -> float:
        return self._ask({"op": "loss"})["loss"]

    def peak_memory_mb(self) -> float:
        return self._ask({"op": "memory"})["peak_mem_mb"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


SYSTEMS = [TorchLoop, SpeechBrainWorker, FbrainBrain, FbrainBrainCompiled, FbrainStep, FbrainStepCompiled,
           ForwardBackward]
