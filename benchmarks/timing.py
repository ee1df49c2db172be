"""Interleaved timing: run systems A B C A B C ... and report medians, so that a noisy, shared
machine slows every system alike instead of whichever happened to run during the noise."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(systems: dict[str, Callable[[], None]], *, steps: int, repeats: int, warmup: int = 3,
                sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Microseconds per call of each system: ``repeats`` samples of ``steps`` calls each."""
    for fn in systems.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(repeats):
        for name, fn in systems.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / steps * 1e6)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}
