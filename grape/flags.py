"""Command-line flags generated from a stage's typed configuration (a dataclass).

A field that carries `flag(...)` metadata becomes a flag named after it (``seq_len`` ->
``--seq-len``), with its default, type and help, so the dataclass stays the one description of a
setting; `config_from_args` builds the dataclass back from the parsed flags. Conventions:

* ``negate=True``: a bool that defaults to True becomes ``--no-NAME`` (dest ``no_NAME``);
* ``items=True``: a tuple of strings is one comma-separated flag (``none`` for the empty tuple);
* ``unset=True``: the flag defaults to None, which the verb resolves (e.g. capped at the model's
  context) and `config_from_args` turns into the field's default;
* ``name``: the flag's own name when it differs from the field's (``--max-tokens`` for
  ``max_tokens_per_domain``); ``nargs``: a list flag (``--task-path A B``);
  ``zero_none=True``: 0 on the command line means None ("all").

grape.config.SolveConfig describes its flags the same way (with groups and shared verbs).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable


def flag(help: str, *, type: Callable | None = None, choices: Any = None, metavar: str | None = None,
         negate: bool = False, items: bool = False, unset: bool = False, name: str | None = None,
         nargs: str | None = None, zero_none: bool = False, empty: str = "none") -> dict:
    """Field metadata: `dataclasses.field(default=..., metadata=flag("..."))`."""
    return {"flag": {"help": help, "type": type, "choices": choices, "metavar": metavar,
                     "negate": negate, "items": items, "unset": unset, "name": name,
                     "nargs": nargs, "zero_none": zero_none, "empty": empty}}


def _dest(f: dataclasses.Field, meta: dict) -> str:
    return meta["name"] or f.name


def _flagged(cls) -> list[tuple[dataclasses.Field, dict]]:
    return [(f, f.metadata["flag"]) for f in dataclasses.fields(cls) if "flag" in f.metadata]


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per flagged field of `cls` (see the module docstring)."""
    default_of = cls()
    for f, meta in _flagged(cls):
        if f.name in skip:
            continue
        dest = _dest(f, meta)
        option = "--" + dest.replace("_", "-")
        default = getattr(default_of, f.name)
        if meta["negate"]:
            parser.add_argument("--no-" + dest.replace("_", "-"), dest=f"no_{dest}",
                                action="store_true", help=meta["help"])
            continue
        if isinstance(default, bool):
            parser.add_argument(option, action="store_true", help=meta["help"])
            continue
        kwargs: dict[str, Any] = {"help": meta["help"], "dest": dest}
        if meta["items"]:
            kwargs["default"] = ",".join(default) or meta["empty"]
        elif meta["nargs"]:
            kwargs.update(nargs=meta["nargs"], default=list(default))
        else:
            kwargs["default"] = None if meta["unset"] else default
            kwargs["type"] = meta["type"] or (type(default) if default is not None else None)
        choices = meta["choices"]
        if choices is not None:
            kwargs["choices"] = choices() if callable(choices) else choices
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(option, **kwargs)


def config_from_args(cls, args: argparse.Namespace, **overrides: Any):
    """The dataclass the parsed flags describe; `overrides` win (fields without a flag)."""
    default_of = cls()
    values: dict[str, Any] = {}
    for f, meta in _flagged(cls):
        dest = _dest(f, meta)
        if meta["negate"]:
            if hasattr(args, f"no_{dest}"):
                values[f.name] = not getattr(args, f"no_{dest}")
            continue
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if meta["items"]:
            value = tuple(k.strip() for k in str(value).split(",") if k.strip() and k.strip() != "none")
        elif meta["nargs"]:
            value = tuple(str(v) for v in value or ())
        elif value is None and meta["unset"]:
            value = getattr(default_of, f.name)
        elif meta["zero_none"] and value == 0:
            value = None
        values[f.name] = value
    return cls(**{**values, **overrides})


__all__ = ["add_config_arguments", "config_from_args", "flag"]
