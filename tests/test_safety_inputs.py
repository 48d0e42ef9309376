"""Inputs that used to run silently wrong, hang or crash (issue 25, items 3 and 6), through the
real command line: exit 2, one line on stderr naming the problem, and nothing written.

Silent wrong results: a model folder without a tokenizer (transformers builds an empty one), a
config.json declaring more layers than the weights hold, JSONL text that is a number, list or
object, a plan without its `model` block, and a resumed calibration picking up the saved state
of a run with other settings. Special inputs: /dev/zero as a plan or scores file, a pipe given
to inspect (read once), config.json values the model cannot be built from.

One table per item, each case (id, argv, a phrase the error must contain); argv may name the
fixtures through `{placeholders}`. The workspace is built once, and a snapshot of every file
before and after each refused case proves that nothing was written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_workspace import make_workspace

from grape.cli.main import main
from tests.test_bad_inputs import _refused, _snapshot  # one refusal check for every bad-input table

REPO = Path(__file__).resolve().parents[1]


# -- the workspace ----------------------------------------------------------------------------
def _copy_model(model: Path, target: Path, change_config=None) -> Path:
    """A copy of the model folder, its config.json edited by `change_config(dict)`."""
    shutil.copytree(model, target)
    if change_config is not None:
        config = json.loads((target / "config.json").read_text())
        change_config(config)
        (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def _empty_tokenizer(folder: Path) -> None:
    """A tokenizer.json that knows two words: every other word is unknown."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))


def _bad_models(root: Path, model: Path) -> None:
    no_tokenizer = _copy_model(model, root / "no_tokenizer")
    for file in no_tokenizer.glob("tokenizer*"):
        file.unlink()
    _empty_tokenizer(_copy_model(model, root / "empty_tokenizer"))
    _copy_model(model, root / "more_layers",
                lambda c: c.update(num_hidden_layers=c["num_hidden_layers"] + 2))
    for name, change in CONFIG_CHANGES.items():
        _copy_model(model, root / name, change)


def _drop(key: str):
    return lambda config: config.pop(key)


# the tiny qwen3_moe model: 8 experts (num_local_experts), top_k 2 (num_experts_per_tok)
CONFIG_CHANGES = {
    "top_k_zero": lambda c: c.update(num_experts_per_tok=0),
    "top_k_above_experts": lambda c: c.update(num_experts_per_tok=9),
    "experts_as_string": lambda c: c.update(num_local_experts="8"),
    "no_expert_count": _drop("num_local_experts"),
    "unknown_type": lambda c: c.update(model_type="frobnicator"),
}


def _bad_data(root: Path) -> None:
    rows = {"number": [{"text": "fine text"}, {"text": 42}], "list": [{"text": ["a", "b"]}],
            "object": [{"text": {"body": "x"}}]}
    for name, records in rows.items():
        (root / f"{name}_text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety_inputs")
    ws = make_workspace(root)
    scores, plan = root / "scores.npz", root / "plan.json"
    for argv in (
        ["calibrate", "--model", str(ws.model), "--data", str(ws.calibration), "--out", str(scores),
         "--samples", "4", "--seq-len", "32", "--subsample", "32", "--no-progress"],
        ["solve", "--scores", str(scores), "--budget", "0.25", "--out", str(plan), "--quiet"],
    ):
        assert main(argv) == 0, argv
    unchecked = json.loads(plan.read_text())
    del unchecked["model"]
    (root / "no_model_plan.json").write_text(json.dumps(unchecked))
    _bad_models(root, ws.model)
    _bad_data(root)
    return {"root": root, "model": ws.model, "data": ws.calibration, "heldout": ws.heldout[0],
            "scores": scores, "plan": plan}


def _argv(ws: dict, argv: list[str]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in ws.items()}) for a in argv]


def _calibrate(model: str, data: str = "{data}") -> list[str]:
    return ["calibrate", "--model", model, "--data", data, "--out", "{root}/new.npz",
            "--samples", "2", "--seq-len", "16", "--no-progress"]


def _eval(model: str) -> list[str]:
    return ["eval", "--model", model, "--data", "{heldout}", "--out", "{root}/ev",
            "--seq-len", "16"]


# -- item 3: silent wrong results ---------------------------------------------------------------
SILENT = [
    ("calibrate without tokenizer", _calibrate("{root}/no_tokenizer"), "--tokenizer DIR"),
    ("eval without tokenizer", _eval("{root}/no_tokenizer"), "has no tokenizer files"),
    ("calibrate with empty tokenizer", _calibrate("{root}/empty_tokenizer"), "empty tokenizer"),
    ("eval with empty tokenizer", _eval("{root}/empty_tokenizer"), "empty tokenizer"),
    ("calibrate more layers than weights", _calibrate("{root}/more_layers"), "layer(s) 3-4"),
    ("eval more layers than weights", _eval("{root}/more_layers"), "num_hidden_layers"),
    ("JSONL text a number", _calibrate("{model}", "{root}/number_text.jsonl"),
     "number_text.jsonl:2: field 'text' holds a number"),
    ("JSONL text a list", _calibrate("{model}", "{root}/list_text.jsonl"),
     "list_text.jsonl:1: field 'text' holds a list"),
    ("JSONL text an object", _calibrate("{model}", "{root}/object_text.jsonl"),
     "object_text.jsonl:1: field 'text' holds an object"),
    ("plan without model block", ["apply", "--model", "{model}", "--plan",
                                  "{root}/no_model_plan.json", "--out", "{root}/pruned"],
     "--skip-model-check"),
]


@pytest.mark.parametrize("case, argv, phrase", SILENT, ids=[c[0] for c in SILENT])
def test_silent_wrong_results_are_refused(ws, capsys, case, argv, phrase):
    _refused(ws, capsys, argv, phrase)


def test_the_fixes_the_errors_name_work(ws, tmp_path, capsys):
    """--tokenizer DIR calibrates the tokenizer-less model; --skip-model-check applies the plan."""
    out = tmp_path / "s.npz"
    assert main(_argv(ws, ["calibrate", "--model", "{root}/no_tokenizer", "--tokenizer", "{model}",
                           "--data", "{data}", "--out", str(out), "--samples", "2", "--seq-len",
                           "16", "--no-progress"])) == 0
    assert main(_argv(ws, ["apply", "--model", "{model}", "--plan", "{root}/no_model_plan.json",
                           "--out", str(tmp_path / "pruned"), "--skip-model-check"])) == 0
    assert (tmp_path / "pruned" / "config.json").is_file()
    assert "--skip-model-check" in _help(capsys, "apply")


def _help(capsys, verb: str) -> str:
    capsys.readouterr()
    try:
        main([verb, "--help"])
    except SystemExit:
        pass
    return capsys.readouterr().out


def test_a_tensor_missing_from_the_weights_is_refused(ws, tmp_path, capsys):
    """Not a whole layer: transformers' own load report (printed first) is the check."""
    from safetensors.torch import load_file, save_file

    folder = _copy_model(ws["model"], tmp_path / "model")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(_argv(ws, _calibrate(str(folder)))) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("grape calibrate: error: ") and "post_attention_layernorm" in last


# -- item 3: a resumed calibration takes only its own saved state --------------------------------
class Stop(Exception):
    pass


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (8, 16), generator=torch.Generator().manual_seed(seed))


def _config(**changes):
    from grape.calibration.calibrate import CalibrationConfig

    return CalibrationConfig(**{"batch_size": 1, "subsample": 16, "progress": False, **changes})


def _same(got, expected) -> None:
    assert got.tokens == expected.tokens and sorted(got.layers) == sorted(expected.layers)
    for layer, want in expected.layers.items():
        have = got.layers[layer]
        for name, values in want.stats.items():
            np.testing.assert_array_equal(have.stats[name], values, err_msg=f"{layer} {name}")
        for kind, values in want.similarity.items():
            np.testing.assert_array_equal(have.similarity[kind], values)
        np.testing.assert_array_equal(have.cost_curve, want.cost_curve)


def _interrupted(run, after: int) -> None:
    try:
        run(after)
    except Stop:
        pass


def test_whole_model_resume_ignores_the_state_another_run_saved(ws, tmp_path, capsys):
    """Two runs with other settings to one --out: A saves its state into the folder after B
    took it over. Resuming B must not count A's batches: it equals a clean B run."""
    from grape.calibration.calibrate import calibrate
    from grape.models.loading import load_model

    model, ids, folder = load_model(ws["model"]), _tokens(), tmp_path / "scores.npz.partial"
    first, second = _config(seed=1, subsample=8), _config(seed=3)

    def run(config, data=ids):
        def stopped(after):
            calls = iter(range(after))

            def hook(*_):  # the forward after `after` batches is interrupted
                if next(calls, None) is None:
                    raise Stop

            hook = model.register_forward_pre_hook(hook)
            try:
                calibrate(model, data, config, checkpoint=folder, checkpoint_every=1)
            finally:
                hook.remove()
        return stopped

    _interrupted(run(first, _tokens(1)), 3)  # other settings and other data
    saved_by_a = (folder / "rank0-of-1.observer.pt").read_bytes()
    _interrupted(run(second), 0)  # B opens the folder: A's checkpoint discarded, B's key written
    (folder / "rank0-of-1.observer.pt").write_bytes(saved_by_a)  # A, still running, saves again
    capsys.readouterr()
    resumed = calibrate(model, ids, second, checkpoint=folder, checkpoint_every=1)
    said = capsys.readouterr().out
    _same(resumed, calibrate(model, ids, second))
    assert "saved by another run" in said


def _stop():
    raise Stop


def test_sequential_resume_ignores_the_state_another_run_saved(ws, tmp_path, capsys, monkeypatch):
    """The same race in layer-by-layer mode: A's committed progress, layer scores and hidden
    states land in B's folder; B starts over and equals a clean B run."""
    from grape.calibration.sequential import _Run, calibrate_sequential

    ids, folder = _tokens(), tmp_path / "scores.npz.partial"
    first, second = _config(seed=1, subsample=8), _config(seed=3)
    run_layer = _Run.run_layer

    def stopped(config, after, data=ids):
        done = iter(range(after))
        monkeypatch.setattr(_Run, "run_layer",
                            lambda self, i: (next(done, None) is None and _stop())
                            or run_layer(self, i))
        try:
            calibrate_sequential(ws["model"], data, config, checkpoint=folder)
        finally:
            monkeypatch.setattr(_Run, "run_layer", run_layer)

    _interrupted(lambda after: stopped(first, after, _tokens(1)), 2)
    saved_by_a = {p.name: p.read_bytes() for p in folder.iterdir()
                  if p.name != "grape_calibration_checkpoint.json"}  # A's states, not its key
    _interrupted(lambda after: stopped(second, after), 0)
    for name, data in saved_by_a.items():
        (folder / name).write_bytes(data)
    capsys.readouterr()
    resumed = calibrate_sequential(ws["model"], ids, second, checkpoint=folder)
    said = capsys.readouterr().out
    _same(resumed, calibrate_sequential(ws["model"], ids, second))
    assert "saved by another run" in said


# -- item 6: special files ------------------------------------------------------------------
def _grape(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI in a child process: a regression that reads /dev/zero forever is killed by the
    timeout instead of hanging the test run (and growing its memory)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "grape", *argv], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


DEVICES = [
    ("scores for solve", ["solve", "--scores", "/dev/zero", "--budget", "0.25"],
     "character device"),
    ("scores for inspect", ["inspect", "/dev/zero"], "character device"),
    ("plan for apply", ["apply", "--model", "{model}", "--plan", "/dev/zero", "--out",
                        "{root}/pruned"], "not a plan file"),
    ("recipe", ["solve", "--recipe", "/dev/zero"], "not a recipe file"),
]


@pytest.mark.parametrize("case, argv, phrase", DEVICES, ids=[c[0] for c in DEVICES])
def test_dev_zero_is_refused_at_once(ws, case, argv, phrase):
    before = _snapshot(ws["root"])
    done = _grape(*_argv(ws, argv), timeout=60)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert phrase in lines[0] and "/dev/zero" in lines[0], lines[0]
    assert _snapshot(ws["root"]) == before


def _feed_fifo(path: Path, data: bytes) -> threading.Thread:
    """Write `data` into the FIFO once (the open waits for the reader)."""
    def write():
        with open(path, "wb") as handle:
            handle.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("what", ["plan", "scores"])
def test_inspect_reads_a_fifo_once(ws, tmp_path, what):
    """`grape inspect <(cat plan.json)`: the content is read once, then detected and summarised
    (a second read would wait forever on the empty pipe: the timeout fails the test)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = _feed_fifo(fifo, ws[what].read_bytes())
    done = _grape("inspect", str(fifo), "--json", timeout=60)
    writer.join(timeout=5)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["kind"] == what and summary["path"] == str(fifo)


def test_apply_reads_a_plan_from_a_fifo(ws, tmp_path):
    fifo = tmp_path / "plan-pipe"
    os.mkfifo(fifo)
    writer = _feed_fifo(fifo, ws["plan"].read_bytes())
    done = _grape("apply", "--model", str(ws["model"]), "--plan", str(fifo), "--out",
                  str(tmp_path / "pruned"), timeout=120)
    writer.join(timeout=5)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "pruned" / "config.json").is_file()


# -- item 6: config.json values --------------------------------------------------------------
CONFIG_PHRASES = {
    "top_k_zero": "num_experts_per_tok is 0",
    "top_k_above_experts": "num_experts_per_tok is 9",
    "experts_as_string": "num_local_experts is '8'",
    "no_expert_count": "has no expert count",
    "unknown_type": "model_type 'frobnicator'",
}
CONFIGS = [(f"{verb} {name}", build(f"{{root}}/{name}"), phrase)
           for name, phrase in CONFIG_PHRASES.items()
           for verb, build in (("calibrate", _calibrate), ("eval", _eval))]


@pytest.mark.parametrize("case, argv, phrase", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bad_config_values_are_refused(ws, capsys, case, argv, phrase):
    line = _refused(ws, capsys, argv, phrase)
    assert "config.json" in line
