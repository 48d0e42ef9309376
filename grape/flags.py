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

* ``group``: the argument group a verb puts the flag in; ``action``: e.g. "append".

This is the one flag generator: every stage config's flags come from here, SolveConfig's too
(solvers.spec describes its fields with plain keys, being torch- and grape-free; see `_meta`).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable


def flag(help: str, *, type: Callable | None = None, choices: Any = None, metavar: str | None = None,
         negate: bool = False, items: bool = False, unset: bool = False, name: str | None = None,
         nargs: str | None = None, zero_none: bool = False, empty: str = "none",
         group: str | None = None, action: str | None = None) -> dict:
    """Field metadata: `dataclasses.field(default=..., metadata=flag("..."))`."""
    return {"flag": {"help": help, "type": type, "choices": choices, "metavar": metavar,
                     "negate": negate, "items": items, "unset": unset, "name": name,
                     "nargs": nargs, "zero_none": zero_none, "empty": empty, "group": group,
                     "action": action}}


def _dest(f: dataclasses.Field, meta: dict, rename: dict[str, str] | None = None) -> str:
    """The flag's dest: a verb's `rename` wins (`grape run` prefixes a name two stages share:
    calibration's `similarity` is --calib-similarity there, solve's is --similarity)."""
    return (rename or {}).get(f.name) or meta["name"] or f.name


def flag_names(cls, skip: tuple[str, ...] = (), rename: dict[str, str] | None = None) -> dict[str, str]:
    """{field name: option string} of the flags `add_config_arguments` makes for `cls`."""
    names = {}
    for f, meta in _flagged(cls):
        if f.name not in skip:
            dest = _dest(f, meta, rename).replace("_", "-")
            names[f.name] = f"--no-{dest}" if meta["negate"] else f"--{dest}"
    return names


def _flagged(cls) -> list[tuple[dataclasses.Field, dict]]:
    flagged = [(f, _meta(f.metadata)) for f in dataclasses.fields(cls)]
    return [(f, meta) for f, meta in flagged if meta is not None]


def _meta(metadata) -> dict | None:
    """A field's flag description: `flag(...)` metadata, or solvers.spec's torch-free form
    (solvers cannot import grape: SolveConfig writes plain help / group / type / choices /
    action keys, and names its choice lists: "criteria", "normalizations")."""
    if "flag" in metadata:
        return metadata["flag"]
    if "help" not in metadata:
        return None
    meta = flag(metadata["help"], type=metadata.get("type"), metavar=metadata.get("metavar"),
                choices=_named_choices(metadata.get("choices")), group=metadata.get("group"),
                action=metadata.get("action"))["flag"]
    # no type inferred from the default: a text flag's default is shown as it would be typed
    # (the budget's default is a str subclass that marks it as nobody's choice)
    return {**meta, "text": True}


def _named_choices(choices: Any) -> Any:
    if choices not in ("criteria", "normalizations"):
        return choices
    from solvers.scores import CRITERIA, NORMALIZATIONS

    return sorted(CRITERIA if choices == "criteria" else NORMALIZATIONS)


def _default(f: dataclasses.Field, default_of: Any) -> Any:
    return f.default if f.default is not dataclasses.MISSING else getattr(default_of, f.name)


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                         rename: dict[str, str] | None = None, unset: tuple[str, ...] = (),
                         groups: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None) -> None:
    """One flag per flagged field of `cls` (see the module docstring); `rename`: {field: dest}
    where a verb holding several stages must tell two same-named fields apart; `unset`: fields
    whose flag defaults to None, for the verb to resolve (grape run's sizes per model);
    `groups`: {a field's group: argument group}; `defaults`: a verb's own default for a field
    (`grape run`'s objective; the verb's --help says why)."""
    default_of = cls()
    for f, meta in _flagged(cls):
        if f.name in skip:
            continue
        dest = _dest(f, meta, rename)
        default = (defaults or {}).get(f.name, _default(f, default_of))
        target = (groups or {}).get(meta.get("group"), parser)
        if meta["negate"]:
            target.add_argument("--no-" + dest.replace("_", "-"), dest=f"no_{dest}",
                                action="store_true", help=meta["help"])
        elif isinstance(default, bool) and not meta.get("action"):
            target.add_argument("--" + dest.replace("_", "-"), dest=dest, action="store_true",
                                default=default, help=meta["help"])
        else:
            target.add_argument("--" + dest.replace("_", "-"),
                                **_value_flag(meta, dest, default, f.name in unset))


def _value_flag(meta: dict, dest: str, default: Any, unset: bool) -> dict[str, Any]:
    """add_argument's keyword arguments for a flag that takes a value."""
    kwargs: dict[str, Any] = {"help": meta["help"], "dest": dest}
    if meta.get("action"):
        kwargs.update(action=meta["action"], default=None)  # a repeatable flag starts empty
    elif meta["items"]:
        kwargs["default"] = ",".join(default) or meta["empty"]
    elif meta["nargs"]:
        kwargs.update(nargs=meta["nargs"], default=list(default))
    elif meta.get("text"):
        kwargs["default"] = default if default is None or isinstance(default, str) or meta["type"] else str(default)
        if meta["type"]:
            kwargs["type"] = meta["type"]
    else:
        kwargs["default"] = None if meta["unset"] or unset else default
        kwargs["type"] = meta["type"] or (type(default) if default is not None else None)
    choices = meta["choices"]
    if choices is not None:
        kwargs["choices"] = choices() if callable(choices) else choices
    if meta["metavar"]:
        kwargs["metavar"] = meta["metavar"]
    return kwargs


def comma_list(text: Any) -> tuple[str, ...]:
    """The items of a comma-separated flag value, stripped, empty ones dropped: 'a, b,' -> (a, b)."""
    return tuple(item.strip() for item in str(text).split(",") if item.strip())


def config_from_args(cls, args: argparse.Namespace, rename: dict[str, str] | None = None,
                     **overrides: Any):
    """The dataclass the parsed flags describe (`rename` as given to add_config_arguments);
    `overrides` win (fields without a flag)."""
    default_of = cls()
    values: dict[str, Any] = {}
    for f, meta in _flagged(cls):
        dest = _dest(f, meta, rename)
        if meta["negate"]:
            if hasattr(args, f"no_{dest}"):
                values[f.name] = not getattr(args, f"no_{dest}")
            continue
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if meta["items"]:
            value = tuple(k for k in comma_list(value) if k != "none")
        elif meta["nargs"]:
            value = tuple(str(v) for v in value or ())
        elif value is None:  # unset on the command line: the field's default
            value = getattr(default_of, f.name)
        elif meta["zero_none"] and value == 0:
            value = None
        values[f.name] = value
    return cls(**{**values, **overrides})


__all__ = ["add_config_arguments", "comma_list", "config_from_args", "flag", "flag_names"]
