"""Microseconds per training step of ``fbrain.Brain.fit`` against ``speechbrain.Brain.fit``.

    python -m benchmarks.brain_vs_speechbrain [--repeats 7] [--batches 50] [--device cpu|cuda] [--models tiny,bilstm]

Two models: the Brain tutorial's ``Linear(10, 10)`` (SGD, batch of one 10 x 10 sample) and the
enhancement template's BiLSTM masker (``fbrain.models.SpectralMasker``, 2,042,753 parameters, Adam
1e-4, batch 8 x 126 frames x 257). Both Brains run the same recipe from the same initial weights on
the same pre-built batches, one epoch per call, interleaved (A B A B ...) so machine noise hits both.

fbrain runs twice: as a recipe ports (eager steps) and with ``compile_steps=True`` (each step one
torch.compile graph: forward, backward, clipping and update), on the tiny model only (torch.compile
cannot trace the BiLSTM's nn.LSTM in torch 2.11). SpeechBrain runs eagerly; its ``compile`` option
compiles modules only, which cannot remove the per-step Python around them that dominates here.

SpeechBrain is imported in this process, but the global torch flags it changes (TF32) are restored
right after the import, so both run with torch's defaults.
"""

from __future__ import annotations

import argparse
import platform

import torch

import fbrain
from benchmarks.timing import interleaved, summary


def import_speechbrain():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    import speechbrain

    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])
    return speechbrain


def brain_class(base):
    class Recipe(base):
        def compute_forward(self, batch, stage):
            return self.modules.model(batch[0])

        def compute_objectives(self, predictions, batch, stage):
            return torch.nn.functional.mse_loss(predictions, batch[1])

        def on_stage_end(self, stage, stage_loss, epoch=None):
            self.last_stage_loss = stage_loss  # both Brains reset avg_train_loss when an epoch ends

    return Recipe


COMPILABLE = ("tiny",)  # torch 2.11's torch.compile refuses nn.LSTM


def tiny_case(device):
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 10)
    batches = [(torch.rand(1, 10, 10, device=device), torch.rand(1, 10, 10, device=device))]
    return model, batches, lambda p: torch.optim.SGD(p, lr=0.1)


def bilstm_case(device):
    from fbrain.models.spectral_masker import SpectralMasker

    torch.manual_seed(0)
    model = SpectralMasker()

    class Masked(torch.nn.Module):  # mask x input, as the template does
        def __init__(self):
            super().__init__()
            self.masker = model

        def forward(self, x):
            return self.masker(x) * x

    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(8, 126, 257, generator=g).to(device), torch.rand(8, 126, 257, generator=g).to(device))]
    return Masked(), batches, lambda p: torch.optim.Adam(p, lr=1e-4)


def make_system(base, case, device, n_batches, **run_opts):
    model, batches, opt_class = case
    import copy

    brain = brain_class(base)({"model": copy.deepcopy(model)}, opt_class=opt_class,
                              run_opts={"device": device, "noprogressbar": True, **run_opts})
    loader = batches * n_batches  # a list of ready batches: both Brains wrap it in a DataLoader

    def one_epoch():
        brain.fit(range(1), loader, train_loader_kwargs={"batch_size": None})

    return one_epoch, brain


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="tiny,bilstm")
    args = parser.parse_args(argv)
    speechbrain = import_speechbrain()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"speechbrain {speechbrain.__version__}, device {args.device}")
    cases = {"tiny": tiny_case, "bilstm": bilstm_case}
    for name in args.models.split(","):
        case = cases[name](args.device)
        n = args.batches if name == "tiny" else max(2, args.batches // 10)
        systems, brains = {}, {}
        variants = [("fbrain", fbrain.Brain, {}), ("speechbrain", speechbrain.Brain, {})]
        if name in COMPILABLE:
            variants.insert(1, ("fbrain-compile_steps", fbrain.Brain,
                                {"compile_steps": True, "compile_mode": "default"}))
        for label, base, run_opts in variants:
            systems[label], brains[label] = make_system(base, case, args.device, n, **run_opts)
        samples = interleaved(systems, steps=1, repeats=args.repeats, warmup=1, sync=sync)
        theirs = summary(samples["speechbrain"])["median"]
        print(f"\n## {name} ({n} batches per epoch)\n\n| system | us/step median | x speechbrain | epoch loss |")
        print("|---|---:|---:|---:|")
        for label, s in samples.items():
            median = summary(s)["median"]
            print(f"| {label} | {median / n:.1f} | {median / theirs:.2f} | {brains[label].last_stage_loss:.6e} |")


if __name__ == "__main__":
    main()
