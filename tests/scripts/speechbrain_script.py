"""Runs one of SpeechBrain's own training scripts, unmodified, with SpeechBrain's Brain or fbrain's.

usage: python speechbrain_script.py {speechbrain|fbrain|import-fbrain} SCRIPT.py HPARAMS.yaml [--key=value ...]

Why it exists: fbrain.Brain claims to be a drop-in for speechbrain.Brain, and the real test of that is
SpeechBrain's real scripts (tests/test_speechbrain_scripts.py runs each one both ways and compares
the train_log.txt). With ``fbrain`` the only change is ``speechbrain.Brain = speechbrain.core.Brain =
fbrain.Brain`` before the script runs; the script file itself is executed in place, as ``__main__``,
from its own folder (so its ``import custom_model`` / ``from prepare_data import ...`` resolve) with
``sys.argv = [SCRIPT.py, HPARAMS.yaml, overrides...]``. With ``import-fbrain`` the script's source is run
with its ``import speechbrain as sb`` line read as ``import fbrain as sb`` (the README's one-line port;
the file on disk is untouched), so every ``sb.`` name it uses resolves through fbrain.

Three environment variables cover what no command-line override can:
  SPEECHBRAIN_SCRIPT_SHIMS  folders put on sys.path ahead of the script's own (os.pathsep-separated),
                            e.g. for a helper module the script folder's copy lacks;
  SPEECHBRAIN_SCRIPT_DROP   comma-separated top-level hparams keys removed after the YAML is loaded
                            (a script that tests ``"key" in hparams`` cannot be switched off otherwise);
  SPEECHBRAIN_SCRIPT_CONSTANT_POOLING_NOISE  when set, StatisticsPooling's Gaussian noise (which it
                            draws inside the model from the global generator, where fbrain's Brain
                            draws from its state's key) is one constant, in both Brains' runs: the
                            comparison's way of making that randomness deterministic.
"""

import os
import runpy
import sys

brain, script, *args = sys.argv[1:]
if brain not in ("speechbrain", "fbrain", "import-fbrain"):
    sys.exit(__doc__)
script = os.path.abspath(script)
folder = os.path.dirname(script)
shims = [os.path.abspath(p) for p in os.environ.get("SPEECHBRAIN_SCRIPT_SHIMS", "").split(os.pathsep) if p]
sys.path[:1] = shims + [folder]  # in place of this runner's own folder, as `python SCRIPT.py` would have it
sys.dont_write_bytecode = True  # no __pycache__ in the scripts' (shared, read-only) folders
os.chdir(folder)

import speechbrain  # noqa: E402

if brain == "fbrain":
    import fbrain

    speechbrain.Brain = speechbrain.core.Brain = fbrain.Brain

if os.environ.get("SPEECHBRAIN_SCRIPT_CONSTANT_POOLING_NOISE"):
    import speechbrain.nnet.pooling
    import torch

    def constant_noise(self, shape, device="cpu"):
        return torch.full(shape, 5 * self.eps, device=device)  # the middle of its 1..9 x eps range

    speechbrain.nnet.pooling.StatisticsPooling._get_gauss_noise = constant_noise

drop = [key for key in os.environ.get("SPEECHBRAIN_SCRIPT_DROP", "").split(",") if key]
if drop:
    import hyperpyyaml

    def load_hyperpyyaml(*a, _load=hyperpyyaml.load_hyperpyyaml, **kw):
        hparams = _load(*a, **kw)
        for key in drop:
            hparams.pop(key, None)
        return hparams

    hyperpyyaml.load_hyperpyyaml = load_hyperpyyaml

sys.argv = [script, *args]
if brain == "import-fbrain":
    with open(script) as f:
        source = f.read()
    if "import speechbrain as sb\n" not in source:
        sys.exit(f"{script}: has no line `import speechbrain as sb` to port")
    code = compile(source.replace("import speechbrain as sb\n", "import fbrain as sb\n", 1), script, "exec")
    exec(code, {"__name__": "__main__", "__file__": script, "__builtins__": __builtins__})
else:
    runpy.run_path(script, run_name="__main__")
