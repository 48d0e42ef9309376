"""Copy result tables from benchmarks/results/*.md into README.md, so no number is typed by hand.

README.md holds marker pairs

    <!-- results:NAME -->
    ...generated...
    <!-- /results:NAME -->

and this script replaces what lies between them with the tables of benchmarks/results/NAME.md:
the part between ``<!-- readme -->`` and ``<!-- /readme -->`` in that file if it has one,
otherwise every markdown table, each under the heading it sits under. When the results file
does not exist yet, the markers get one line naming the command that writes it (found by
looking for ``NAME.md`` in the benchmark scripts).

    python benchmarks/update_readme.py            # rewrite README.md in place
    python benchmarks/update_readme.py --check    # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARKERS = re.compile(r"(<!-- results:([\w.-]+) -->\n)(.*?)(<!-- /results:\2 -->)", re.DOTALL)
SECTION = re.compile(r"<!-- readme -->\n(.*?)<!-- /readme -->", re.DOTALL)


def producer(name: str) -> str | None:
    """The benchmark script whose source mentions results/NAME.md (benchmarks/NAME.py first), as a
    command line."""
    scripts = sorted((ROOT / "benchmarks").rglob("*.py"), key=lambda p: (p.stem != name, str(p)))
    for script in scripts:
        if script.name == Path(__file__).name:
            continue
        text = script.read_text(encoding="utf-8", errors="replace")
        if re.search(rf"(?<![\w.-]){re.escape(name)}\.md", text):  # not default_quality.md for quality.md
            return f"python {script.relative_to(ROOT)}"
    return None


def tables(markdown: str) -> str:
    """Every table of a markdown document, each under its nearest heading (as bold text)."""
    out, heading, block = [], None, []

    def flush():
        if block:
            if heading:
                out.append(f"**{heading}**\n")
            out.append("\n".join(block) + "\n")
            block.clear()

    for line in markdown.splitlines():
        if line.startswith("#"):
            flush()
            heading = line.lstrip("#").strip()
        elif line.lstrip().startswith("|"):
            block.append(line)
        else:
            flush()
    flush()
    return "\n".join(out)


def generated(name: str) -> str:
    source = RESULTS / f"{name}.md"
    command = producer(name)
    if not source.is_file():
        if command:
            return f"_No results yet: run `{command}` to write `benchmarks/results/{name}.md`._\n"
        return f"_No results yet: the benchmark that writes `benchmarks/results/{name}.md` is not there yet._\n"
    text = source.read_text(encoding="utf-8")
    chosen = SECTION.search(text)
    body = chosen.group(1).strip() + "\n" if chosen else tables(text)
    origin = f"`benchmarks/results/{name}.md`" + (f" (written by `{command}`)" if command else "")
    return f"{body}\n_From {origin}; copied by `benchmarks/update_readme.py`._\n"


def update(readme: str) -> str:
    return MARKERS.sub(lambda m: m.group(1) + generated(m.group(2)) + m.group(4), readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is out of date")
    args = parser.parse_args(argv)
    before = args.readme.read_text(encoding="utf-8")
    after = update(before)
    names = [m.group(2) for m in MARKERS.finditer(before)]
    if args.check:
        stale = after != before
        print(f"{args.readme}: {'out of date' if stale else 'up to date'} ({', '.join(names) or 'no markers'})")
        return int(stale)
    if after != before:
        tmp = args.readme.with_name(f".{args.readme.name}.tmp")
        tmp.write_text(after, encoding="utf-8")
        tmp.replace(args.readme)
    print(f"updated {', '.join(names) or 'no markers'} in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
