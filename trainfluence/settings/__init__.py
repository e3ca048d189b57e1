"""Settings: every stage's options as a dataclass, each field with its default, its help text and the values it
accepts, saved as JSON beside the results and compared on reuse.

This package imports neither torch nor numpy, so the command line can build its parsers, print ``--help`` and
reject a bad flag before any heavy import.  One owner per option: the command line generates its flags from these
fields (:mod:`trainfluence.cli.flags`), the Python API validates the same fields with :func:`validate`.

    @dataclass
    class LissaSettings:
        depth: int = option(100, "recursion steps", POSITIVE_INT)

A field's :class:`Range` decides what is accepted; a value outside it is a :class:`~trainfluence.errors.UserError`
(API) or a one-line usage error (CLI) naming the option — never a silent fallback (0 never means "default").
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: a finite number (an integer when ``integer``) in [low, high] (ends
    excluded when ``*_open``), one of the ``words`` (e.g. ``"auto"``), or None when ``none``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    words: tuple[str, ...] = ()
    none: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low == 0 and self.low_open and self.high is None:
            kind = "a positive integer" if self.integer else "a positive finite number"
        elif self.low == 1 and self.integer and self.high is None:
            kind = "a positive integer"
        elif self.low == 0 and self.high is None:
            kind = "a non-negative integer" if self.integer else "a non-negative finite number"
        elif self.low is not None or self.high is not None:
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            kind += f" in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
        extra = [f"'{w}'" for w in self.words] + (["none"] if self.none else [])
        return kind + (f" or {' or '.join(extra)}" if extra else "")

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not accepted (None when it is)."""
        if value is None:
            return None if self.none else f"must be {self.describe()}"
        if isinstance(value, str):
            return None if value in self.words else f"must be {self.describe()}, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {self.describe()}, got {value!r}"
        if not math.isfinite(value):
            return f"must be {self.describe()}, got {value}"
        if self.integer and value != int(value):
            return f"must be {self.describe()}, got {value}"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"must be {self.describe()}, got {value:g}"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return f"must be {self.describe()}, got {value:g}"
        return None

    def parse(self, text: str) -> Any:
        """A command-line string → the value (raises ValueError with the reason)."""
        if text in self.words:
            return text
        if self.none and text.lower() == "none":
            return None
        try:
            value: Any = float(text)
        except ValueError:
            raise ValueError(f"must be {self.describe()}, got {text!r}") from None
        if self.integer and math.isfinite(value) and value == int(value):
            value = int(value)
        reason = self.problem(value)
        if reason:
            raise ValueError(reason)
        return value


POSITIVE_INT = Range(low=1, integer=True)
NONNEG_INT = Range(low=0, integer=True)
ANY_INT = Range(integer=True)
POSITIVE = Range(low=0, low_open=True)
NONNEG = Range(low=0)
FRACTION = Range(low=0, high=1)


def option(default: Any, help: str, range: Range | None = None, *, choices: tuple[str, ...] | None = None,
           flag: str | None = None, cli: bool = True, aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its help text and accepted values.  ``flag``: the command-line spelling when it is
    not the field name with dashes; ``aliases``: old spellings still accepted (with a deprecation note);
    ``cli=False`` keeps it out of the command line.  List defaults are copied per instance."""
    meta = {"help": help, "range": range, "choices": choices, "flag": flag, "cli": cli, "aliases": aliases}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def validate(obj: Any, *, prefix: str = "") -> Any:
    """Check every field of settings dataclass ``obj`` against its range and choices; returns ``obj``.
    Raises :class:`UserError` naming the option as its command-line flag (``--PREFIX-NAME``) on the first bad
    value, then runs the dataclass's own ``check()`` for rules across fields."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = flag_name(f, prefix)
        rng, choices = f.metadata.get("range"), f.metadata.get("choices")
        if rng is not None:
            reason = rng.problem(value)
            if reason:
                raise UserError(f"{name} {reason}")
        if choices and value is not None:
            values = value if isinstance(value, (list, tuple)) else [value]
            bad = [v for v in values if v not in choices]
            if bad:
                raise UserError(f"{name}: unknown value {bad[0]!r}: use {', '.join(choices)}")
    check = getattr(obj, "check", None)
    if callable(check):
        check()
    return obj


def flag_name(f: dataclasses.Field, prefix: str = "") -> str:
    """``--PREFIX`` + the field's flag (its name with dashes unless the field says otherwise)."""
    return "--" + prefix + (f.metadata.get("flag") or f.name.replace("_", "-"))


def help_text(cls: type, name: str) -> str:
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


# ---- JSON ------------------------------------------------------------------------------------------------------
def to_dict(obj: Any) -> Any:
    """Recursively turn dataclasses, tuples and paths into JSON-ready values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    return obj


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from a dict, ignoring unknown keys (older/newer files stay readable)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def canonical_json(obj: Any) -> str:
    """The one canonical text of a value: sorted keys, no spaces (what fingerprints hash)."""
    return json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
