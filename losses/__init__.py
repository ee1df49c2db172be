"""Training objectives for the recipes (installed as ``fbrain.losses``).

Every loss is batched (no Python loop over examples), pure (inputs are never written to),
works in float32 and float64, and is differentiable under ``torch.func.grad`` and ``vmap``.

- :mod:`.si_snr`: ``si_snr``, ``si_snr_improvement``, ``pairwise_neg_si_snr``
- :mod:`.pit`: ``pit`` for any number of sources, ``reorder_sources``
- :mod:`.pit_si_snr`: SpeechBrain's ``get_si_snr_with_pitwrapper``
- :mod:`.masked`: ``mse_loss`` and ``l1_loss`` with relative lengths
- :mod:`.stoi`: ``stoi``, agreeing with ``pystoi``
"""

from .masked import l1_loss, length_mask, mse_loss
from .pit import permutation_table, pit, pit_from_matrix, reorder_sources
from .pit_si_snr import get_si_snr_with_pitwrapper
from .si_snr import pairwise_neg_si_snr, si_snr, si_snr_improvement
from .stoi import stoi

__all__ = [
    "get_si_snr_with_pitwrapper", "l1_loss", "length_mask", "mse_loss", "pairwise_neg_si_snr",
    "permutation_table", "pit", "pit_from_matrix", "reorder_sources", "si_snr",
    "si_snr_improvement", "stoi",
]
