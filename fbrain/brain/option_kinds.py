"""The kinds of value a run option takes: each one reads text (the command line, ``$FBRAIN_RUN_OPTS``)
and checks a Python value (``run_opts``, hparams), so every source is held to the same type and range.

A kind's ``from_text`` turns a string into a value, ``check`` returns the value (ints widened to
float where a float is expected) or raises ``ValueError`` saying what was expected. Nothing is
coerced silently: ``"False"`` (a string) is not a boolean, ``nan`` is not a learning-rate-like number,
``42.0`` is not an int.

Example::

    >>> from fbrain.brain.option_kinds import Flag, Integer, Union, Choice
    >>> Flag().from_text("off"), Integer(minimum=1).from_text("4")
    (False, 4)
    >>> Union(Flag(), Choice("auto")).from_text("true")
    True
    >>> Integer(minimum=1).check(0)
    Traceback (most recent call last):
    ...
    ValueError: expected an int >= 1, got 0
"""

from __future__ import annotations

import math
from typing import Any

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null", "~")


class Kind:
    """What one option accepts. Subclasses set ``expected`` (for messages) and the two readers."""

    expected = "a value"

    def from_text(self, text: str) -> Any:
        raise NotImplementedError

    def check(self, value: Any) -> Any:
        raise NotImplementedError

    def fail(self, got: Any) -> ValueError:
        return ValueError(f"expected {self.expected}, got {got!r}")

    def _converted(self, convert, text: str) -> Any:
        """``convert(text)`` checked; a text ``convert`` refuses fails as this kind."""
        try:
            value = convert(text.strip())
        except ValueError:
            raise self.fail(text) from None
        return self.check(value)


class Flag(Kind):
    """True or False; as text ``true/false``, ``yes/no``, ``on/off``, ``1/0`` (any case)."""

    expected = "true or false"
    words = ("true", "false")

    def from_text(self, text: str) -> bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise self.fail(text)

    def check(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        raise self.fail(value)


class Integer(Kind):
    """An int (not a bool, not a float) at least ``minimum``."""

    def __init__(self, minimum: int | None = None):
        self.minimum = minimum
        self.expected = "an int" + ("" if minimum is None else f" >= {minimum}")

    def from_text(self, text: str) -> int:
        return self._converted(int, text)

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(value)
        if self.minimum is not None and value < self.minimum:
            raise self.fail(value)
        return value


class Number(Kind):
    """A finite float (an int is widened) in ``[minimum, maximum]``."""

    def __init__(self, minimum: float | None = None, maximum: float | None = None):
        self.minimum, self.maximum = minimum, maximum
        if minimum is not None and maximum is not None:
            bounds = f" in [{minimum:g}, {maximum:g}]"
        elif minimum is not None:
            bounds = f" >= {minimum:g}"
        else:
            bounds = "" if maximum is None else f" <= {maximum:g}"
        self.expected = "a finite number" + bounds

    def from_text(self, text: str) -> float:
        return self._converted(float, text)

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(value)
        value = float(value)
        if not math.isfinite(value) or (self.minimum is not None and value < self.minimum) \
                or (self.maximum is not None and value > self.maximum):
            raise self.fail(value)
        return value


class Choice(Kind):
    """One of a few strings, exactly as written."""

    def __init__(self, *values: str):
        self.values = self.words = values
        self.expected = "one of " + ", ".join(values)

    def from_text(self, text: str) -> str:
        return self.check(text.strip())

    def check(self, value: Any) -> str:
        if isinstance(value, str) and value in self.values:
            return value
        raise self.fail(value)


class Text(Kind):
    """Any non-empty string (a device name, a file path)."""

    expected = "a non-empty string"

    def from_text(self, text: str) -> str:
        return self.check(text.strip())

    def check(self, value: Any) -> str:
        if isinstance(value, str) and value:
            return value
        raise self.fail(value)


class Names(Kind):
    """A list of strings (module keys); as text, separated by commas or spaces."""

    expected = "a list of names"

    def from_text(self, text: str) -> list[str]:
        return self.check([part for part in text.replace(",", " ").split() if part])

    def check(self, value: Any) -> list[str]:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
            return list(value)
        raise self.fail(value)


class StageColours(Kind):
    """tqdm colours per stage, ``{"train": ..., "valid": ..., "test": ...}`` (from hparams only)."""

    expected = "a dict of train/valid/test colours"

    def from_text(self, text: str):
        raise ValueError("a dict cannot be given as text; set it in the hparams YAML")

    def check(self, value: Any) -> dict:
        if isinstance(value, dict) and set(value) <= {"train", "valid", "test"} \
                and all(isinstance(v, str) or v is None for v in value.values()):
            return dict(value)
        raise self.fail(value)


class Union(Kind):
    """The first of ``kinds`` that accepts the value (e.g. a flag or ``"auto"``)."""

    def __init__(self, *kinds: Kind):
        self.kinds = kinds
        if all(hasattr(k, "words") for k in kinds):  # kinds of a few words each: "true, false or auto"
            words = [word for k in kinds for word in k.words]
            self.expected = ", ".join(words[:-1]) + " or " + words[-1]
        else:
            self.expected = " or ".join(k.expected for k in kinds)

    def _first(self, read: str, value: Any) -> Any:
        for kind in self.kinds:
            try:
                return getattr(kind, read)(value)
            except ValueError:
                continue
        raise self.fail(value)

    def from_text(self, text: str) -> Any:
        return self._first("from_text", text)

    def check(self, value: Any) -> Any:
        return self._first("check", value)


class Optional(Kind):
    """``None`` (as text ``none``/``null``), or what ``kind`` accepts."""

    def __init__(self, kind: Kind):
        self.kind = kind
        self.expected = f"{kind.expected}, or none"

    def from_text(self, text: str) -> Any:
        if text.strip().lower() in _NONE:
            return None
        return self._named(self.kind.from_text, text)

    def check(self, value: Any) -> Any:
        return None if value is None else self._named(self.kind.check, value)

    def _named(self, read, value):
        try:
            return read(value)
        except ValueError:
            raise self.fail(value) from None
