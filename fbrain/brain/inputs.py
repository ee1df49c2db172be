"""The Brain's own arguments, checked where they enter (the run options have their table in
:mod:`fbrain.brain.run_options`). Each check returns the value to use or raises naming the
argument, what was expected and what to do; nothing is coerced silently.

Example::

    >>> from fbrain.brain.inputs import checked_seed
    >>> checked_seed({"seed": 1234}), checked_seed({})
    (1234, 0)
    >>> checked_seed({"seed": "42"})
    Traceback (most recent call last):
    ...
    TypeError: hparams['seed']: expected an int in [0, 2**63), got '42' (str); in YAML write it without quotes
"""

from __future__ import annotations

from typing import Any, Mapping

_SEED_LIMIT = 2**63  # the Brain's generators take a 64-bit signed seed


def checked_seed(hparams: Mapping | None) -> int:
    """``hparams["seed"]`` (0 when absent): the seed of the Brain's data order and random key."""
    seed = (hparams or {}).get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT:
        hint = "; in YAML write it without quotes" if isinstance(seed, str) and seed.strip().isdigit() else ""
        error = TypeError if not isinstance(seed, int) or isinstance(seed, bool) else ValueError
        raise error(f"hparams['seed']: expected an int in [0, 2**63), got {seed!r} ({type(seed).__name__}){hint}")
    return seed


_CHECKPOINTER_METHODS = ("add_recoverable", "recover_if_possible", "save_and_keep_only")


def checked_checkpointer(checkpointer: Any) -> Any:
    """None, or a Checkpointer (fbrain's, SpeechBrain's, or anything with their methods)."""
    if checkpointer is None:
        return None
    missing = [m for m in _CHECKPOINTER_METHODS if not callable(getattr(checkpointer, m, None))]
    if missing:
        made = (f"; to keep checkpoints in {checkpointer!r}, pass checkpointer=sb.Checkpointer({checkpointer!r})"
                if isinstance(checkpointer, (str, bytes)) or hasattr(checkpointer, "__fspath__") else "")
        raise TypeError(f"checkpointer: expected a Checkpointer (with {', '.join(_CHECKPOINTER_METHODS)}), got "
                        f"{type(checkpointer).__name__}{made}")
    return checkpointer


def registration_conflict(checkpointer: Any, brain_type: type) -> str | None:
    """Why a Brain cannot register itself as the recoverable ``"brain"`` of ``checkpointer``
    (an object other than a Brain holds the name), or None."""
    held = getattr(checkpointer, "recoverables", {}).get("brain")
    if held is None or isinstance(held, brain_type):
        return None  # free, or a Brain (the newest Brain on a checkpointer owns the name)
    return (f"checkpointer: its recoverable 'brain' is a {type(held).__name__}, but the Brain registers itself "
            "under that name (its optimizer state, counters and where the epoch stands), so checkpoints "
            "would miss them; register that object under another name (e.g. 'model')")


def checked_epoch_counter(epoch_counter: Any) -> Any:
    """What ``fit`` iterates over for its epochs."""
    try:
        iter(epoch_counter)
    except TypeError:
        hint = f" (for {epoch_counter} epochs: range(1, {epoch_counter + 1}) or sb.EpochCounter({epoch_counter}))" \
            if isinstance(epoch_counter, int) and not isinstance(epoch_counter, bool) else ""
        raise TypeError(f"fit: epoch_counter: expected an iterable of epoch numbers such as an EpochCounter or a "
                        f"range, got {type(epoch_counter).__name__}{hint}") from None
    return epoch_counter
