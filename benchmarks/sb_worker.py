"""The SpeechBrain side of the benchmark, in its own process (SpeechBrain changes global torch flags).

Reads JSON requests on stdin, one per line: {"op": "ready"}, {"op": "run", "steps": N} (train N steps
with speechbrain.Brain.fit, reply with the seconds taken), {"op": "loss"} (the last loss), {"op": "memory"} (this process's peak memory, MB).
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    workload_name, device, n_batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import speechbrain as sb
    import torch

    from benchmarks.systems import LR, NO_CLIP, Batches
    from benchmarks.workloads import WORKLOADS

    workload = WORKLOADS[workload_name]
    batches = Batches(workload, n_batches, torch.device(device))
    loss_of = workload.loss

    class Timed(sb.Brain):
        def compute_forward(self, batch, stage):
            return batch

        def compute_objectives(self, predictions, batch, stage):
            return loss_of(self.modules.model, batch)

        def init_optimizers(self):
            # fit() calls this every time; keep one optimizer so Adam's moments carry over.
            if getattr(self, "optimizer", None) is None:
                super().init_optimizers()

        def on_fit_batch_end(self, batch, outputs, loss, should_step):
            self.last_loss = loss

    brain = Timed(modules={"model": workload.build()}, opt_class=lambda p: torch.optim.Adam(p, lr=LR),
                  run_opts={"device": device, "noprogressbar": True, "max_grad_norm": NO_CLIP})
    position, epoch = 0, 0
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "ready":
                reply = {"ok": True}
            elif request["op"] == "run":
                steps = request["steps"]
                loader = torch.utils.data.DataLoader([batches[position + k] for k in range(steps)], batch_size=None)
                start = time.perf_counter()
                brain.fit(range(epoch, epoch + 1), loader, progressbar=False)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                reply = {"seconds": time.perf_counter() - start}
                position += steps
                epoch += 1
            elif request["op"] == "loss":
                reply = {"loss": float(brain.last_loss.detach())}
            elif request["op"] == "memory":
                from benchmarks.suite import peak_memory_mb

                reply = {"peak_mem_mb": peak_memory_mb(torch.device(device))}
            else:
                reply = {"error": f"unknown request {request!r}"}
        except Exception as err:  # report to the parent rather than dying silently
            reply = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
