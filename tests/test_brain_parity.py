"""fbrain.Brain and speechbrain.Brain give the same fp32 loss curve (SpeechBrain runs in a subprocess:
importing it turns on TF32 and patches the DataLoader)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.speechbrain  # every test here runs SpeechBrain

# The experiment, as source: executed here with `sb = fbrain` and in the subprocess with `sb = speechbrain`.
CASE = textwrap.dedent('''
    import torch

    class ConvModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv1d(1, 4, kernel_size=5, padding=2, bias=False)
            self.norm = torch.nn.BatchNorm1d(4)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.relu(self.norm(self.conv(x.unsqueeze(1)))).mean(dim=-1))

    def make_data():
        g = torch.Generator().manual_seed(1)
        return [{"x": torch.randn(32, generator=g), "y": torch.randn(2, generator=g)} for _ in range(40)]

    def make_brains(sb):
        class ConvBrain(sb.Brain):
            def compute_forward(self, batch, stage):
                return self.modules.model(batch["x"])

            def compute_objectives(self, predictions, batch, stage):
                return torch.nn.functional.mse_loss(predictions, batch["y"])

            def on_fit_batch_end(self, batch, outputs, loss, should_step):
                self.losses.append(float(loss))

            def on_stage_end(self, stage, stage_loss, epoch=None):
                self.stage_losses.append([stage.name, float(stage_loss)])

        class ImperativeBrain(ConvBrain):
            def fit_batch(self, batch):
                outputs = self.compute_forward(batch, sb.Stage.TRAIN)
                loss = self.compute_objectives(outputs, batch, sb.Stage.TRAIN)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.modules.parameters(), 5.0)
                self.optimizer.step()
                self.optimizer.zero_grad()
                self.losses.append(float(loss.detach()))
                return loss.detach()

        return ConvBrain, ImperativeBrain

    def run(sb, kind):
        brains = make_brains(sb)
        cls = brains[0] if kind == "default" else brains[1]
        brain = cls({"model": ConvModel()}, opt_class=lambda p: torch.optim.Adam(p, lr=1e-2),
                    run_opts={"device": "cpu", "max_grad_norm": 5.0, "noprogressbar": True})
        brain.losses, brain.stage_losses = [], []
        data = make_data()
        brain.fit(range(3), data, valid_set=data[:16], train_loader_kwargs={"batch_size": 8},
                  valid_loader_kwargs={"batch_size": 8})
        test_loss = brain.evaluate(data[16:], test_loader_kwargs={"batch_size": 8})
        return {"losses": brain.losses, "stages": brain.stage_losses, "test": float(test_loss)}
''')


def run_fbrain(kind: str) -> dict:
    import fbrain

    namespace: dict = {}
    exec(CASE, namespace)
    return namespace["run"](fbrain, kind)


def run_speechbrain(kind: str, tmp_path) -> dict:
    out = tmp_path / f"sb_{kind}.json"
    script = CASE + textwrap.dedent(f'''
        import json, speechbrain
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        json.dump(run(speechbrain, {kind!r}), open({str(out)!r}, "w"))
    ''')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"the SpeechBrain run failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("kind", ["default", "imperative"])
def test_loss_curve_matches_speechbrain_in_fp32(kind, tmp_path):
    ours = run_fbrain(kind)
    theirs = run_speechbrain(kind, tmp_path)
    assert len(ours["losses"]) == len(theirs["losses"]) == 15  # 3 epochs x 5 batches
    diffs = [abs(a - b) for a, b in zip(ours["losses"], theirs["losses"])]
    assert max(diffs) < 1e-5, diffs
    # The loss must actually move, or equal curves would prove nothing.
    assert abs(ours["losses"][0] - ours["losses"][-1]) > 1e-3
    assert [s for s, _ in ours["stages"]] == [s for s, _ in theirs["stages"]]
    for (_, a), (_, b) in zip(ours["stages"], theirs["stages"]):
        assert abs(a - b) < 1e-5
    assert abs(ours["test"] - theirs["test"]) < 1e-5


def test_fbrain_leaves_global_torch_flags_alone():
    script = ("import torch; before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, "
              "torch.get_float32_matmul_precision()); import fbrain; "
              "after = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, "
              "torch.get_float32_matmul_precision()); print(before == after, after)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("True"), done.stdout + done.stderr


def test_fit_does_not_touch_the_global_rng():
    before = torch.get_rng_state()
    run_fbrain("default")
    # The case seeds the model with torch.manual_seed; restore-and-compare around fit only.
    torch.set_rng_state(before)
    import fbrain

    namespace: dict = {}
    exec(CASE, namespace)
    ConvBrain, _ = namespace["make_brains"](fbrain)
    brain = ConvBrain({"model": namespace["ConvModel"]()}, opt_class=lambda p: torch.optim.Adam(p, lr=1e-2),
                      run_opts={"noprogressbar": True})
    brain.losses, brain.stage_losses = [], []
    state = torch.get_rng_state()
    brain.fit(range(2), namespace["make_data"](), train_loader_kwargs={"batch_size": 8, "shuffle": True})
    assert torch.equal(torch.get_rng_state(), state)
