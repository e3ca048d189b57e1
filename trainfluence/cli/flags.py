"""Command-line flags generated from the settings dataclasses, and a parser whose usage errors are one line.

Every field of a settings dataclass becomes ``--PREFIX-NAME`` with its help text, its default and a type that
checks its :class:`~trainfluence.settings.Range` while parsing, so a bad number is refused before anything heavy
is imported.  Old spellings in a field's ``aliases`` are accepted with a note on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from typing import Any, NoReturn, Sequence

from ..settings import Range, flag_name, validate


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``trainfluence: error: …``), that takes options only as
    spelled (no abbreviations), and whose unknown options name the closest valid one — checked first, so a
    misspelled flag is named even when a required one is also missing."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"trainfluence: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        parser = self._subparser(argv) or self
        known = {s for a in parser._actions for s in a.option_strings}
        for token in argv:
            if token == "--":
                break
            name = token.split("=", 1)[0]
            if token.startswith("--") and name not in known:
                # the closest spelling, old ones included, suggested by its current name
                current = {s: getattr(a, "new", s) for a in parser._actions for s in a.option_strings}
                close = difflib.get_close_matches(name, sorted(current), n=1, cutoff=0.6)
                parser.error(f"unknown option {name}" + (f" (did you mean {current[close[0]]}?)" if close else ""))
        parsed, extras = self.parse_known_args(argv, namespace)
        if extras:
            parser.error(f"unexpected argument {extras[0]}")
        return parsed

    def _subparser(self, argv: list[str]) -> argparse.ArgumentParser | None:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return next((action.choices[t] for t in argv if t in action.choices), None)
        return None


def checked(rng: Range, flag: str = ""):
    """An argparse ``type`` that parses and range-checks a value."""

    def parse(text: str) -> Any:
        try:
            return rng.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = flag or "value"
    return parse


class _Deprecated(argparse.Action):
    """An old spelling: stores into the new option's destination and says so on stderr."""

    def __init__(self, *args: Any, new: str = "", **kwargs: Any):
        self.new = new
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        print(f"trainfluence: note: {option_string} is now {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def _default_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def add_settings(group: Any, cls: type, *, prefix: str = "", dest_prefix: str = "", skip: Sequence[str] = (),
                 defaults: dict[str, Any] | None = None, default_text: str | None = None) -> None:
    """One flag per CLI field of settings dataclass ``cls``.  Flags not given leave no attribute (so a base — the
    checkpoint's settings, say — can supply the value); ``defaults`` only changes what ``--help`` states, and
    ``default_text`` replaces the stated default of every flag (e.g. "the checkpoint's")."""
    base = cls()
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        flag = flag_name(f, prefix)
        default = (defaults or {}).get(f.name, getattr(base, f.name))
        stated = _default_text(default) if f.name in (defaults or {}) or not default_text else default_text
        help_text = f"{f.metadata.get('help', '')} (default {stated})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": dest_prefix + f.name, "default": argparse.SUPPRESS, "help": help_text}
        rng, choices = f.metadata.get("range"), f.metadata.get("choices")
        if isinstance(base.__dict__.get(f.name), bool) or f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if isinstance(getattr(base, f.name), list):
                kwargs["nargs"] = "+"
                kwargs["metavar"] = "NAME"
            if rng is not None:
                kwargs["type"] = checked(rng, flag)
                kwargs.setdefault("metavar", f.name.split("_")[-1].upper())
            if choices:
                kwargs["choices"] = choices
                kwargs.pop("metavar", None) if "nargs" not in kwargs else None
        group.add_argument(flag, **kwargs)
        for old in f.metadata.get("aliases", ()):
            alias(group, f"--{prefix}{old}", flag, **{k: v for k, v in kwargs.items() if k in ("dest", "type", "nargs", "choices")})


def alias(group: Any, old: str, new: str, **kwargs: Any) -> None:
    """Accept the old spelling ``old`` of option ``new`` (hidden from --help; a note on stderr when used).
    ``kwargs``: ``dest`` and the ``type``/``nargs``/``choices`` of the new option."""
    group.add_argument(old, default=argparse.SUPPRESS, help=argparse.SUPPRESS, action=_Deprecated, new=new, **kwargs)


def given(args: argparse.Namespace, cls: type, *, dest_prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` the user gave on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k[len(dest_prefix):]: v for k, v in vars(args).items()
            if k.startswith(dest_prefix) and k[len(dest_prefix):] in names}


def settings_from(args: argparse.Namespace, cls: type, *, dest_prefix: str = "", prefix: str = "",
                  base: Any = None) -> Any:
    """``base`` (default: ``cls()``) with the flags the user gave applied, validated."""
    obj = dataclasses.replace(base if base is not None else cls(), **given(args, cls, dest_prefix=dest_prefix))
    return validate(obj, prefix=prefix)


def number(rng: Range, flag: str) -> Any:
    """An argparse ``type`` for a plain (non-settings) numeric option."""
    return checked(rng, flag)
