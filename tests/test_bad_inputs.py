"""Every bad input, through the real command line: exit 2, one line on stderr naming the problem,
no traceback, and nothing written or changed anywhere in the workspace.

One table per verb. Each case is (id, argv, a phrase the error must contain); argv may name
the fixtures below through `{placeholders}`. The workspace is built once; a snapshot of every
file (size, modification time, permissions) before and after each case proves that a refused
command touched nothing. Plus: a closed pipe is quiet, and hypothesis fuzzes the scores and plan
loaders (they load or raise the project's own error, never anything else).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from cli_workspace import make_workspace
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grape.cli.main import main
from solvers.errors import PlanError, ScoresError, UserError
from solvers.plan import Plan
from solvers.scores import Scores
from solvers.synth import custom_shape, synth_scores

REPO = Path(__file__).resolve().parents[1]


# -- the workspace ----------------------------------------------------------------------------
def _rewrite_npz(src: Path, dst: Path, change) -> Path:
    """A copy of the scores archive `src` with `change(arrays)` applied (a dict name -> array)."""
    with np.load(src, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    change(arrays)
    with open(dst, "wb") as handle:
        np.savez(handle, **arrays)
    return dst


def _set_meta(arrays: dict, **changes) -> None:
    meta = json.loads(str(arrays["__meta__"]))
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    arrays["__meta__"] = np.array(json.dumps(meta))


def _bad_scores(root: Path, scores: Path) -> None:
    layer = "layer0/"

    def objects(a):
        a[layer + "count"] = np.array([None] * len(a[layer + "count"]), dtype=object)

    _rewrite_npz(scores, root / "no_model_key.npz", lambda a: _set_meta(a, model=None))
    _rewrite_npz(scores, root / "no_tokens_key.npz", lambda a: _set_meta(a, tokens=None))
    _rewrite_npz(scores, root / "object_array.npz", objects)
    _rewrite_npz(scores, root / "string_array.npz",
                 lambda a: a.__setitem__(layer + "gate_sum", a[layer + "gate_sum"].astype(str)))
    _rewrite_npz(scores, root / "negative_bytes.npz",
                 lambda a: a.__setitem__(layer + "expert_bytes", -a[layer + "expert_bytes"]))
    _rewrite_npz(scores, root / "nan_stats.npz",
                 lambda a: a[layer + "norm_sum"].__setitem__(0, np.nan))
    (root / "truncated.npz").write_bytes(scores.read_bytes()[: scores.stat().st_size // 2])


def _broken_models(root: Path, model: Path) -> None:
    truncated = shutil.copytree(model, root / "truncated_model")
    weights = truncated / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size - 64)
    corrupt = shutil.copytree(model, root / "corrupt_model")
    raw = bytearray((corrupt / "model.safetensors").read_bytes())
    raw[8:24] = b"not a json head!"
    (corrupt / "model.safetensors").write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    ws = make_workspace(root)
    scores, plan, low_plan = root / "scores.npz", root / "plan.json", root / "low_top_k.json"
    for argv in (
        ["calibrate", "--model", str(ws.model), "--data", str(ws.calibration), "--out", str(scores),
         "--samples", "4", "--seq-len", "32", "--subsample", "32", "--no-progress"],
        ["solve", "--scores", str(scores), "--budget", "0.25", "--out", str(plan), "--quiet"],
        # 20 of 24 experts with no floor: some layer keeps fewer than top_k = 2
        ["solve", "--scores", str(scores), "--budget", "20", "--min-kept", "1", "--out", str(low_plan),
         "--quiet"],
    ):
        assert main(argv) == 0, argv
    assert min(Plan.load(low_plan).kept_counts().values()) < 2
    _bad_scores(root, scores)
    _broken_models(root, ws.model)
    foreign = root / "foreign"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "notes.txt").write_text("x\n")
    (root / "notes.json").write_text('{"mine": true}\n')
    (root / "a_file").write_text("not a directory\n")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "latin1.jsonl").write_bytes(b'{"text": "ol\xe9"}\n')
    (root / "broken_plan.json").write_text('{"kept": {"0": "0,1"}, "removed": {}, "status": "optimal", '
                                           '"solver": "x"}')
    return {"root": root, "model": ws.model, "other": ws.other_model, "data": ws.calibration,
            "heldout": ws.heldout[0], "scores": scores, "plan": plan, "low_plan": low_plan,
            "foreign": foreign}


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        out[str(path.relative_to(root))] = (path.is_dir(), 0 if path.is_dir() else info.st_size,
                                            info.st_mtime_ns, info.st_mode)
    return out


def _refused(ws: dict, capsys, argv: list[str], phrase: str) -> str:
    argv = [a.format(**{k: str(v) for k, v in ws.items()}) for a in argv]
    before = _snapshot(ws["root"])
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, (argv, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"grape {argv[0]}: error: "), lines[0]
    assert phrase.lower() in lines[0].lower(), lines[0]
    assert _snapshot(ws["root"]) == before, "a refused command changed the workspace"
    return lines[0]


CAL = ["calibrate", "--model", "{model}", "--data", "{data}", "--samples", "2", "--seq-len", "16",
       "--no-progress"]
CALIBRATE = [
    ("truncated safetensors", ["calibrate", "--model", "{root}/truncated_model", "--data", "{data}",
                               "--out", "{root}/new.npz"], "truncated"),
    ("corrupt safetensors", ["calibrate", "--model", "{root}/corrupt_model", "--data", "{data}",
                             "--out", "{root}/new.npz"], "not a valid safetensors file"),
    ("missing model", ["calibrate", "--model", "{root}/nowhere", "--data", "{data}", "--out",
                       "{root}/new.npz"], "does not exist"),
    ("out under a file", [*CAL, "--out", "{root}/a_file/scores.npz"], "is a file"),
    ("out unwritable", [*CAL, "--out", "/proc/grape/scores.npz"], "cannot write"),
    ("out is a directory", [*CAL, "--out", "{foreign}"], "is a directory"),
    ("out is a foreign file", [*CAL, "--out", "{root}/notes.json"], "--overwrite"),
    ("out is the data", [*CAL, "--out", "{data}"], "is the input --data"),
    ("non-UTF-8 text", ["calibrate", "--model", "{model}", "--data", "{root}/latin1.txt", "--out",
                        "{root}/new.npz", "--samples", "1", "--seq-len", "2"], "byte 3"),
    ("non-UTF-8 JSONL", ["calibrate", "--model", "{model}", "--data", "{root}/latin1.jsonl", "--out",
                         "{root}/new.npz", "--samples", "1", "--seq-len", "2"], "not UTF-8"),
    ("device that does not exist", [*CAL, "--out", "{root}/new.npz", "--device-map", "cuda:7"],
     "does not exist"),
    ("disk without offload folder", [*CAL, "--out", "{root}/new.npz", "--device-map", '{{"": "disk"}}'],
     "--offload-folder"),
    ("not a device", [*CAL, "--out", "{root}/new.npz", "--device-map", "gpu9"], "not a device"),
]

SOLVE = [("budget " + b, ["solve", "--scores", "{scores}", "--budget", b], "finite")
         for b in ("nan", "inf", "1e400")] + [
    ("min-kept negative", ["solve", "--scores", "{scores}", "--budget", "0.25", "--min-kept", "-3"],
     "must not be negative"),
    ("min-kept word", ["solve", "--scores", "{scores}", "--budget", "0.25", "--min-kept", "abc"],
     "--min-kept 'abc'"),
    ("negative similarity-top-m", ["solve", "--scores", "{scores}", "--budget", "0.25", "--objective",
                                   "redundancy", "--similarity-top-m", "-2"], "--similarity-top-m"),
    ("negative coverage-candidates", ["solve", "--scores", "{scores}", "--budget", "0.25",
                                      "--objective", "coverage", "--coverage-candidates", "-1"],
     "--coverage-candidates"),
    ("nan objective weight", ["solve", "--scores", "{scores}", "--budget", "0.25", "--objective",
                              "nan*additive"], "finite positive"),
    ("inf objective weight", ["solve", "--scores", "{scores}", "--budget", "0.25", "--objective",
                              "redundancy+1e400*additive"], "finite positive"),
    ("out is the scores", ["solve", "--scores", "{scores}", "--budget", "0.25", "--out", "{scores}"],
     "is the input --scores"),
    ("out is a foreign file", ["solve", "--scores", "{scores}", "--budget", "0.25", "--out",
                               "{root}/notes.json"], "not a plan file grape wrote"),
] + [(f"scores {name}", ["solve", "--scores", "{root}/" + f"{name}.npz", "--budget", "0.25"], phrase)
     for name, phrase in (("no_model_key", "'model'"), ("no_tokens_key", "'tokens'"),
                          ("object_array", "scores file"),
                          ("string_array", "expected real numbers"),
                          ("negative_bytes", "expert_bytes"), ("nan_stats", "NaN"),
                          ("truncated", "scores file"))]

APPLY = [
    ("out is a foreign non-empty folder", ["apply", "--model", "{model}", "--plan", "{plan}", "--out",
                                           "{foreign}"], "--overwrite"),
    ("out is the model", ["apply", "--model", "{model}", "--plan", "{plan}", "--out", "{model}"],
     "is the input --model"),
    ("out inside the model", ["apply", "--model", "{model}", "--plan", "{plan}", "--out",
                              "{model}/pruned"], "is inside the input --model"),
    ("out around the model", ["apply", "--model", "{model}", "--plan", "{plan}", "--out", "{root}",
                              "--overwrite"], "contains the input"),
    ("out under a file", ["apply", "--model", "{model}", "--plan", "{plan}", "--out",
                          "{root}/a_file/pruned"], "is a file"),
    ("plan below top_k", ["apply", "--model", "{model}", "--plan", "{low_plan}", "--out",
                          "{root}/new_ckpt"], "--allow-lower-top-k"),
    ("damaged plan", ["apply", "--model", "{model}", "--plan", "{root}/broken_plan.json", "--out",
                      "{root}/new_ckpt"], "broken_plan.json"),
    ("plan of another family", ["apply", "--model", "{other}", "--plan", "{plan}", "--out",
                                "{root}/new_ckpt"], "different model"),
    ("truncated safetensors", ["apply", "--model", "{root}/truncated_model", "--plan", "{plan}",
                               "--out", "{root}/new_ckpt"], "truncated"),
]

OTHERS = [
    ("compare budget", ["compare", "--scores", "{scores}", "--budget", "nan", "--out", "{root}/cmp"],
     "finite"),
    ("compare min-kept", ["compare", "--scores", "{scores}", "--min-kept", "-3", "--out", "{root}/cmp"],
     "must not be negative"),
    ("compare foreign out", ["compare", "--scores", "{scores}", "--out", "{foreign}"], "--overwrite"),
    ("eval device", ["eval", "--model", "{model}", "--data", "{heldout}", "--out", "{root}/ev",
                     "--device", "cuda:5"], "does not exist"),
    ("eval corrupt model", ["eval", "--model", "{root}/corrupt_model", "--data", "{heldout}", "--out",
                            "{root}/ev"], "safetensors"),
    ("eval out in the model", ["eval", "--model", "{model}", "--data", "{heldout}", "--out",
                               "{model}/eval"], "inside the input --model"),
    ("run out is the model", ["run", "--model", "{model}", "--data", "{data}", "--eval-data",
                              "{heldout}", "--out", "{model}"], "is the input --model"),
    ("run min-kept below top_k", ["run", "--model", "{model}", "--data", "{data}", "--eval-data",
                                  "{heldout}", "--out", "{root}/run", "--min-kept", "1"],
     "--allow-lower-top-k"),
    ("run device", ["run", "--model", "{model}", "--data", "{data}", "--eval-data", "{heldout}",
                    "--out", "{root}/run", "--device", "cuda:3"], "does not exist"),
    ("synth foreign out", ["synth", "--shape", "mixtral-8x7b", "--out", "{root}/notes.json"],
     "not a scores file grape wrote"),
    ("inspect damaged scores", ["inspect", "{root}/truncated.npz"], "scores file"),
]


@pytest.mark.parametrize("case, argv, phrase", CALIBRATE, ids=[c[0] for c in CALIBRATE])
def test_calibrate_refuses(ws, capsys, case, argv, phrase):
    _refused(ws, capsys, argv, phrase)


@pytest.mark.parametrize("case, argv, phrase", SOLVE, ids=[c[0] for c in SOLVE])
def test_solve_refuses(ws, capsys, case, argv, phrase):
    _refused(ws, capsys, argv, phrase)


@pytest.mark.parametrize("case, argv, phrase", APPLY, ids=[c[0] for c in APPLY])
def test_apply_refuses(ws, capsys, case, argv, phrase):
    _refused(ws, capsys, argv, phrase)


@pytest.mark.parametrize("case, argv, phrase", OTHERS, ids=[c[0] for c in OTHERS])
def test_other_verbs_refuse(ws, capsys, case, argv, phrase):
    _refused(ws, capsys, argv, phrase)


def test_acceptance_foreign_folder_kept_and_model_unchanged(ws, capsys):
    """The issue's acceptance, literally: notes.txt intact, the model unchanged."""
    _refused(ws, capsys, ["apply", "--model", "{model}", "--plan", "{plan}", "--out", "{foreign}"],
             "non-empty")
    assert (ws["foreign"] / "notes.txt").read_text() == "x\n" and (ws["foreign"] / "sub").is_dir()
    _refused(ws, capsys, ["apply", "--model", "{model}", "--plan", "{plan}", "--out", "{model}"],
             "destroy")


def test_overwrite_replaces_a_foreign_folder_and_a_checkpoint_is_replaced_in_place(ws, tmp_path):
    out = tmp_path / "ckpt"
    (out / "old").mkdir(parents=True)
    (out / "old" / "f.txt").write_text("old\n")
    argv = ["apply", "--model", str(ws["model"]), "--plan", str(ws["plan"]), "--out", str(out)]
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "old").exists() and (out / "grape_provenance.json").is_file()
    assert main(argv) == 0  # a checkpoint grape wrote is replaced without --overwrite
    assert not list(tmp_path.glob(".ckpt.*")), "temporary folders left behind"


def test_outputs_respect_the_umask(ws, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "ckpt"
        assert main(["apply", "--model", str(ws["model"]), "--plan", str(ws["plan"]), "--out", str(out)]) == 0
        assert main(["solve", "--scores", str(ws["scores"]), "--budget", "0.25", "--out",
                     str(tmp_path / "p.json"), "--quiet"]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    for path in [*out.rglob("*"), tmp_path / "p.json", tmp_path / "p.recipe.yaml"]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


def test_a_closed_pipe_is_quiet(ws):
    """`grape inspect ... | head`: the reader goes away; no traceback, no error line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "grape", "inspect", str(ws["scores"])],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before grape writes anything: every write meets a closed pipe
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err.decode().strip() == ""


# -- fuzzing the loaders ----------------------------------------------------------------------
def _scores_file(scores: Scores) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.npz"
        scores.save(path)
        return path.read_bytes()


SCORES_BYTES = _scores_file(synth_scores(custom_shape(layers=2, experts=4, top_k=2), seed=0))
SCORES_ARRAYS = dict(np.load(io.BytesIO(SCORES_BYTES), allow_pickle=False))


def _mutated_array(draw, array: np.ndarray) -> np.ndarray:
    kind = draw(st.sampled_from(["nan", "inf", "negative", "dtype", "shape", "empty", "scalar"]))
    out = np.array(array, copy=True)
    if kind in ("nan", "inf", "negative") and out.size and out.dtype.kind in "fi":
        out = out.astype(np.float64)
        out.flat[draw(st.integers(0, out.size - 1))] = {"nan": np.nan, "inf": np.inf, "negative": -1.0}[kind]
    elif kind == "dtype":
        out = out.astype(draw(st.sampled_from(["U8", "S4", "bool", "complex128", "float16", "int8"])))
    elif kind == "shape":
        out = np.resize(out, (draw(st.integers(0, 6)),) * draw(st.integers(1, 2)))
    elif kind == "empty":
        out = np.zeros((0,))
    else:
        out = np.float64(draw(st.floats(allow_nan=True)))
    return out


@st.composite
def damaged_scores_files(draw) -> bytes:
    mode = draw(st.sampled_from(["truncate", "flip", "array", "drop", "meta"]))
    if mode == "truncate":
        return SCORES_BYTES[: draw(st.integers(0, len(SCORES_BYTES) - 1))]
    if mode == "flip":
        raw = bytearray(SCORES_BYTES)
        for _ in range(draw(st.integers(1, 8))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw)
    arrays = dict(SCORES_ARRAYS)
    names = sorted(arrays)
    if mode == "array":
        name = draw(st.sampled_from([n for n in names if n != "__meta__"]))
        arrays[name] = _mutated_array(draw, arrays[name])
    elif mode == "drop":
        arrays.pop(draw(st.sampled_from(names)))
    else:
        meta = json.loads(str(arrays["__meta__"]))
        key = draw(st.sampled_from(sorted(meta) + ["model.experts_per_layer", "model.top_k"]))
        value = draw(st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=3), st.lists(st.integers(), max_size=2),
                               st.dictionaries(st.sampled_from(["0", "1", "x"]), st.integers(-1, 9), max_size=2)))
        target, _, sub = key.partition(".")
        if sub and isinstance(meta.get(target), dict):
            meta[target][sub] = value
        elif value is None:
            meta.pop(target, None)
        else:
            meta[target] = value
        arrays["__meta__"] = np.array(json.dumps(meta))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _loads_or_raises(load, path: Path, error: type[UserError]) -> None:
    """`load(path)` returns, or raises `error` with a one-line message; anything else fails."""
    try:
        load(path)
    except error as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(data=damaged_scores_files())
def test_fuzzed_scores_files_load_or_raise_a_scores_error(tmp_path, data):
    (tmp_path / "fuzzed.npz").write_bytes(data)
    _loads_or_raises(Scores.load, tmp_path / "fuzzed.npz", ScoresError)


PLAN_JSON = {"format": "grape.plan", "version": 1, "kept": {"0": [0, 1], "1": [1, 2]},
             "removed": {"0": [2, 3], "1": [0, 3]}, "merge_map": {}, "status": "optimal",
             "objective": 1.5, "bound": 1.5, "gap": 0.0, "solver": "exact", "seconds": 0.1,
             "model": {}, "provenance": {}}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 9) | st.floats(allow_nan=True) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["0", "1", "2", "x"]),
                                                                inner, max_size=3),
    max_leaves=6)


@st.composite
def damaged_plan_files(draw) -> str:
    text = json.dumps(PLAN_JSON)
    mode = draw(st.sampled_from(["truncate", "value", "drop", "whole"]))
    if mode == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))]
    if mode == "whole":
        return json.dumps(draw(JSON_VALUES))
    plan = json.loads(text)
    key = draw(st.sampled_from(sorted(plan)))
    if mode == "drop":
        del plan[key]
    else:
        plan[key] = draw(JSON_VALUES)
    return json.dumps(plan)


@FUZZ
@given(text=damaged_plan_files())
def test_fuzzed_plan_files_load_or_raise_a_plan_error(tmp_path, text):
    (tmp_path / "fuzzed.json").write_text(text)
    _loads_or_raises(Plan.load, tmp_path / "fuzzed.json", PlanError)


def test_the_fuzz_targets_are_valid_to_begin_with(tmp_path):
    (tmp_path / "s.npz").write_bytes(SCORES_BYTES)
    (tmp_path / "p.json").write_text(json.dumps(PLAN_JSON))
    assert Scores.load(tmp_path / "s.npz").tokens > 0
    assert Plan.load(tmp_path / "p.json").num_removed == 4
    with zipfile.ZipFile(tmp_path / "s.npz") as archive:
        assert "__meta__.npy" in archive.namelist()


@pytest.mark.parametrize("field, value, phrase", [
    ("expert_bytes", [-1, 2], "expert_bytes"), ("importance", [np.nan, 1.0], "importance"),
])
def test_the_python_problem_refuses_bad_layers(field, value, phrase):
    from solvers.problem import Layer

    values = {"importance": [1.0, 2.0], "expert_bytes": [2, 2], field: value}
    with pytest.raises(UserError, match=phrase):
        Layer(0, np.asarray(values["importance"]), np.asarray(values["expert_bytes"]), 1)
