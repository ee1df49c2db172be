"""Microseconds per training step: plain PyTorch with torch.optim.Adam (foreach, fused) against the
fbrain pure step (eager; eager with a donated state; compiled), on an MLP and a small conv model.

    python -m benchmarks.step_overhead [--repeats 15] [--steps 20] [--device cpu|cuda]

Every system trains the same model from the same initial weights on the same batch; the final losses
are printed so a disagreement shows.
"""

from __future__ import annotations

import argparse
import copy
import platform

import torch

import fbrain
from fbrain import optim
from benchmarks.timing import interleaved, summary


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                               torch.nn.ReLU(), torch.nn.Linear(512, 10))


class SmallConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv1d(1, 32, 16, stride=8), torch.nn.ReLU(),
            torch.nn.Conv1d(32, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv1d(32, 32, 3, padding=1), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x.unsqueeze(1)).mean(-1))


WORKLOADS = {
    "mlp": (mlp, lambda g: torch.randn(64, 256, generator=g)),
    "conv": (SmallConv, lambda g: torch.randn(8, 4000, generator=g)),
}


def systems_for(name: str, device: torch.device):
    build, make_input = WORKLOADS[name]
    torch.manual_seed(0)
    model = build().to(device)
    g = torch.Generator().manual_seed(0)
    x = make_input(g).to(device)
    y = torch.randint(0, 10, (x.shape[0],), generator=g).to(device)
    lr = 1e-3
    systems, losses = {}, {}

    def torch_loop(kind):
        m = copy.deepcopy(model)
        opt = torch.optim.Adam(m.parameters(), lr=lr, **{kind: True})

        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            losses[f"torch-adam-{kind}"] = loss
        return step

    systems["torch-adam-foreach"] = torch_loop("foreach")
    systems["torch-adam-fused"] = torch_loop("fused")

    fopt = optim.adam(lr)

    def loss_fn(params, buffers, batch, rng):
        out, _ = fbrain.apply_module(model, params, buffers, batch[0], check=False)
        return torch.nn.functional.cross_entropy(out, batch[1])

    train_step = fbrain.make_train_step(loss_fn, fopt)
    donating = fbrain.make_train_step(loss_fn, fopt, donate_state=True)
    for label, fn in (("fbrain-step", train_step), ("fbrain-step-donated", donating),
                      ("fbrain-step-compiled", train_step.compile(fullgraph=True))):
        box = [fbrain.TrainState.create(model, fopt)]

        def step(fn=fn, box=box, label=label):
            box[0], metrics = fn(box[0], (x, y))
            losses[label] = metrics["loss"]
        systems[label] = step
    return systems, losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"# fbrain step overhead — {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {device}")
    for name in WORKLOADS:
        systems, losses = systems_for(name, device)
        samples = interleaved(systems, steps=args.steps, repeats=args.repeats, warmup=5, sync=sync)
        fused = summary(samples["torch-adam-fused"])["median"]
        print(f"\n## {name}\n\n| system | us/step median | min | max | x fused loop | final loss |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, s in samples.items():
            st = summary(s)
            print(f"| {label} | {st['median']:.0f} | {st['min']:.0f} | {st['max']:.0f} | "
                  f"{st['median'] / fused:.2f} | {float(losses[label].detach()):.4g} |")


if __name__ == "__main__":
    main()
