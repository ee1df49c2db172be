"""The benchmark suite: fbrain beside SpeechBrain and plain PyTorch on the same workloads.

    python -m benchmarks [--quick | --full] [--out DIR] [--device cpu|cuda] [--contended [N]]

For each workload every system trains the same model from the same weights on the same batches.
After a warm-up the systems take turns (A B C A B C ...) so that noise on a shared machine hits
them alike; the figures are medians of the turns. Peak memory is measured per system in a fresh
process (RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA). The cold start is the time from
building a system to its first finished step (compiling included). ``--contended`` runs CPU-bound
processes beside the suite, as on a busy machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
from tqdm import tqdm

from benchmarks import systems as S
from benchmarks.workloads import FULL, QUICK, WORKLOADS

MODES = {  # fewest steps per turn, turns, warm-up steps, seconds a turn of torch-loop should take
    "tiny": (1, 1, 1, 0.0),
    "quick": (3, 5, 2, 0.3),
    "full": (10, 9, 3, 1.0),
}
MAX_STEPS_PER_TURN = 1000
# The systems must train alike: after the warm-up, each runs two short calls (so a Brain starts
# fit() twice) and the losses are compared. Only a few steps in, float rounding (fused against
# foreach kernels) is far below this; a wrong update (a skipped or repeated step, reset moments, a
# wrong learning rate) is far above. After hundreds of timed steps rounding alone grows past any
# fixed tolerance, so the final losses are reported but not compared.
AGREEMENT = 1e-4  # relative
CHECK_CALLS = (2, 2)  # steps of each agreement call

# Seconds one workload takes on a quiet 2-core CPU (AMD EPYC, torch 2.11, --device cpu, memory
# processes included), per mode: what the suite prints as its expected duration when it starts.
# quick: results.json's workload_seconds of `python -m benchmarks --quick` on 2026-12-07 23:17 UTC
# (Intel Xeon, 2 cores, quiet, torch.compile's on-disk cache cold as on a new machine): 328 s in all.
# With the cache warm (the run at 23:11) it took 273 s; on an AMD EPYC 2-core VM the same day the
# suite took 538 s (issue 27): a slower CPU can take up to twice these figures.
# tiny: per workload as results.json recorded them, one run of python -m benchmarks --tiny (105 s in
# all) on the same machine on 2026-12-07, torch.compile's cache cold as on a new machine (with the
# cache warm from that run, the next took 41 s: 19, 5, 7 and 9 s).
# results.json records each workload's seconds ("workload_seconds") to refresh these from.
# full mode is not timed: its turns are longer and more, so the quick figures are a lower bound.
EXPECTED_SECONDS = {
    "quick": {"tiny-linear": 103, "mlp": 78, "enhance-blstm": 40, "convtasnet-small": 107},
    "tiny": {"tiny-linear": 20, "mlp": 16, "enhance-blstm": 25, "convtasnet-small": 44},
}
CHART_HINT = ("chart not drawn: matplotlib is not installed; for {path}, install it (pip install matplotlib, "
              "or the bench extra: pip install -e \".[bench]\") and run the suite again")


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # VmHWM is this process's own peak. ru_maxrss is not: Linux carries it over fork and exec, so
    # a probe started by the (large) suite process would report the suite's size.
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # KiB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_memory(workload: str, system: str, device: str, steps: int) -> float | None:
    """Peak memory of one system alone, in a fresh process."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--memory-probe", workload, system, device,
                           str(steps)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mem_mb"]


def memory_probe(workload: str, system: str, device: str, steps: int) -> None:
    dev = torch.device(device)
    cls = next(c for c in S.SYSTEMS if c.name == system)
    w = WORKLOADS[workload]
    instance = cls(w, S.Batches(w, steps, dev), dev)
    instance.run(steps)
    peak = instance.peak_memory_mb() if hasattr(instance, "peak_memory_mb") else peak_memory_mb(dev)
    if hasattr(instance, "close"):
        instance.close()
    print(json.dumps({"peak_mem_mb": peak}))


def run_workload(name: str, device: torch.device, mode: str, memory: bool, progress) -> list[dict]:
    min_steps, turns, warmup, turn_seconds = MODES[mode]
    workload = WORKLOADS[name]
    steps = _steps_per_turn(workload, device, warmup, min_steps, turn_seconds)
    # A fresh batch for every step (a model that saw the same few batches again and again would
    # drive its loss towards zero, where the systems' float rounding no longer compares).
    batches = S.Batches(workload, warmup + sum(CHECK_CALLS) + steps * turns, device)
    live, rows = {}, {}
    for cls in S.SYSTEMS:
        row = {"workload": name, "system": cls.name, "error": None}
        rows[cls.name] = row
        try:
            # Cold start: from building the system to its first finished step (compiling included;
            # for SpeechBrain, its worker process's start and imports too).
            started = time.perf_counter()
            system = cls(workload, batches, device)
            system.run(1)
            row["cold_start_s"] = time.perf_counter() - started
            system.run(warmup - 1) if warmup > 1 else None  # first calls compile, allocate, fill caches
            for count in CHECK_CALLS:
                system.run(count)
            row["check_loss"] = system.loss()
            live[cls.name] = system
        except Exception as err:  # a system that cannot run this workload is reported, not hidden
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    samples = {k: [] for k in live}
    for _ in range(turns):
        for key, system in live.items():
            samples[key].append(system.run(steps) / steps * 1e6)
        progress.update(1)
    for key, system in live.items():
        s = samples[key]
        rows[key].update(us_per_step=statistics.median(s), us_min=min(s), us_max=max(s), steps_per_turn=steps,
                         steps_per_s=1e6 / statistics.median(s), final_loss=system.loss(),
                         trains=getattr(system, "trains", True))
        if hasattr(system, "close"):
            system.close()
    for key, row in rows.items():
        row["peak_mem_mb"] = measure_memory(name, key, str(device), max(warmup, 2)) if memory and not row["error"] \
            else None
    _ratios_and_agreement(list(rows.values()))
    return list(rows.values())


def _steps_per_turn(workload, device: torch.device, warmup: int, min_steps: int, turn_seconds: float) -> int:
    """Enough steps that a turn of torch-loop takes about ``turn_seconds``, so per-call costs (a
    Brain's fit() starting an epoch) are spread as in real training, for tiny and big models alike."""
    if not turn_seconds:
        return min_steps
    probe = S.TorchLoop(workload, S.Batches(workload, 2 * warmup, device), device)
    probe.run(warmup)
    per_step = probe.run(warmup) / warmup
    return int(min(MAX_STEPS_PER_TURN, max(min_steps, round(turn_seconds / max(per_step, 1e-9)))))


def _ratios_and_agreement(rows: list[dict]) -> None:
    by = {r["system"]: r for r in rows}
    for row in rows:
        for ref in ("torch-loop", "speechbrain", "fwd+bwd"):
            base = by.get(ref, {}).get("us_per_step")
            row[f"x_{ref}"] = row["us_per_step"] / base if base and row.get("us_per_step") else None
    reference = by.get("torch-loop", {}).get("check_loss")
    for row in rows:
        loss = row.get("check_loss")
        if reference is None or loss is None or not row.get("trains", True) or row["error"]:
            continue
        if abs(loss - reference) > AGREEMENT * max(abs(reference), 1e-12):
            row["error"] = (f"loss after {sum(CHECK_CALLS)} checked steps {loss:.8g} disagrees with "
                            f"torch-loop's {reference:.8g}")


def markdown(rows: list[dict], info: dict) -> str:
    out = [f"Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} torch threads), "
           f"torch {info['torch']}, device {info['device']}{', ' + info['gpu'] if 'gpu' in info else ''}; "
           f"{info['date']}{'; contended: ' + str(info['contended']) + ' CPU-bound processes beside' if info.get('contended') else ''}.", ""]
    for name in dict.fromkeys(r["workload"] for r in rows):
        per_turn = next((r["steps_per_turn"] for r in rows if r["workload"] == name and r.get("steps_per_turn")), None)
        timing = f" ({per_turn} steps a turn)" if per_turn else ""
        out += [f"### {name}: {WORKLOADS[name].note}{timing}", "",
                "| system | us/step (median) | min | max | steps/s | peak MB | cold start s | x torch-loop "
                f"| x speechbrain | x fwd+bwd | loss after {sum(CHECK_CALLS)} steps | final loss |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["workload"] == name):
            if r.get("us_per_step") is None:
                out.append(f"| {r['system']} | ERROR: {r['error']} | | | | | | | | | | |")
                continue
            fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
            trains = r.get("trains", True)
            check = fmt(r.get("check_loss"), ".8g") if trains else "(no update)"
            if r["error"]:
                check += f" ERROR: {r['error']}"
            loss = fmt(r["final_loss"], ".6g") if trains else "(no update)"
            out.append(f"| {r['system']} | {r['us_per_step']:.0f} | {r['us_min']:.0f} | {r['us_max']:.0f} | "
                       f"{r['steps_per_s']:.1f} | {fmt(r['peak_mem_mb'], '.0f')} | {fmt(r.get('cold_start_s'), '.2f')} | "
                       f"{fmt(r['x_torch-loop'], '.2f')} | "
                       f"{fmt(r['x_speechbrain'], '.2f')} | {fmt(r['x_fwd+bwd'], '.2f')} | {check} | {loss} |")
        out.append("")
    return "\n".join(out)


def chart_bars(rows: list[dict]) -> dict[str, list[tuple[float, float, float]]]:
    """Per system, per workload: ``(median, min, max)`` time per step over torch-loop's median in
    the same run (zeros where the system did not run), the bar and its whisker."""
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    base = {r["workload"]: r.get("us_per_step") for r in rows if r["system"] == "torch-loop"}
    bars = {}
    for system in [c.name for c in S.SYSTEMS]:
        bars[system] = []
        for w in workloads:
            row = next((r for r in rows if r["workload"] == w and r["system"] == system), None)
            if row is None or row.get("us_per_step") is None or not base.get(w):
                bars[system].append((0.0, 0.0, 0.0))
                continue
            bars[system].append((row["us_per_step"] / base[w], row["us_min"] / base[w], row["us_max"] / base[w]))
    return bars


def expected_duration(mode: str, names: list[str], device: str = "cpu") -> str:
    """The line the suite starts with: how long ``names`` take in ``mode``, from
    :data:`EXPECTED_SECONDS` (a lower bound where the mode or a workload has no figure)."""
    figures = EXPECTED_SECONDS.get(mode, EXPECTED_SECONDS["quick"])
    known = sum(figures[n] for n in names if n in figures)
    untimed = [n for n in names if n not in figures]
    notes = [f"the {mode} mode is not timed: the quick mode's figures"] if mode not in EXPECTED_SECONDS else []
    notes += [f"not timed: {', '.join(untimed)}"] if untimed else []
    notes += [f"timed on a CPU, not on {device}"] if device != "cpu" else []
    amount = f"about {round(known / 60)} minutes" if known >= 90 else f"about {known} seconds"
    if not known:
        amount = "unknown"
    elif mode not in EXPECTED_SECONDS or untimed:
        amount = f"more than {amount}"
    return (f"expected: {amount} on a quiet 2-core CPU{' (' + '; '.join(notes) + ')' if notes else ''}; "
            "a busy machine takes several times longer")


def chart(rows: list[dict], path: str, info: dict, mode: str) -> bool:
    """Bars of each system's median time per step over torch-loop's, whiskers from the fastest to
    the slowest turn; the title says what was run, where and when. Without matplotlib (an optional
    extra), prints how to get the chart and returns False."""
    if importlib.util.find_spec("matplotlib") is None:
        print(CHART_HINT.format(path=path))
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    bars = chart_bars(rows)
    fig, ax = plt.subplots(figsize=(2.4 * len(workloads) + 3, 5.0))
    width = 0.8 / len(bars)
    for k, (system, values) in enumerate(bars.items()):
        xs = [i + k * width for i in range(len(workloads))]
        medians = [m for m, _, _ in values]
        spread = [[m - lo for m, lo, _ in values], [hi - m for m, _, hi in values]]
        ax.bar(xs, medians, width, label=system, yerr=spread, capsize=2, error_kw={"linewidth": 0.7})
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))], workloads)
    ax.set_ylabel("time per step / torch-loop's median (lower is better)")
    ax.set_title(f"fbrain benchmark suite ({mode}): median of interleaved turns, whiskers min to max\n"
                 f"{info['cpu']}, {info['cores']} cores ({info['threads']} torch threads), torch {info['torch']}, "
                 f"{info['device']}{', ' + info['gpu'] if 'gpu' in info else ''}; {info['date']}", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


@contextlib.contextmanager
def contention(processes: int):
    """``processes`` CPU-bound processes (a Python busy loop each) running while the block runs: the
    suite on a busy machine, where thread pools and spinning kernels suffer."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield busy
    finally:
        for p in busy:
            p.kill()
            p.wait()


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--memory-probe"]:
        return memory_probe(argv[1], argv[2], argv[3], int(argv[4]))
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick", help="the default; ~9 min on a quiet 2-core CPU")
    size.add_argument("--full", dest="mode", action="store_const", const="full", help="more turns, larger ConvTasNet")
    size.add_argument("--tiny", dest="mode", action="store_const", const="tiny", help="one step each (for tests)")
    parser.add_argument("--out", default="bench-out", help="folder for results.json and chart.png")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), help="a subset to run")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-system peak-memory processes")
    parser.add_argument("--contended", nargs="?", type=int, const=2, default=0, metavar="N",
                        help="run N (default 2) CPU-bound processes beside the suite, as on a busy machine")
    args = parser.parse_args(argv)
    mode = args.mode or "quick"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    names = args.workloads or (FULL if mode == "full" else QUICK)
    info = {**machine(device), "contended": args.contended}
    os.makedirs(args.out, exist_ok=True)
    print(f"{mode} mode, {len(names)} workload{'s' * (len(names) != 1)} ({', '.join(names)}): "
          f"{expected_duration(mode, names, device.type)}", flush=True)
    start = time.perf_counter()
    rows, workload_seconds = [], {}
    with contention(args.contended), \
            tqdm(total=len(names) * MODES[mode][1], desc="benchmarks", unit="turn") as progress:
        for name in names:
            progress.set_postfix_str(name)
            began = time.perf_counter()
            rows += run_workload(name, device, mode, memory=not args.no_memory and mode != "tiny", progress=progress)
            workload_seconds[name] = time.perf_counter() - began
    table = markdown(rows, info)
    print(table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"machine": info, "mode": mode, "seconds": time.perf_counter() - start,
                   "workload_seconds": workload_seconds, "rows": rows}, f, indent=1)
    drawn = chart(rows, os.path.join(args.out, "chart.png"), info, mode)
    wrote = f"{args.out}/results.json and {args.out}/chart.png" if drawn else f"{args.out}/results.json"
    print(f"\nwrote {wrote} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
