"""The `grape` command. Each verb lives in grape/commands/<verb>.py and exposes

    HELP: str                       one line for `grape --help`
    add_arguments(parser) -> None   its flags
    run(args) -> int                its work; exit status

User errors (solvers.errors.UserError) print one line and exit 2, with no traceback.
Every verb also takes --recipe FILE, and writes its resolved options beside its outputs
(grape/recipe.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from grape import recipe
from solvers.errors import UserError

VERBS = ("calibrate", "solve", "apply", "eval", "compare", "inspect", "synth", "run")


def _available_verbs() -> dict[str, object]:
    modules = {}
    for verb in VERBS:
        try:
            modules[verb] = importlib.import_module(f"grape.commands.{verb}")
        except ModuleNotFoundError as exc:
            if exc.name != f"grape.commands.{verb}":
                raise
    return modules


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every verb; with `only`, the flags of that verb alone are added (the others
    keep their one-line help), so a light verb does not import what a heavy one needs (torch)."""
    parser = argparse.ArgumentParser(
        prog="grape",
        description="Global expert pruning for Mixture-of-Experts language models: "
        "calibrate -> solve -> apply -> eval.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    parser.verb_parsers = {}  # verb -> its parser, into which grape.recipe loads a recipe
    for verb, module in _available_verbs().items():
        p = sub.add_parser(
            verb,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        if only is None or verb == only:
            module.add_arguments(p)
        recipe.add_recipe_argument(p)
        p.set_defaults(_run=module.run)
        parser.verb_parsers[verb] = p
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=verb if verb in VERBS else "")  # no verb: only the verb list is needed
    try:
        # recipe values become the verb's defaults
        recipe.prepare(argv, parser.verb_parsers, lambda: build_parser().verb_parsers)
    except UserError as exc:
        print(f"grape: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        status = int(args._run(args) or 0)
        if status == 0:
            recipe.write_resolved(args, args.verb)
        return status
    except UserError as exc:
        print(f"grape {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"grape {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
