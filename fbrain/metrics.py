"""``MetricStats``: collect a per-example metric over a stage and summarise it.

Interface of ``speechbrain.utils.metric_stats.MetricStats``: ``append(ids, *args, **kwargs)``
calls ``metric(*args, **kwargs)`` (one score per example), ``summarize(field=None)``,
``clear()``, ``write_stats(filestream)``.

Example::

    >>> import torch
    >>> from fbrain.metrics import MetricStats
    >>> stats = MetricStats(metric=lambda pred, target: (pred - target).abs().mean(dim=1))
    >>> stats.append(["a", "b"], torch.tensor([[1.0], [3.0]]), torch.zeros(2, 1))
    >>> stats.summarize()
    {'average': 2.0, 'min_score': 1.0, 'min_id': 'a', 'max_score': 3.0, 'max_id': 'b'}
    >>> stats.summarize("average")
    2.0
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class MetricStats:
    """Scores of ``metric`` per example id, kept until :meth:`clear`.

    Args:
        metric: ``metric(*args, **kwargs) -> scores``, one score per example of the batch
            (a 1-D tensor or a sequence of numbers).
        n_jobs: accepted for SpeechBrain compatibility; scores are computed in this process.
        batch_eval: True (default) calls ``metric`` once per batch; False once per example, with
            every tensor argument indexed by the example's position.
    """

    def __init__(self, metric: Callable, n_jobs: int = 1, batch_eval: bool = True):
        if not callable(metric):
            raise TypeError(f"MetricStats: metric must be callable, got {metric!r}")
        self.metric, self.n_jobs, self.batch_eval = metric, n_jobs, batch_eval
        self.clear()

    def clear(self) -> None:
        self.scores: list[float] = []
        self.ids: list = []
        self.summary: dict = {}

    def append(self, ids: Sequence, *args, **kwargs) -> None:
        """Score a batch; ``ids`` names its examples in order."""
        ids = list(ids)
        if self.batch_eval:
            scores = self.metric(*args, **kwargs)
        else:
            pick = lambda x, i: x[i] if isinstance(x, torch.Tensor) else x  # noqa: E731
            scores = [self.metric(*(pick(a, i) for a in args), **{k: pick(v, i) for k, v in kwargs.items()})
                      for i in range(len(ids))]
        values = _as_floats(scores)
        if len(values) != len(ids):
            raise ValueError(
                f"MetricStats.append: the metric returned {len(values)} scores for {len(ids)} ids; "
                "expected one score per example"
            )
        self.ids.extend(ids)
        self.scores.extend(values)

    def summarize(self, field: str | None = None):
        """``{average, min_score, min_id, max_score, max_id}``, or one of them when ``field`` is given."""
        if not self.scores:
            raise ValueError("MetricStats.summarize: no scores yet (call append first)")
        lo = min(range(len(self.scores)), key=self.scores.__getitem__)
        hi = max(range(len(self.scores)), key=self.scores.__getitem__)
        self.summary = {
            "average": sum(self.scores) / len(self.scores),
            "min_score": self.scores[lo], "min_id": self.ids[lo],
            "max_score": self.scores[hi], "max_id": self.ids[hi],
        }
        if field is None:
            return self.summary
        if field not in self.summary:
            raise KeyError(f"MetricStats.summarize: unknown field {field!r}; fields: {sorted(self.summary)}")
        return self.summary[field]

    def write_stats(self, filestream, verbose: bool = False) -> None:
        """Write the summary and every example's score to an open text file."""
        if not self.summary:
            self.summarize()
        lines = [f"Average score: {self.summary['average']}",
                 f"Min error: {self.summary['min_score']} id: {self.summary['min_id']}",
                 f"Max error: {self.summary['max_score']} id: {self.summary['max_id']}"]
        lines += [f"{i}: {s}" for i, s in zip(self.ids, self.scores)]
        text = "\n".join(lines) + "\n"
        filestream.write(text)
        if verbose:
            print(text, end="")


def _as_floats(scores) -> list[float]:
    if isinstance(scores, torch.Tensor):
        # One host read per batch: metrics are reported, not trained on.
        return [float(x) for x in scores.detach().reshape(-1).cpu().tolist()]
    return [float(s) for s in scores]
