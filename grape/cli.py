"""The `grape` command. Each verb lives in grape/commands/<verb>.py and exposes

    HELP: str                       one line for `grape --help`
    add_arguments(parser) -> None   its flags
    run(args) -> int                its work; exit status

User errors (solvers.errors.UserError) print one line and exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grape",
        description="Global expert pruning for Mixture-of-Experts language models: "
        "calibrate -> solve -> apply -> eval.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, module in _available_verbs().items():
        p = sub.add_parser(
            verb,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"grape {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"grape {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
