"""Typed option sets: one dataclass per idea holds each option's type, default, help and validation, and serves the
selectors, the policies, the command line (``--flag`` per field) and config files alike."""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


def option(default: Any, help: str, flag: str | None = None):
    """A dataclass field with its help text (and command-line flag, when it is not ``--<name>``)."""
    return field(default=default, metadata={"help": help, "flag": flag})


def cli_spec(options_type) -> list[dict]:
    """``argparse.add_argument`` keyword sets for every field of an options dataclass."""
    kinds = {"int": int, "float": float, "str": None, "int | None": int, "float | None": float}
    out = []
    for f in dataclasses.fields(options_type):
        spec = {"flags": [f.metadata.get("flag") or "--" + f.name.replace("_", "-")], "dest": f.name,
                "help": f.metadata.get("help", "")}
        if f.type == "bool":
            spec["action"] = "store_true"
        else:
            spec["default"] = f.default
            if kinds[f.type] is not None:
                spec["type"] = kinds[f.type]
        out.append(spec)
    return out


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
