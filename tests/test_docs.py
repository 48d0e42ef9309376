"""Every fenced code block of README.md and docs/*.md runs as written, on the embedded test-bed
model, as a newcomer would run it (issue 16). A snippet that stops working fails here.

How a block is treated, by its language tag (every block must have one):

* ``bash``: each command (``\\`` continuations joined, ``#`` comments dropped, ``~`` and ``*``
  expanded as the shell does) must be a ``grape`` command; it runs in-process through
  ``grape.cli.main.main`` and must exit 0.
* ``python``: executed in order, the blocks of one page sharing one namespace. A block whose
  first line is ``# NAME.py`` is a module the reader writes: it is saved as NAME.py and run in a
  fresh interpreter (so its registrations do not leak into this test process).
* ``yaml`` / ``toml`` / ``json``: parsed (a JSON block may be the members of an object, as
  quoted from a larger file); a YAML or TOML block with a section named after a grape verb is
  loaded as a recipe of each verb it names (keys, types and choices checked).
* ``text``: a picture, a listing or printed output; not code.

A block that cannot run here (it installs packages, or needs vLLM) is preceded by an HTML
comment ``<!-- not run: REASON -->``, so every skip is visible in the markdown and deliberate.

**Small sizes: one mechanism.** Before a block runs, the replacements in ``SUBSTITUTIONS`` below
are applied to its text, and nothing else changes a snippet: models that are not on this
machine (``/models/Qwen3-30B-A3B``, ``./DeepSeek-V3``, ``MODEL_DIR``, ...) become the test-bed
model, a GPU (``"cuda:0"``) becomes the CPU, and sizes
become small ones (``--samples 1024`` -> ``--samples 4``, ``seq_len=2048`` -> ``seq_len=64``,
evaluation capped at 256 tokens per domain and 4 examples of one local task kind, solver time
limits of seconds, no progress bars). docs/index.md
("Code in these pages") describes the same table.

Each page runs in a fresh workspace folder (its current directory, and $HOME) holding the inputs
the snippets name: ``my_corpus/``, ``corpus/`` and ``extra.jsonl`` (calibration text),
``heldout/`` (held-out splits plus the calibration sample, as in benchmarks/zoo/heldout/),
``my.jsonl`` (held-out documents with domains), ``scores.npz`` and ``plan.json`` (the test-bed
model calibrated, and a uniform 25% plan), ``out/pruned/`` (that plan applied),
``my_lm_eval_tasks/`` (a small lm-eval task, my_task) and ``benchmarks`` (this repository's).
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from grape import testbed
from grape.cli.main import main

REPO = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]
MODEL = str(testbed.model_dir())

# the one mechanism for small sizes and for models that are not here (see the docstring)
SUBSTITUTIONS = [
    # models and devices that are not on this machine
    (r"(?<![\w/])/models/[\w.-]+|(?<![\w/.])\./(?:Qwen|DeepSeek|Mixtral|Kimi|OLMoE|gpt-oss)[\w.-]*"
     r"|\bMODEL_DIR\b", MODEL),
    (r"""(["'])cuda(?::\d+)?\1""", r"\1cpu\1"),
    # sizes
    (r"--samples \d+", "--samples 4"),
    (r"\bsamples=\d+", "samples=4"),
    (r"--seq-len \d+", "--seq-len 64"),
    (r"\bseq_len=\d+", "seq_len=64"),
    (r"--subsample \d+", "--subsample 32"),
    (r"\bsubsample=\d+", "subsample=32"),
    (r"\btime_limit=\d+", "time_limit=2"),
    (r"\bgrape compare ", "grape compare --time-limit 1 "),
    (r"\bgrape eval ", "grape eval --max-tokens 256 --task-kinds scramble --task-examples 4 --no-progress "),
    # flags put first: a size the command leaves at its default is small too (the last flag wins)
    (r"\bgrape calibrate ", "grape calibrate --samples 4 --seq-len 64 --subsample 32 --no-progress "),
    (r"\bEvalConfig\(", "EvalConfig(max_tokens_per_domain=256, local_task_kinds=('scramble',), "
                        "local_task_examples=4, progress=False, "),
]

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.M | re.S)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>.*?)\s*-->")
MODULE = re.compile(r"^#\s*(?P<path>[\w./-]+\.py)\s*$")
LANGUAGES = ("bash", "python", "yaml", "toml", "json", "text")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    text: str
    not_run: str | None  # the reason given in <!-- not run: ... -->, or None

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ({self.lang})"


def blocks(page: str) -> list[Block]:
    text = (REPO / page).read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip().splitlines()
        marker = NOT_RUN.search(before[-1]) if before else None
        out.append(Block(page, text.count("\n", 0, m.start()) + 1, m.group("lang").strip(),
                         textwrap.dedent(m.group("body")), marker.group("reason") if marker else None))
    return out


def substitute(text: str) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        text = re.sub(pattern, replacement, text)
    return text


# -- running one block ----------------------------------------------------------------------------
def commands(text: str) -> list[list[str]]:
    """The commands of a bash block, split and expanded as bash would (~, globs)."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        expanded = []
        for word in words:
            word = os.path.expanduser(word)
            matches = sorted(glob.glob(word)) if any(c in word for c in "*?[") else []
            expanded += matches or [word]
        if expanded:
            out.append(expanded)
    return out


def run_bash(block: Block, text: str, namespace: dict, modules: list) -> None:
    for argv in commands(text):
        assert argv[0] == "grape", f"{block}: `{' '.join(argv)}` is not a grape command; mark the " \
                                   "block <!-- not run: REASON --> if it cannot run here"
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = main(argv[1:])
        assert status == 0, f"{block}: `{' '.join(argv)}` exited {status}: {err.getvalue()[-2000:]}"


def run_python(block: Block, text: str, namespace: dict, modules: list) -> None:
    header = MODULE.match(text.splitlines()[0]) if text.strip() else None
    if header:  # a module the reader writes: run later, in its own interpreter
        path = Path("_snippets") / Path(header.group("path")).name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        modules.append(path)
        return
    exec(compile(text, str(block), "exec"), namespace)  # noqa: S102 - the documented snippet


def check_data(block: Block, text: str, namespace: dict, modules: list) -> None:
    if block.lang == "json":  # a whole file, or the members of one (`"key": value, ...`)
        try:
            json.loads(text)
        except json.JSONDecodeError:
            json.loads("{" + text + "}")
        return
    if block.lang == "toml":
        from grape.recipe import _toml_loads  # tomllib, or tomli on Python 3.10

        data = _toml_loads(text)
    else:
        data = yaml.safe_load(text)
    assert isinstance(data, dict), f"{block}: not a mapping"
    from grape import recipe

    parsers = __import__("grape.cli.main", fromlist=["build_parser"]).build_parser().verb_parsers
    for verb in [k for k in data if k in parsers]:  # a recipe: every verb it names accepts it
        path = Path(f"_recipe.{block.lang}")
        path.write_text(text, encoding="utf-8")
        recipe.prepare([verb, "--recipe", str(path)], parsers)


RUNNERS = {"bash": run_bash, "python": run_python, "yaml": check_data, "toml": check_data,
           "json": check_data, "text": lambda *args: None}


def run_modules(paths: list[Path]) -> None:
    """The module blocks of a page, each run in one fresh interpreter."""
    code = "import runpy, sys\nfor p in sys.argv[1:]:\n    runpy.run_path(p, run_name='__snippet__')"
    proc = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]


# -- the workspace ---------------------------------------------------------------------------------
MY_TASK = {
    "task": "my_task", "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
    "doc_to_text": "context", "doc_to_choice": "choices", "doc_to_target": "label",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 1.0},
}


def _seed_files(root: Path) -> None:
    heldout = testbed.calibration_file().parent
    shutil.copytree(heldout, root / "heldout")
    for folder in ("my_corpus", "corpus"):
        (root / folder).mkdir()
        shutil.copy(testbed.calibration_file(), root / folder / "calibration.jsonl")
    shutil.copy(testbed.calibration_file(), root / "extra.jsonl")
    lines = [line for name in ("prose", "python") for line in
             (heldout / f"{name}.test.jsonl").read_text(encoding="utf-8").splitlines()[:12]]
    (root / "my.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tasks = root / "my_lm_eval_tasks"
    tasks.mkdir()
    rows = [{"context": f"{a} plus {b} is", "choices": [f" {a + b}", f" {a + b + 1}"], "label": 0}
            for a, b in ((1, 2), (2, 3), (3, 4), (4, 5))]
    (tasks / "my_task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = {**MY_TASK, "dataset_kwargs": {"data_files": {"test": str(tasks / "my_task.jsonl")}}}
    (tasks / "my_task.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (root / "benchmarks").symlink_to(REPO / "benchmarks")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny forwards: one torch thread is as fast when the machine is idle, and does not
    stall for seconds in thread hand-offs when other processes share the cores (a 2-core CI)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs-seed")
    _seed_files(root)
    steps = [
        ["calibrate", "--model", MODEL, "--data", str(root / "extra.jsonl"), "--out", str(root / "scores.npz"),
         "--samples", "4", "--seq-len", "64", "--subsample", "32", "--no-progress", "--device-map", "cpu"],
        ["solve", "--scores", str(root / "scores.npz"), "--budget", "0.25", "--uniform", "--quiet",
         "--out", str(root / "plan.json")],
        ["apply", "--model", MODEL, "--plan", str(root / "plan.json"), "--out", str(root / "out" / "pruned")],
    ]
    for argv in steps:
        assert main(argv) == 0, argv
    return root


# -- the tests ------------------------------------------------------------------------------------
def test_every_block_has_a_language_and_runs_unless_marked():
    problems = []
    for page in PAGES:
        for block in blocks(page):
            if block.lang not in LANGUAGES:
                problems.append(f"{block}: tag the block with one of {', '.join(LANGUAGES)}")
            elif block.not_run == "":
                problems.append(f"{block}: <!-- not run: --> needs a reason")
            elif block.lang == "text" and block.not_run is not None:
                problems.append(f"{block}: a text block is never run; drop the not-run marker")
    assert not problems, "\n".join(problems)
    assert sum(len(blocks(p)) for p in PAGES) >= 30  # the fence pattern still finds the blocks


@pytest.mark.parametrize("page", [p for p in PAGES
                                  if any(b.not_run is None and b.lang != "text" for b in blocks(p))])
def test_the_code_blocks_of_each_page_run(page, seed, tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    shutil.copytree(seed, ws, symlinks=True)
    monkeypatch.chdir(ws)
    monkeypatch.setenv("HOME", str(ws))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__snippet__"}
    modules: list[Path] = []
    for block in blocks(page):
        if block.not_run is None:
            RUNNERS[block.lang](block, substitute(block.text), namespace, modules)
    if modules:
        run_modules(modules)


def test_substitutions_only_shrink_sizes_and_swap_absent_models():
    text = ("grape calibrate --model /models/Qwen3-30B-A3B --samples 1024 --seq-len 2048\n"
            "CalibrationConfig(samples=1024, seq_len=2048)")
    assert substitute(text) == ("grape calibrate --samples 4 --seq-len 64 --subsample 32 --no-progress "
                                f"--model {MODEL} --samples 4 --seq-len 64\n"
                                "CalibrationConfig(samples=4, seq_len=64)")
