"""Importing fbrain changes no global torch flag, not even when a recipe's ``sb.dataio...`` makes
fbrain import SpeechBrain (whose import turns TF32 on and TorchScript's profiling off). Run in
subprocesses: SpeechBrain's import changes global torch state."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

# Global torch state, read through torch's own API (both of its TF32 APIs, every fp32_precision
# node), not through fbrain's table of flags: the test must notice a flag that table misses.
SNAPSHOT = textwrap.dedent("""
    import torch
    from fbrain import torch_compat

    EXPRESSIONS = [
        "torch.backends.cuda.matmul.allow_tf32", "torch.backends.cudnn.allow_tf32",
        "torch.get_float32_matmul_precision()", "torch.backends.fp32_precision",
        "torch.backends.cuda.matmul.fp32_precision", "torch.backends.cudnn.fp32_precision",
        "torch.backends.cudnn.conv.fp32_precision", "torch.backends.cudnn.rnn.fp32_precision",
        "torch.backends.mkldnn.fp32_precision", "torch.backends.mkldnn.matmul.fp32_precision",
        "torch.backends.mkldnn.conv.fp32_precision", "torch.backends.mkldnn.rnn.fp32_precision",
        "torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction",
        "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction",
        "torch.backends.cudnn.benchmark", "torch.backends.cudnn.deterministic", "torch.backends.cudnn.enabled",
        "torch.backends.mkldnn.enabled", "torch.backends.opt_einsum.enabled",
        "torch.backends.cuda.flash_sdp_enabled()", "torch.backends.cuda.mem_efficient_sdp_enabled()",
        "torch.backends.cuda.math_sdp_enabled()", "torch.are_deterministic_algorithms_enabled()",
        "torch.get_default_dtype()", "torch.get_num_threads()", "torch.is_grad_enabled()",
        "torch.is_anomaly_enabled()", "torch_compat.jit_profiling()",
    ]

    def snapshot():
        out = {}
        for expression in EXPRESSIONS:
            try:
                out[expression] = repr(eval(expression))
            except AttributeError:  # not in this torch
                continue
            except RuntimeError as err:  # torch's two TF32 APIs disagree: a state no one can use
                out[expression] = f"unreadable: {err}"[:200]
        return out
""")


def run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SNAPSHOT + textwrap.dedent(script)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.speechbrain
@pytest.mark.parametrize("before", [
    "pass",  # torch's defaults
    "torch.backends.cudnn.allow_tf32 = False",  # a flag SpeechBrain turns on that is on by default
    "torch.set_float32_matmul_precision('medium')",  # the older TF32 API, another value
    "torch.backends.cuda.matmul.fp32_precision = 'ieee'",  # the newer TF32 API
])
def test_a_speechbrain_name_leaves_the_global_torch_flags_as_they_were(before):
    done = run(f"""
        import sys
        {before}
        flags = snapshot()
        import fbrain as sb
        sb.dataio.dataset  # SpeechBrain's module: fbrain imports SpeechBrain now
        assert "speechbrain" in sys.modules
        quirks = getattr(sys.modules.get("speechbrain.utils.quirks"), "applied_quirks", None)
        assert quirks is None or "allow_tf32" in quirks, quirks  # SpeechBrain did turn TF32 on
        after = snapshot()
        changed = {{k: (flags.get(k), after.get(k)) for k in flags.keys() | after.keys() if flags.get(k) != after.get(k)}}
        assert not changed, changed
        a = torch.ones(2, 2)
        assert torch.equal(a @ a, torch.full((2, 2), 2.0))  # and matmuls run
    """)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.speechbrain
def test_the_flags_fbrain_keeps_are_what_a_plain_speechbrain_import_changes():
    # SpeechBrain imported directly (not through fbrain) changes only flags fbrain's table names
    # (a SpeechBrain that changes another one fails here, naming it).
    done = run("""
        from fbrain.speechbrain_names import SPEECHBRAIN_FLAGS
        flags = snapshot()
        import speechbrain
        after = snapshot()
        changed = sorted(k for k in flags.keys() | after.keys() if flags.get(k) != after.get(k))
        # How each expression is named in the table: a dotted path under torch.backends, or a getter.
        covered = {"torch.get_float32_matmul_precision()": "float32_matmul_precision",
                   "torch_compat.jit_profiling()": "jit_profiling",
                   "torch.backends.cuda.matmul.allow_tf32": "float32_matmul_precision",
                   "torch.backends.cudnn.allow_tf32": "cudnn.allow_tf32"}
        missed = [k for k in changed if covered.get(k, k.removeprefix("torch.backends.")) not in SPEECHBRAIN_FLAGS]
        assert not missed, f"import speechbrain changed {missed}, which fbrain.speechbrain_names.SPEECHBRAIN_FLAGS lacks"
        print(changed)
    """)
    assert done.returncode == 0, done.stderr[-3000:]
