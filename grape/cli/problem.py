"""The problem configuration on the command line, and plugins.

The specification itself — :class:`~solvers.spec.SolveConfig`, budget and constraint parsing,
building a Problem from scores — is torch-free and lives in :mod:`solvers.spec`. This module turns
its fields into the problem flags that ``grape solve``, ``grape compare``, ``grape search`` and
``grape run`` share (:func:`add_problem_arguments`, :func:`solve_config_from_args`), and loads
plugins (:func:`load_plugins`): modules whose import registers objective terms, constraints or
solvers, named with ``--plugin ./my_plugin.py`` or ``--plugin my_module``.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from solvers.errors import UserError
from solvers.spec import (
    FLAG_GROUPS,
    PROBLEM_FLAGS,
    BudgetError,
    SolveConfig,
    check_budget,
    parse_constraint_spec,
)


# -- flags --------------------------------------------------------------------------------------
def add_problem_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """The problem flags of `grape solve`, `grape compare`, `grape search` and `grape run`,
    generated from the fields of SolveConfig by the one generator (grape.flags), in the groups
    FLAG_GROUPS names. `defaults` override a field's default where a verb's job needs it (each
    such verb says why in its --help)."""
    from grape.flags import add_config_arguments

    groups = {key: parser.add_argument_group(title) for key, title in FLAG_GROUPS.items()}
    add_config_arguments(parser, SolveConfig, groups=groups, defaults=defaults)


def solve_config_from_args(args: argparse.Namespace, **overrides: Any) -> SolveConfig:
    """The SolveConfig the parsed problem flags describe; validated on construction."""
    values = {name: getattr(args, name) for name in PROBLEM_FLAGS if hasattr(args, name)}
    values["constraint"] = tuple(c for c in values.get("constraint") or () if c)
    if isinstance(values.get("similarity"), str) and values["similarity"].lower() == "none":
        values["similarity"] = None
    return SolveConfig(**{**values, **overrides})


# -- plugins ------------------------------------------------------------------------------------
PLUGIN_GROUP = "grape.plugins"


def load_plugins(modules: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Import the plugin modules (their import registers objective terms, constraints or
    solvers) and every module of the `grape.plugins` entry-point group; returns their names.

    A plugin is a path to a .py file (``./my_plugin.py``), loaded from that file alone, or the
    name of a module importable as Python was started (an installed package, PYTHONPATH). No
    folder is added to sys.path: a file in the working directory named like an optional import
    of torch or transformers (``cython.py``) would otherwise run inside every verb."""
    from importlib.metadata import entry_points

    loaded = []
    for entry in entry_points(group=PLUGIN_GROUP):
        entry.load()
        loaded.append(entry.value)
    for name in [m for m in modules or () if m]:
        if is_plugin_path(name):
            _import_plugin_file(name)
        else:
            _import_plugin_module(name)
        loaded.append(name)
    return loaded


def is_plugin_path(name: str) -> bool:
    """A --plugin value naming a file rather than a module (module names hold no slash)."""
    import os

    return name.endswith(".py") or "/" in name or os.sep in name


def _import_plugin_module(name: str) -> None:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        raise UserError(f"--plugin {name!r} cannot be imported ({exc}); give a path to a .py file "
                        f"(--plugin ./{name}.py) or a module importable from PYTHONPATH or an "
                        "installed package") from None


def _import_plugin_file(name: str) -> None:
    """Execute one .py file as a module, under a name of its own (the same file twice: once)."""
    import hashlib
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(name).expanduser().resolve()
    if path.suffix != ".py" or path.is_dir():
        raise UserError(f"--plugin {name!r} is not a .py file; give a path to a plugin file "
                        "(--plugin ./my_plugin.py) or an importable module name")
    if not path.is_file():
        raise UserError(f"--plugin {name!r}: no such file ({path})")
    # unique per file, so two plugins with the same file name do not replace each other
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"grape_plugin_{path.stem}_{digest}"
    if module_name in sys.modules:  # the CLI loads --plugin before and after reading a recipe
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    # registered before it runs: dataclasses and pickling look classes up by their module name
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        del sys.modules[module_name]
        raise UserError(f"--plugin {name!r} failed to import ({exc}); its imports must be "
                        "installed packages (its own folder is not searched)") from None
    except BaseException:
        del sys.modules[module_name]
        raise


__all__ = [
    "BudgetError",
    "PLUGIN_GROUP",
    "PROBLEM_FLAGS",
    "SolveConfig",
    "add_problem_arguments",
    "check_budget",
    "is_plugin_path",
    "load_plugins",
    "parse_constraint_spec",
    "solve_config_from_args",
]
