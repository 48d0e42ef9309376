"""Options from flags and from a recipe file, and the record of what a run really used.

Every `grape` verb takes ``--recipe FILE`` (YAML, TOML or JSON). Precedence, highest first:

1. a flag given on the command line;
2. the recipe: the verb's own section, then the recipe's top level;
3. the built-in default.

A recipe is a mapping. Top-level keys apply to every verb that has the option; a section named
after a verb applies to that verb only. Keys are flag names without the leading dashes, and
``-`` and ``_`` are interchangeable::

    model: path/to/moe-checkpoint                  # any verb with --model
    seed: 0
    calibrate:
      samples: 64
      seq_len: 256
      similarity: [cka, router]                    # a list is joined with commas
    solve:
      budget: 0.25
      objective: redundancy
      uniform: true                                # a switch: true / false

A key in a verb's section that the verb does not have, or a top-level key that no verb has, is
an error (a typo would otherwise be ignored silently). Recipe values are checked exactly like
flags: same type conversion, same choices.

Relative paths in a recipe (model, data, scores, plan, out, ...) are relative to the recipe
file's folder, not to the directory the command runs in, so a recipe means the same from
anywhere. A ``model`` or ``tokenizer`` of the form owner/name that is not a folder there is a
Hub id (grape.models.files.resolve_model).

After a verb succeeds, its resolved configuration (every option, whatever set it) is written
beside its outputs as a recipe of its own (``<verb>.recipe.yaml`` inside an output directory,
``<stem>.recipe.yaml`` beside an output file), so ``grape <verb> --recipe that-file`` repeats it
from any directory: paths inside the output's folder are written relative to it, others
absolute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from solvers._io import atomic_write_text
from solvers.errors import UserError
from solvers.inputfiles import read_input, refuse_special

RECIPE_SUFFIXES = (".yaml", ".yml", ".toml", ".json")
# options whose values are paths: relative ones in a recipe are read from the recipe's folder
PATH_OPTIONS = {"model", "tokenizer", "data", "eval_data", "search_data", "scores", "plan", "out",
                "baseline", "task_path", "offload_folder", "path"}
_HUB_ID_OPTIONS = {"model", "tokenizer"}  # may also be a Hub id (grape.models.files.resolve_model)
# argparse destinations that are not options of the run (set by grape.cli.main or the recipe itself)
# not settable from a recipe and not recorded: --overwrite must be asked for on each run
_INTERNAL = {"recipe", "verb", "overwrite"}


class RecipeError(UserError):
    """A recipe file that cannot be read, or a recipe key / value no verb accepts."""


# -- reading --------------------------------------------------------------------------------
def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe at `path` as a dict (YAML, TOML or JSON, chosen by suffix)."""
    path = Path(path)
    # a device (/dev/zero) is refused; a pipe (`--recipe <(...)`, no suffix) is read once as
    # YAML, which also reads JSON
    kind = refuse_special(path, "recipe file", RecipeError)
    if kind not in ("file", "pipe"):
        raise RecipeError(f"recipe file {str(path)!r} does not exist; pass a .yaml, .toml or .json file")
    suffix = ".yaml" if kind == "pipe" else path.suffix.lower()
    if suffix not in RECIPE_SUFFIXES:
        raise RecipeError(f"recipe file {str(path)!r}: unknown suffix {suffix!r}; use one of "
                          f"{', '.join(RECIPE_SUFFIXES)}")
    try:
        text = read_input(path, "recipe file", RecipeError).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe file {str(path)!r} is not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from None
    try:
        if suffix == ".toml":
            data = _toml_loads(text)
        else:  # JSON is a subset of YAML
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise RecipeError(f"recipe file {str(path)!r} is not valid {suffix[1:].upper()}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {str(path)!r} must hold a mapping of options, "
                          f"not a {type(data).__name__}")
    return data


def _toml_loads(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise RecipeError("reading TOML recipes on Python 3.10 needs `pip install tomli`; "
                              "or write the recipe in YAML") from None
    return tomllib.loads(text)


def _key(name: str) -> str:
    return str(name).strip().lstrip("-").replace("-", "_")


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Destination -> action for every option of a verb's parser (help and internals left out)."""
    out = {}
    for action in parser._actions:  # argparse has no public accessor for its actions
        if isinstance(action, argparse._HelpAction) or action.dest in _INTERNAL:
            continue
        if action.dest.startswith("_") or action.dest == argparse.SUPPRESS:
            continue
        out[action.dest] = action
        for flag in action.option_strings:  # --no-progress also answers to no_progress
            out.setdefault(_key(flag), action)
    return out


def recipe_values(recipe: Mapping[str, Any], verb: str,
                  verb_parsers: Mapping[str, argparse.ArgumentParser],
                  all_parsers: Callable[[], Mapping[str, argparse.ArgumentParser]] | None = None,
                  ) -> dict[str, Any]:
    """The recipe entries for `verb`, keyed by argparse destination: top level first, then the
    verb's section over it. Raises RecipeError on keys that no verb (or not this verb) knows.
    `all_parsers` gives every verb's complete parser when `verb_parsers` holds only `verb`'s
    options (it is called only if a top-level key is not one of them)."""
    parser = verb_parsers[verb]
    mine = _options(parser)
    known: set[str] = set()

    def everyone() -> set[str]:
        if not known:
            parsers = all_parsers() if all_parsers is not None else verb_parsers
            known.update(k for p in parsers.values() for k in _options(p))
        return known

    values: dict[str, Any] = {}
    for raw, value in recipe.items():
        key = _key(raw)
        if key in verb_parsers:  # a verb's section
            if not isinstance(value, dict):
                raise RecipeError(f"recipe section {raw!r} must be a mapping of options, "
                                  f"not {value!r}")
            continue
        if key not in mine and key not in everyone():
            raise RecipeError(f"recipe key {raw!r} is not an option of any grape verb nor a verb "
                              f"section ({', '.join(verb_parsers)}); check its spelling")
        if key in mine:
            values[mine[key].dest] = value
    for raw, value in (recipe.get(verb) or {}).items():
        key = _key(raw)
        if key not in mine:
            known = ", ".join(sorted({a.dest for a in mine.values()}))
            raise RecipeError(f"recipe section {verb!r}: {raw!r} is not an option of `grape "
                              f"{verb}`; its options are: {known}")
        values[mine[key].dest] = value
    return values


# -- applying -------------------------------------------------------------------------------
def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """Check and convert a recipe value the way argparse treats the same flag."""
    if action.nargs == 0:  # store_true / store_false / store_const switches
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: {value!r} must be true or false (it is a switch)")
        # `--no-progress: true` sets the switch; false leaves it at the value without the flag
        return action.const if value else action.default
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int) or \
        isinstance(action, argparse._AppendAction)
    if value is None:  # `null`, as a resolved recipe records an unset option: stays unset
        return None
    if many:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [_convert_one(action, item, where) for item in items]
    if isinstance(value, (list, tuple)):  # comma-separated options (similarity, tasks, ...)
        value = ",".join(str(v) for v in value)
    return _convert_one(action, value, where)


def _convert_one(action: argparse.Action, value: Any, where: str) -> Any:
    if value is None:
        return None
    convert = action.type
    if convert is None:
        value = value if isinstance(value, str) else _plain_text(value)
    else:
        try:
            value = convert(value if isinstance(value, str) else _plain_text(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            name = getattr(convert, "__name__", "the option's type")
            raise RecipeError(f"{where}: cannot read {value!r} as {name} ({exc})") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise RecipeError(f"{where}: {value!r} is not one of {choices}")
    return value


def _plain_text(value: Any) -> str:
    # YAML reads 0.25 as a float and `true` as a bool; flags are text, so turn them back
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def apply_recipe(parser: argparse.ArgumentParser, values: Mapping[str, Any], verb: str) -> None:
    """Make the recipe values the parser's defaults (so explicit flags still win) and stop
    requiring options the recipe supplies."""
    actions = {a.dest: a for a in parser._actions}
    converted = {}
    for dest, value in values.items():
        action = actions[dest]
        flag = action.option_strings[-1] if action.option_strings else dest
        converted[dest] = _convert(action, value, f"recipe option {flag} of `grape {verb}`")
        action.required = False
    parser.set_defaults(**converted)


def _argv_recipe(argv: Sequence[str]) -> tuple[str | None, str | None]:
    """(verb, recipe path) read from argv before parsing, so a recipe can supply required options."""
    verb, recipe = None, None
    for i, token in enumerate(argv):
        if token == "--":
            break
        if verb is None and not token.startswith("-"):
            verb = token
        elif token == "--recipe" and i + 1 < len(argv):
            recipe = argv[i + 1]
        elif token.startswith("--recipe="):
            recipe = token.split("=", 1)[1]
    return verb, recipe


def prepare(argv: Sequence[str], verb_parsers: Mapping[str, argparse.ArgumentParser],
            all_parsers: Callable[[], Mapping[str, argparse.ArgumentParser]] | None = None) -> None:
    """If argv names a verb and a recipe, load the recipe into that verb's parser (see
    recipe_values for `all_parsers`). Relative paths in the recipe are relative to its folder,
    so a recipe works from any directory."""
    verb, path = _argv_recipe(argv)
    if verb not in verb_parsers or not path:
        return
    values = recipe_values(load_recipe(path), verb, verb_parsers, all_parsers)
    folder = Path(os.path.abspath(Path(path).expanduser())).parent
    values = {dest: anchor_paths(dest, value, folder) for dest, value in values.items()}
    apply_recipe(verb_parsers[verb], values, verb)


def anchor_paths(dest: str, value: Any, folder: Path) -> Any:
    """A recipe value with its relative paths made relative to `folder` (the recipe's); values
    of options that are not paths, and Hub ids that are not folders there, are left alone."""
    if dest not in PATH_OPTIONS or value is None or isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)):
        return [anchor_paths(dest, v, folder) for v in value]
    text = str(value)
    domain, sep, rest = text.partition("=")
    if sep and domain and "/" not in domain and not (folder / text).exists():
        return f"{domain}={anchor_paths(dest, rest, folder)}"  # DOMAIN=PATH of eval data
    path = Path(text).expanduser()
    if path.is_absolute():
        return str(path)
    if dest in _HUB_ID_OPTIONS and not (folder / path).exists() and text.count("/") == 1:
        return text  # owner/name: a Hub id, looked up in the local cache
    return str(folder / path)


def add_recipe_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", metavar="FILE", default=None,
                        help="YAML/TOML/JSON file of options (top-level keys, or a section named "
                        "after the verb); explicit flags override it. See grape/recipe.py")


# -- recording ------------------------------------------------------------------------------
def resolved_options(args: argparse.Namespace, folder: Path | None = None) -> dict[str, Any]:
    """Every option of a parsed run as plain JSON/YAML values (internals left out). With
    `folder` (where the recipe goes), paths are written so the recipe works from anywhere:
    relative to that folder when inside it, absolute otherwise."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if key.startswith("_") or key in _INTERNAL:
            continue
        if key == "budget" and isinstance(value, str) and type(value) is not str:
            # the budget nobody gave (grape.cli.problem.DEFAULT_BUDGET): recorded as what it became
            value = "fit" if getattr(args, "fit", None) is not None else str(value)
        value = _plain(value)
        if folder is not None and key in PATH_OPTIONS:
            value = _portable(value, folder, hub_id=key in _HUB_ID_OPTIONS)
        out[key] = value
    return out


def _portable(value: Any, folder: Path, hub_id: bool = False) -> Any:
    if isinstance(value, list):
        return [_portable(v, folder) for v in value]
    if not isinstance(value, str) or not value:
        return value
    domain, sep, rest = value.partition("=")
    if sep and domain and "/" not in domain and not Path(value).exists():
        return f"{domain}={_portable(rest, folder)}"
    path = Path(value).expanduser()
    if hub_id and not path.exists() and value.count("/") == 1 and not path.is_absolute():
        return value  # a Hub id, not a path
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(folder).as_posix() or "."
    except ValueError:
        return str(path)


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def config_path(out: str | os.PathLike, verb: str) -> Path:
    """Where the resolved configuration of a run writing `out` goes: inside an output directory,
    beside an output file."""
    out = Path(out)
    if out.is_dir():
        return out / f"{verb}.recipe.yaml"
    return out.with_name(f"{out.stem}.recipe.yaml")


def write_resolved(args: argparse.Namespace, verb: str, path: str | os.PathLike | None = None) -> Path | None:
    """Write the resolved configuration as a recipe; returns its path (None when the verb has no
    output to write beside and no `path` is given)."""
    if path is None:
        out = getattr(args, "out", None)
        if out is None:
            return None
        path = config_path(out, verb)
    import grape

    path = Path(os.path.abspath(path))
    header = (f"# resolved configuration of `grape {verb}` (flags > recipe > defaults), grape "
              f"{grape.__version__}\n"
              + (f"# recipe file: {args.recipe}\n" if getattr(args, "recipe", None) else "")
              + "# relative paths are relative to this file's folder\n"
              + f"# repeat with: grape {verb} --recipe {_shell_word(str(path))}\n")
    text = header + dump_yaml({verb: resolved_options(args, path.parent)})
    atomic_write_text(path, text)
    return Path(path)


def _shell_word(text: str) -> str:
    import shlex

    return shlex.quote(text)


def dump_yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def dump_json(data: Any) -> str:
    return json.dumps(_plain(data), indent=2) + "\n"


__all__ = [
    "PATH_OPTIONS",
    "RecipeError",
    "add_recipe_argument",
    "anchor_paths",
    "apply_recipe",
    "config_path",
    "load_recipe",
    "prepare",
    "recipe_values",
    "resolved_options",
    "write_resolved",
]


if __name__ == "__main__":  # pragma: no cover - `python -m grape.recipe FILE` prints a recipe as read
    print(dump_json(load_recipe(sys.argv[1])))
