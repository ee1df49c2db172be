"""Save/load time and file size of fbrain checkpoints against torch.save / torch.load.

    python -m benchmarks.checkpoint_io [--repeats 5] [--big-params 100_000_000]

States: the enhancement template's BiLSTM masker (2.04 M params) with Adam moments, and a synthetic
state of ``--big-params`` parameters with Adam moments. torch.save gets the same tensors as a nested
dict. fbrain's save is atomic and fsyncs; torch.save is timed plain and followed by an fsync.
Saves go to a new file (as the Checkpointer's do), plus one pair of rows for saving over an existing
file, and one pair for a checkpointing cycle: fbrain's ``Checkpointer.save_and_keep_only`` against
SpeechBrain's pattern (torch.save into a new folder, then the previous folder deleted). Every timed
operation starts after an ``os.sync()`` with no benchmark file in the page cache, so none pays for
another's dirty pages or profits from the pages another freed (loads read from disk).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time

import torch

import fbrain
from fbrain import checkpoint, optim
from fbrain.checkpoint.files import release_cached_pages
from fbrain.models import SpectralMasker


def adam_state(module: torch.nn.Module) -> fbrain.TrainState:
    opt = optim.adam(1e-3)
    state = fbrain.TrainState.create(module, opt)
    # Non-zero moments, as after training.
    g = torch.Generator().manual_seed(0)
    noisy = lambda d: {k: torch.rand(v.shape, generator=g) for k, v in d.items()}  # noqa: E731
    return state.replace(opt_state=state.opt_state._replace(mu=noisy(state.params), nu=noisy(state.params)))


class Synthetic(torch.nn.Module):
    def __init__(self, n_params: int, per_tensor: int = 4_000_000):
        super().__init__()
        sizes = [per_tensor] * (n_params // per_tensor) + ([n_params % per_tensor] if n_params % per_tensor else [])
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s)) for s in sizes)


def as_dict(state: fbrain.TrainState) -> dict:
    return {"params": state.params, "buffers": state.buffers, "mu": state.opt_state.mu, "nu": state.opt_state.nu,
            "count": state.opt_state.count, "rng": state.rng}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def torch_save_fsync(obj, path):
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def drop_page_cache(folder: str) -> None:
    """Drop the (clean, after os.sync) cached pages of every file under ``folder``."""
    for parent, _, names in os.walk(folder):
        for name in names:
            release_cached_pages(os.path.join(parent, name))


def remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)


class TorchFolders:
    """What SpeechBrain's Checkpointer does on each save_and_keep_only(num_to_keep=1): torch.save
    into a new folder, then delete the previous folder (here with an fsync, as fbrain's has)."""

    def __init__(self, root: str, tree: dict):
        self.root, self.tree, self.count, self.previous = root, tree, 0, None
        os.makedirs(root, exist_ok=True)

    def save_and_keep_only(self) -> None:
        self.count += 1
        folder = os.path.join(self.root, f"CKPT+{self.count}")
        os.mkdir(folder)
        torch_save_fsync(self.tree, os.path.join(folder, "state.ckpt"))
        if self.previous is not None:
            shutil.rmtree(self.previous)
        self.previous = folder


def fbrain_checkpointer(root: str, state: fbrain.TrainState) -> checkpoint.Checkpointer:
    """An fbrain Checkpointer holding ``state`` as its one recoverable."""
    ckpt = checkpoint.Checkpointer(root)
    ckpt.add_recoverable("state", state, custom_save_hook=lambda obj, path: checkpoint.save(path, obj),
                         custom_load_hook=lambda obj, path, end_of_epoch: None)
    return ckpt


def measure(name: str, state: fbrain.TrainState, folder: str, repeats: int) -> None:
    ours, theirs = os.path.join(folder, "s.fbrain"), os.path.join(folder, "s.pt")
    plain = as_dict(state)
    cycles = tempfile.mkdtemp(dir=folder)  # each state its own checkpoint folders
    ours_ckpt = fbrain_checkpointer(os.path.join(cycles, "fbrain"), state)
    theirs_ckpt = TorchFolders(os.path.join(cycles, "torch"), plain)
    # (preparation, timed operation). Saves go to a path with no file yet, as the Checkpointer's
    # saves do (each checkpoint is a new CKPT+<time> folder), except the "over an existing file"
    # rows: replacing a large file atomically costs more on some filesystems than overwriting it.
    runs = {"fbrain save": (lambda: remove(ours), lambda: checkpoint.save(ours, state)),
            "fbrain save over": (None, lambda: checkpoint.save(ours, state)),
            "torch.save": (lambda: remove(theirs), lambda: torch.save(plain, theirs)),
            "torch.save+fsync": (lambda: remove(theirs), lambda: torch_save_fsync(plain, theirs)),
            "torch.save+fsync over": (None, lambda: torch_save_fsync(plain, theirs)),
            "fbrain cycle": (None, lambda: ours_ckpt.save_and_keep_only(num_to_keep=1, verbosity=logging.DEBUG)),
            "torch cycle": (None, theirs_ckpt.save_and_keep_only),
            "fbrain load": (None, lambda: checkpoint.load(ours, template=state)),
            "torch.load": (None, lambda: torch.load(theirs, weights_only=True))}
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for label, (prepare, fn) in runs.items():  # interleaved
            if prepare is not None:
                prepare()
            # Every operation starts from the same place: no dirty pages or pending block frees left
            # by the one before (the next fsync would pay for them), and none of the files cached.
            # A write needs free pages; recently freed ones are reused cheaply, while memory not
            # used before costs several times more on a virtual machine, so an operation that ran
            # right after another freed 1 GB of cache would otherwise look faster than it is.
            os.sync()
            drop_page_cache(folder)
            times[label].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    size_ours, size_theirs = os.path.getsize(ours), os.path.getsize(theirs)
    n = sum(p.numel() for p in state.params.values())
    print(f"\n## {name} ({n / 1e6:.2f} M params + Adam moments)\n")
    print("| operation | median s | ratio |\n|---|---:|---:|")
    print(f"| fbrain save (atomic, fsync), new file | {med['fbrain save']:.4f} | "
          f"{med['fbrain save'] / med['torch.save+fsync']:.2f}x torch.save+fsync, "
          f"{med['fbrain save'] / med['torch.save']:.2f}x torch.save |")
    print(f"| torch.save, new file | {med['torch.save']:.4f} | |")
    print(f"| torch.save + fsync, new file | {med['torch.save+fsync']:.4f} | |")
    print(f"| fbrain save over an existing file | {med['fbrain save over']:.4f} | "
          f"{med['fbrain save over'] / med['torch.save+fsync over']:.2f}x torch.save+fsync over it |")
    print(f"| torch.save + fsync over an existing file | {med['torch.save+fsync over']:.4f} | |")
    print(f"| fbrain Checkpointer.save_and_keep_only (new folder, old one deleted) | {med['fbrain cycle']:.4f} | "
          f"{med['fbrain cycle'] / med['torch cycle']:.2f}x torch.save+fsync cycle |")
    print(f"| torch.save + fsync into a new folder, old one deleted (SpeechBrain's cycle) | "
          f"{med['torch cycle']:.4f} | |")
    print(f"| fbrain load (verified, strict) | {med['fbrain load']:.4f} | {med['fbrain load'] / med['torch.load']:.2f}x torch.load |")
    print(f"| torch.load (weights_only) | {med['torch.load']:.4f} | |")
    print(f"| file size | {size_ours / 1e6:.2f} MB | {size_ours / size_theirs:.4f}x torch ({size_theirs / 1e6:.2f} MB) |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--big-params", type=int, default=100_000_000)
    parser.add_argument("--dir", default=None, help="folder to write into (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        print(f"# checkpoint I/O — torch {torch.__version__}, folder {folder}")
        measure("enhancement BiLSTM masker", adam_state(SpectralMasker()), folder, args.repeats)
        measure("synthetic", adam_state(Synthetic(args.big_params)), folder, max(3, args.repeats // 2))


if __name__ == "__main__":
    main()
