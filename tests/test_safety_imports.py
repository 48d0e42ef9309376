"""No verb imports code from the working directory (issue 25, item 1).

torch, scipy, transformers, matplotlib and lm_eval try optional imports that are not installed;
with the working directory on sys.path a file of that name there (cython.py, triton.py, ...)
would run inside the verb. Every verb runs here as a subprocess, through `python -m grape` and
the `grape` console script, from a folder full of such files, each of which leaves a marker when
imported: no marker may appear. `--plugin` imports exactly what it names: a .py file (its folder
not searched) or a module Python can import (PYTHONPATH, installed), never one found only in the
working directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_workspace import make_workspace

from grape.cli.main import main
from solvers.plan import Plan

REPO = Path(__file__).resolve().parents[1]
# optional imports the verbs attempt and that are not installed (found by recording failed
# imports with a sys.meta_path hook while every verb ran), plus well-known optional ones
BAIT = sorted({
    "Bio", "Cython", "OpenSSL", "aim", "apex", "awscrt", "backports", "bitsandbytes", "bottleneck",
    "brotli", "brotlicffi", "clearml", "comet_ml", "coptpy", "cplex", "cuda", "cupy", "cvxopt",
    "cython", "daqp", "deepspeed", "duckdb", "dvclive", "ecos", "envwrap", "faiss", "flash_attn",
    "flash_attn_interface", "fx2trt_oss", "gmpy", "gmpy2", "gurobipy", "h2", "hf_transfer", "hqq",
    "isal", "jax", "kernels", "librosa", "lz4", "mistral_common", "mlflow", "mlx", "monkeytype",
    "mosek", "nibabel", "numexpr", "onnx", "onnxruntime", "opt_einsum", "org", "osqp_cuda",
    "polars", "py7zr", "pydot", "pynvml", "pyscipopt", "pyzstd", "rarfile", "redis",
    "sentencepiece", "simplejson", "sksparse", "snappy", "socks", "socksio", "soundfile", "soxr",
    "sqlalchemy", "swanlab", "tensorboard", "tensorboardX", "tensorflow", "tensorrt", "torch2trt",
    "torch_mlu", "torch_musa", "torch_npu", "torch_xla", "torchao", "torchaudio", "torchcodec",
    "torchcomms", "torchdistx", "torchvision", "trackio", "tree", "triton", "tvm", "uarray",
    "wandb", "xarray", "xpress", "zstandard",
})
ENTRY_POINTS = ("module", "script")
TIMEOUT = 300


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    if "PYTHONPATH" not in extra:
        env.pop("PYTHONPATH", None)  # sys.path exactly as the interpreter sets it
    return env


def grape(entry: str, argv: list, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """One `grape` command from `cwd`, as `python -m grape` or as the console script."""
    if entry == "module":
        command = [sys.executable, "-m", "grape"]
    else:
        script = shutil.which("grape")
        if script is None:
            pytest.skip("the grape console script is not installed")
        command = [script]
    return subprocess.run([*command, *map(str, argv)], cwd=cwd, env=_env(**env), text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT)


def write_bait(folder: Path, markers: Path) -> None:
    """One file per name; importing it leaves a marker, then fails as the missing module would,
    so a library that imports it carries on as usual."""
    for name in BAIT:
        (folder / f"{name}.py").write_text(
            f"open({str(markers / name)!r}, 'w').close()\n"
            f"raise ImportError('bait module {name}')\n", encoding="utf-8")


def ran(markers: Path) -> list[str]:
    return sorted(p.name for p in markers.iterdir())


# -- a shared workspace: model, scores, plan, checkpoint -----------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("safety_ws"))


@pytest.fixture(scope="module")
def made(ws):
    """Inputs for every verb, made in this process (no bait involved)."""
    root = ws.root
    for argv in (["calibrate", "--model", ws.model, "--data", ws.calibration, "--out", root / "s.npz",
                  "--samples", "4", "--seq-len", "32", "--subsample", "32", "--no-progress"],
                 ["solve", "--scores", root / "s.npz", "--budget", "9", "--out", root / "plan.json"],
                 ["apply", "--model", ws.model, "--plan", root / "plan.json", "--out", root / "ck"]):
        assert main([str(a) for a in argv]) == 0
    return {"scores": root / "s.npz", "plan": root / "plan.json", "checkpoint": root / "ck"}


@pytest.fixture()
def bait(tmp_path):
    """(working directory full of bait files, the folder their markers go to)."""
    folder, markers = tmp_path / "cwd", tmp_path / "markers"
    folder.mkdir()
    markers.mkdir()
    write_bait(folder, markers)
    return folder, markers


def verb_argv(verb: str, ws, made, out: Path) -> list:
    heldout = [str(p) for p in ws.heldout]
    return {
        "calibrate": ["calibrate", "--model", ws.model, "--data", ws.calibration, "--out",
                      out / "s.npz", "--samples", "4", "--seq-len", "32", "--subsample", "32",
                      "--no-progress"],
        "solve": ["solve", "--scores", made["scores"], "--budget", "9", "--out", out / "plan.json"],
        "apply": ["apply", "--model", ws.model, "--plan", made["plan"], "--out", out / "ck"],
        "apply-merge": ["apply", "--model", ws.model, "--plan", made["plan"], "--out", out / "ck",
                        "--method", "merge", "--scores", made["scores"]],
        "eval": ["eval", "--model", made["checkpoint"], "--data", *heldout, "--out", out / "ev",
                 "--seq-len", "32", "--tasks", "local", "--task-kinds", "cloze", "--task-limit", "4",
                 "--no-progress"],
        "compare": ["compare", "--scores", made["scores"], "--budget", "9", "--out", out / "cmp",
                    "--time-limit", "5"],
        "inspect": ["inspect", made["checkpoint"]],
        "inspect-scores": ["inspect", made["scores"]],
        "synth": ["synth", "--shape", "mixtral-8x7b", "--out", out / "synth.npz"],
        "run": ["run", "--model", ws.model, "--scores", made["scores"], "--eval-data", *heldout,
                "--out", out / "run", "--eval-tokens", "128", "--eval-seq-len", "32",
                "--baselines", "none", "--compare-time-limit", "2", "--time-limit", "5",
                "--no-progress", "--device", "cpu"],
    }[verb]


LIGHT = ("solve", "compare", "inspect", "inspect-scores", "synth", "apply")
HEAVY = ("calibrate", "apply-merge", "eval", "run")  # load a model: seconds each


def _cases():
    for entry in ENTRY_POINTS:
        for verb in LIGHT + HEAVY:
            # the two reproductions (solve imported cython.py, apply GPU and plotting
            # modules) through `python -m grape` stay in the quick suite; the other runs start
            # an interpreter for seconds each: the slow set (CI, scripts/test.sh --all)
            slow = (entry, verb) not in (("module", "solve"), ("module", "apply"))
            yield pytest.param(entry, verb, marks=[pytest.mark.slow] if slow else [],
                               id=f"{entry}-{verb}")


@pytest.mark.parametrize("entry, verb", list(_cases()))
def test_no_verb_runs_files_of_the_working_directory(entry, verb, ws, made, bait, tmp_path):
    folder, markers = bait
    proc = grape(entry, verb_argv(verb, ws, made, tmp_path / "out"), folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ran(markers) == [], f"grape {verb} imported files of the working directory"


def test_the_bait_works_when_the_working_directory_is_on_sys_path(made, bait):
    """The control: with the working directory on sys.path (as load_plugins once put it),
    `grape solve` imports cython.py from it, so the test above would see it."""
    folder, markers = bait
    code = ("import os, sys; sys.path.append(os.getcwd()); from grape.cli.main import main; "
            f"sys.exit(main(['solve', '--scores', {str(made['scores'])!r}, '--budget', '9', "
            f"'--out', {str(folder.parent / 'p.json')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=folder, env=_env(), text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cython" in ran(markers)


# -- --plugin -----------------------------------------------------------------------------------
def _documented_plugin() -> str:
    text = (REPO / "docs" / "extending.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(# my_grape_plugin\.py\n.*?)```", text, flags=re.S)[0]


PLUGIN_FLAGS = ["--objective", "shared_load", "--constraint", "max_kept:count=5"]


def _solve_with(plugin: str, made, cwd: Path, out: Path, entry: str = "module", **env: str):
    return grape(entry, ["solve", "--scores", made["scores"], "--budget", "9", "--out", out,
                         "--plugin", plugin, *PLUGIN_FLAGS], cwd, **env)


def _check_plugin_plan(out: Path) -> None:
    plan = Plan.load(out)
    assert max(plan.kept_counts().values()) <= 5
    assert "shared_load" in json.dumps(plan.provenance)


QUICK_ENTRY = ["module", pytest.param("script", marks=pytest.mark.slow)]


@pytest.mark.parametrize("entry", QUICK_ENTRY)
def test_a_plugin_file_in_the_working_directory_loads_and_nothing_else(entry, made, bait, tmp_path):
    """The documented form, `--plugin ./my_grape_plugin.py`, from a folder full of bait."""
    folder, markers = bait
    (folder / "my_grape_plugin.py").write_text(_documented_plugin(), encoding="utf-8")
    proc = _solve_with("./my_grape_plugin.py", made, folder, tmp_path / "plan.json", entry)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_plugin_plan(tmp_path / "plan.json")
    assert ran(markers) == []


def test_a_plugin_file_elsewhere_loads_without_its_folder_on_the_path(made, bait, tmp_path):
    folder, markers = bait
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    write_bait(plugins, markers)  # its own folder is not searched either
    (plugins / "my_grape_plugin.py").write_text(_documented_plugin(), encoding="utf-8")
    proc = _solve_with("../plugins/my_grape_plugin.py", made, folder, tmp_path / "plan.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_plugin_plan(tmp_path / "plan.json")
    assert ran(markers) == []


def test_a_plugin_module_loads_from_pythonpath(made, bait, tmp_path):
    folder, markers = bait
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "my_grape_plugin.py").write_text(_documented_plugin(), encoding="utf-8")
    proc = _solve_with("my_grape_plugin", made, folder, tmp_path / "plan.json",
                       PYTHONPATH=str(plugins))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_plugin_plan(tmp_path / "plan.json")
    assert ran(markers) == []


@pytest.mark.parametrize("entry", QUICK_ENTRY)
@pytest.mark.parametrize("plugin, says", [
    ("no_such_grape_plugin", "cannot be imported"),
    ("my_grape_plugin", "cannot be imported"),  # only in the working directory: not searched
    ("./missing_plugin.py", "no such file"),
    ("plugins/", "is not a .py file"),
])
def test_a_plugin_that_cannot_load_is_one_line_and_exit_2(entry, plugin, says, made, bait, tmp_path):
    folder, markers = bait
    (folder / "my_grape_plugin.py").write_text(_documented_plugin(), encoding="utf-8")
    proc = _solve_with(plugin, made, folder, tmp_path / "plan.json", entry)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and plugin in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and ran(markers) == []


def test_the_plugin_help_names_both_forms():
    proc = grape("module", ["solve", "--help"], REPO)
    assert proc.returncode == 0
    help_text = " ".join(proc.stdout.split())
    assert "./my_plugin.py" in help_text and "working directory is never searched" in help_text
