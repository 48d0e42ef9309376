"""The `grape` command. Each verb lives in grape/cli/commands/<verb>.py and exposes

    HELP: str                       one line for `grape --help`
    add_arguments(parser) -> None   its flags
    run(args) -> int                its work; exit status

User errors (solvers.errors.UserError) print one line and exit 2, with no traceback; so does
a write the disk refuses (full, file-size limit, read-only, busy: solvers._io.DiskError). Ctrl-C
exits 130 and SIGTERM 143, each with one line, after the same cleanup.
A verb that writes declares `OUTPUT` (grape.outputs.DirOutput / FileOutput): it gets
--overwrite, and its --out is checked before it runs.
Every verb also takes --recipe FILE, and writes its resolved options beside its outputs
(grape/recipe.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from grape import recipe
from grape.cli.problem import load_plugins
from grape.outputs import add_overwrite_argument, clean_leftovers
from solvers._io import describe_disk_error, disk_cause
from solvers.errors import UserError

VERBS = ("calibrate", "solve", "search", "apply", "eval", "compare", "inspect", "synth", "run")


def _available_verbs() -> dict[str, object]:
    modules = {}
    for verb in VERBS:
        try:
            modules[verb] = importlib.import_module(f"grape.cli.commands.{verb}")
        except ModuleNotFoundError as exc:
            if exc.name != f"grape.cli.commands.{verb}":
                raise
    return modules


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every verb; with `only`, the flags of that verb alone are added (the others
    keep their one-line help), so a light verb does not import what a heavy one needs (torch)."""
    parser = argparse.ArgumentParser(
        prog="grape",
        description="Global expert pruning for Mixture-of-Experts language models: "
        "calibrate -> solve -> search -> apply -> eval.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    parser.verb_parsers = {}  # verb -> its parser, into which grape.recipe loads a recipe
    for verb, module in _available_verbs().items():
        p = sub.add_parser(
            verb,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        output = getattr(module, "OUTPUT", None)  # grape.outputs.DirOutput / FileOutput
        if only is None or verb == only:
            module.add_arguments(p)
            if output is not None:
                add_overwrite_argument(p, output)
        recipe.add_recipe_argument(p)
        p.add_argument("--plugin", action="append", default=None, metavar="FILE.py|MODULE",
                       help="load a plugin first: a .py file (./my_plugin.py) or an installed / "
                       "PYTHONPATH module; its objective terms, constraints and solvers register "
                       "themselves (repeatable; the grape.plugins entry points load always; the "
                       "working directory is never searched)")
        p.set_defaults(_run=module.run, _output=output)
        parser.verb_parsers[verb] = p
    return parser


def _version() -> str:
    """`grape --version`: this package and the libraries whose versions change results."""
    from importlib import metadata

    import grape

    parts = [f"grape {grape.__version__}"]
    for name in ("torch", "transformers", "lm_eval"):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def _plugins_in(argv: list[str]) -> list[str]:
    """The --plugin values, read before the parser is built so plugin choices appear in it."""
    found = []
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            found.append(arg.split("=", 1)[1])
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    try:
        load_plugins(_plugins_in(argv))
    except UserError as exc:
        print(f"grape: error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser(only=verb if verb in VERBS else "")  # no verb: only the verb list is needed
    try:
        # recipe values become the verb's defaults
        recipe.prepare(argv, parser.verb_parsers, lambda: build_parser().verb_parsers)
    except UserError as exc:
        print(f"grape: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    previous = _raise_on_sigterm()
    try:
        load_plugins(args.plugin or ())  # a recipe's plugins (already-imported ones are free)
        if args._output is not None:
            args._output.check(args)  # a bad --out fails now, before any model or data is read
            clean_leftovers(args._output, args)  # what killed runs staged for this --out
        status = int(args._run(args) or 0)
        if status == 0:
            recipe.write_resolved(args, args.verb)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
        return status
    except UserError as exc:
        print(f"grape {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"grape {args.verb}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM  # 143, what a shell reports for a process SIGTERM ended
    except KeyboardInterrupt:
        print(f"grape {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`grape inspect ... | head`): stop quietly, as cat or grep do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (OSError, RuntimeError) as exc:
        # last resort for a write the disk refused where no writer named its file: one line
        cause = disk_cause(exc)
        if cause is None:
            raise
        print(f"grape {args.verb}: error: {describe_disk_error(cause, cause.filename)}",
              file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt so that every cleanup
    (staging folders removed, files closed) runs; a subclass, so code treating Ctrl-C treats it
    the same."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the cleanup short
    raise Terminated()


def _raise_on_sigterm():
    """Install the SIGTERM handler; returns the previous one (None when it cannot be installed:
    outside the main thread, as in an embedding application)."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:
        return None
    return signal.SIG_DFL if previous is None else previous  # None: one not set from Python


if __name__ == "__main__":
    sys.exit(main())
