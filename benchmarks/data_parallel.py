"""Data-parallel scaling: one process against N torchrun ranks on the same global batch.

    python -m benchmarks.data_parallel [--ranks 2] [--steps 30] [--workload convtasnet-small] [--sharded]

Runs the pure train step of a suite workload (default: the small Conv-TasNet) once in a single
process with every core, then under ``torchrun --nproc_per_node=N`` with the cores split between
the ranks, each rank on its 1/N of the same global batch (gloo on CPU, nccl on CUDA). Prints
milliseconds per step (median of the timed steps) and the speed-up; the final losses of the two
runs are printed too (they agree to float rounding: the ranks average their gradients). With
``--sharded`` the N ranks also run with sharded optimizer state (``shard_optimizer_state``), and a
table gives, per rank: step time, optimizer-state megabytes, peak resident memory, and the time to
write a checkpoint (rank 0 the whole state; sharded: every rank its own shard file, at once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

WORKER = "--worker"


def worker(workload_name: str, steps: int, batch_scale: int, sharded: bool = False) -> None:
    import resource

    import fbrain
    from fbrain import optim, sharding
    from fbrain.functional import call_with
    from benchmarks.workloads import WORKLOADS

    group = fbrain.distributed.init_from_environment()
    rank = torch.distributed.get_rank() if group is not None else 0
    world = torch.distributed.get_world_size() if group is not None else 1
    workload = WORKLOADS[workload_name]
    model = workload.build()
    opt = optim.adam(1e-3)
    state = fbrain.TrainState.create(model, sharding.initialising_shards(opt, group) if sharded else opt)

    def loss_fn(params, buffers, batch, rng):
        loss, new_buffers = call_with(model, params, buffers, workload.loss, batch)
        return loss, {"buffers": new_buffers}

    step = fbrain.make_train_step(loss_fn, opt, process_group=group, shard_optimizer_state=sharded)
    state_bytes = sum(t.numel() * t.element_size() for t in fbrain.tree.tree_leaves(state.opt_state)
                      if isinstance(t, torch.Tensor))

    def global_batch(i):  # batch_scale workload batches side by side: the global batch
        parts = [workload.batch(i * batch_scale + k) for k in range(batch_scale)]
        return tuple(torch.cat(tensors) for tensors in zip(*parts))

    def shard(batch):
        n = batch[0].shape[0]
        return tuple(t[rank * n // world:(rank + 1) * n // world] for t in batch)

    batches = [shard(global_batch(i)) for i in range(steps + 3)]
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        if i >= 3:  # warm-up steps first
            times.append(time.perf_counter() - start)
    save_ms = checkpoint_save_ms(state, sharded, group)
    if rank == 0:
        print(json.dumps({"ms_per_step": 1e3 * statistics.median(times), "loss": float(metrics["loss"]),
                          "save_ms": save_ms,
                          "world": world, "threads": torch.get_num_threads(), "opt_state_mb": state_bytes / 2**20,
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    if group is not None:
        torch.distributed.destroy_process_group()


def checkpoint_save_ms(state, sharded: bool, group, repeats: int = 3) -> float:
    """Median time (barrier to barrier) to write ``state`` as a Brain's checkpoint does: rank 0 the
    whole state when replicated; every rank its shard of the optimizer state (and rank 0 the rest)
    when sharded."""
    import tempfile

    import fbrain
    from fbrain import checkpoint
    from fbrain.checkpoint import shards

    rank = torch.distributed.get_rank() if group is not None else 0
    world = torch.distributed.get_world_size() if group is not None else 1
    folder = tempfile.mkdtemp(prefix="fbrain-bench-save-") if rank == 0 else None
    folder = fbrain.distributed.ddp_broadcast(folder)
    times = []
    for _ in range(repeats):
        fbrain.distributed.barrier()
        start = time.perf_counter()
        if sharded:
            shards.write(os.path.join(folder, "brain.shards"), rank, world, state.opt_state)
        if rank == 0:
            checkpoint.save(os.path.join(folder, "brain.fbrain"), state.replace(opt_state=None) if sharded else state)
        fbrain.distributed.barrier()
        times.append(time.perf_counter() - start)
    fbrain.distributed.barrier()
    if rank == 0:
        import shutil
        shutil.rmtree(folder)
    return 1e3 * statistics.median(times)


def run(command: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == [WORKER]:
        return worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:6] == ["sharded"])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workload", default="convtasnet-small")
    parser.add_argument("--batch-scale", type=int, default=2, help="workload batches per global batch")
    parser.add_argument("--sharded", action="store_true", help="also run the ranks with sharded optimizer state")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    job = [args.workload, str(args.steps), str(args.batch_scale)]
    single = run([sys.executable, "-m", "benchmarks.data_parallel", WORKER, *job], threads=cores)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
              "-m", "benchmarks.data_parallel", WORKER, *job]
    ranks = run(launch, threads=max(1, cores // args.ranks))
    sharded = run(launch + ["sharded"], threads=max(1, cores // args.ranks)) if args.sharded else None
    print(f"{args.workload}, global batch of {args.batch_scale} workload batches, {cores} cores, torch {torch.__version__}")
    print(f"1 process ({single['threads']} threads): {single['ms_per_step']:.1f} ms/step, loss {single['loss']:.6g}")
    print(f"{args.ranks} ranks ({ranks['threads']} threads each): {ranks['ms_per_step']:.1f} ms/step, "
          f"loss {ranks['loss']:.6g}")
    print(f"speed-up: {single['ms_per_step'] / ranks['ms_per_step']:.2f}x")
    if sharded is not None:
        print(f"{args.ranks} ranks, sharded optimizer state: {sharded['ms_per_step']:.1f} ms/step, loss {sharded['loss']:.6g}")
        print("\n| run | ms/step | optimizer state MB / rank | peak RSS MB / rank | checkpoint save ms |\n"
              "|---|---:|---:|---:|---:|")
        for name, r in (("1 process", single), (f"{args.ranks} ranks, replicated", ranks),
                        (f"{args.ranks} ranks, sharded", sharded)):
            print(f"| {name} | {r['ms_per_step']:.1f} | {r['opt_state_mb']:.1f} | {r['peak_rss_mb']:.0f} "
                  f"| {r['save_ms']:.0f} |")
        print(f"\nsharded / replicated: step time {sharded['ms_per_step'] / ranks['ms_per_step']:.2f}x, optimizer "
              f"state {sharded['opt_state_mb'] / ranks['opt_state_mb']:.2f}x, peak RSS "
              f"{sharded['peak_rss_mb'] / ranks['peak_rss_mb']:.2f}x, checkpoint save "
              f"{sharded['save_ms'] / ranks['save_ms']:.2f}x")


if __name__ == "__main__":
    main()
