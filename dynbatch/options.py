"""The one options mechanism: a dataclass per set of options (the trainer's ``TrainConfig``, each method's options),
one :func:`option` field per option, declared once. From it come the library's typed defaults and validation, the
command line's flag, parser, default and help (:func:`cli_spec`), and the keys of config files.

Errors name the field (``bs_min``): a library user never typed a flag. The command line says the flag instead
(:meth:`OptionError.for_cli`), so one message serves both.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import field
from typing import Any, Callable

from dynbatch.errors import UserError

_FIELD = re.compile(r"\{([a-z][a-z0-9_]*)\}")


class OptionError(UserError):
    """A bad option value. The message is a template whose ``{name}`` fields are option names: ``str()`` shows the
    names, :meth:`for_cli` the command-line flags."""

    def __init__(self, template: str):
        self.template = template
        super().__init__(_FIELD.sub(lambda m: m.group(1), template))

    def for_cli(self, flag_of: Callable[[str], str] | None = None) -> str:
        flag_of = flag_of or (lambda name: "--" + name.replace("_", "-"))
        return _FIELD.sub(lambda m: flag_of(m.group(1)), self.template)


def option(default: Any, help: str, *, check: Callable | None = None, flag: str | None = None,
           parse: Callable[[str], Any] | None = None, group: str | None = None):
    """A dataclass field: its default, help text, value check (``check(name, value)``, see :func:`positive` and the
    others below), and, for the command line, its flag (default ``--<name>``), parser (default: from the type) and
    help group."""
    return field(default=default, metadata={"help": help, "check": check, "flag": flag, "parse": parse,
                                            "group": group})


# ---- value checks: each raises OptionError naming the field, its range and an example -----------------------------
def positive(hint: str = "give a value of 1 or more"):
    def check(name, v):
        if v is not None and not v > 0:
            raise OptionError(f"{{{name}}} must be positive (got {v}); {hint}")
    return check


def at_least(lo, hint: str | None = None):
    def check(name, v):
        if v is not None and v < lo:
            raise OptionError(f"{{{name}}} must be at least {lo} (got {v}); {hint or f'give a value of {lo} or more'}")
    return check


def non_negative(hint: str):
    def check(name, v):
        if v is not None and v < 0:
            raise OptionError(f"{{{name}}} must be non-negative (got {v}); {hint}")
    return check


def within(interval: str, test: Callable[[Any], bool], hint: str):
    """``interval`` as written in the message (``(0, 1]``), ``test`` the same interval as a predicate."""
    def check(name, v):
        if v is not None and not test(v):
            raise OptionError(f"{{{name}}} must be in {interval} (got {v}); {hint}")
    return check


def one_of(*choices: str, hint: str):
    words = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]

    def check(name, v):
        if v not in choices:
            raise OptionError(f"{{{name}}} must be {words} (got {v!r}); {hint}")
    return check


def check_fields(obj) -> None:
    """Run every field's declared check on ``obj``'s values, in declaration order."""
    for f in dataclasses.fields(obj):
        if f.metadata.get("check"):
            f.metadata["check"](f.name, getattr(obj, f.name))


def with_overrides(options_type, options: Any, overrides: dict[str, Any]):
    """An options instance from ``options`` (an instance, a mapping of some fields, or None) with ``overrides``
    (keywords) on top; validated. How every own-loop component takes its options."""
    base = dataclasses.asdict(options) if isinstance(options, options_type) else dict(options or {})
    return from_mapping(options_type, {**base, **overrides})


def from_mapping(options_type, values: Any):
    """An options instance from an instance, or from a mapping of some of its fields (the rest take defaults);
    validated."""
    if isinstance(values, options_type):
        opts = values
    else:
        names = {f.name for f in dataclasses.fields(options_type)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TypeError(f"{options_type.__name__} has no option {', '.join(unknown)}")
        opts = options_type(**values)
    opts.validate()
    return opts


# ---- the command line: strict parsers, and an argparse spec per field ----------------------------------------------
def finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


def integer(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None


def boolean(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{s!r} is not true or false")


_PARSERS = {"int": integer, "int | None": integer, "float": finite_float, "float | None": finite_float,
            "str": str, "str | None": str, "bool | None": boolean}


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def cli_spec(options_type) -> list[dict]:
    """``argparse.add_argument`` keyword sets (with ``flags`` and ``group``) for the fields of an options dataclass
    that have help; a ``bool`` field is a switch (``--x`` sets True, or a ``--no-x`` flag sets False)."""
    out = []
    for f in dataclasses.fields(options_type):
        if "help" not in f.metadata:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        spec = {"flags": [flag_of(f)], "dest": f.name, "help": f.metadata["help"], "default": default,
                "group": f.metadata.get("group")}
        if f.type == "bool":
            spec["action"] = "store_false" if default else "store_true"
        else:
            spec["type"] = f.metadata.get("parse") or _PARSERS[f.type]
        out.append(spec)
    return out
