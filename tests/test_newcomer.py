"""What a newcomer meets first (issue 16): lm-eval tasks checked before any model work, `grape
inspect` reading everything the tool writes (and pictures of a scores file), recipes that work
from any directory, Hub ids from the local cache only, `grape --version`, the corpus builder
refusing a missing source, compare's kept-per-layer picture, compressed synthetic scores."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
import zipfile
from pathlib import Path

import pytest
from cli_workspace import RUN_FLAGS, make_workspace

from grape.cli.main import main
from solvers.synth import custom_shape, synth_scores

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("newcomer"))


@pytest.fixture(scope="module")
def run_dir(ws):
    """A small `grape run` on the tiny model, once for the module."""
    out = ws.root / "run"
    assert main(["run", "--model", str(ws.model), "--data", str(ws.calibration), "--eval-data",
                 *map(str, ws.heldout), "--out", str(out), "--baselines", "none", *RUN_FLAGS]) == 0
    return out


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def _no_model_loading(monkeypatch):
    """Make any model load fail the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the tasks were checked")

    import grape.models.loading

    monkeypatch.setattr(grape.models.loading, "load_model", refuse)


# -- lm-eval tasks, checked up front -------------------------------------------------------------
def test_eval_refuses_a_task_without_local_data_before_any_model_work(ws, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "no-datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hub"))
    _no_model_loading(monkeypatch)
    start = time.perf_counter()
    line = _one_line_error(capsys, ["eval", "--model", str(ws.model), "--tasks", "local,arc_easy,mmlu",
                                    "--data", *map(str, ws.heldout), "--out", str(tmp_path / "ev")])
    assert "arc_easy (dataset allenai/ai2_arc is not in the local Hugging Face cache)" in line
    assert "mmlu (57 of its 57 tasks cannot, e.g. mmlu_" in line and "local" not in line.split(":")[2]
    assert time.perf_counter() - start < 20  # a text scan of lm-eval's YAML, no task index
    assert not (tmp_path / "ev").exists()


@pytest.mark.slow
def test_an_unknown_task_name_is_refused_after_asking_lm_eval(tmp_path):
    from grape.evaluation.lmeval_offline import UnavailableTaskError, check_tasks

    with pytest.raises(UnavailableTaskError, match=r"no_such_task_xyz \(not an lm-eval task here\)"):
        check_tasks(["no_such_task_xyz"])  # lm-eval's own index (~10 s) confirms it is unknown


def test_run_refuses_a_task_before_calibrating(ws, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "no-datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hub"))
    _no_model_loading(monkeypatch)
    line = _one_line_error(capsys, ["run", "--model", str(ws.model), "--data", str(ws.calibration),
                                    "--eval-data", *map(str, ws.heldout), "--tasks", "hellaswag",
                                    "--out", str(tmp_path / "run"), *RUN_FLAGS])
    assert "hellaswag" in line and "Hugging Face cache" in line
    assert not (tmp_path / "run" / "scores.npz").exists()


def test_list_tasks_shows_local_ones_and_installed_ones_whose_data_is_cached(ws, tmp_path, capsys, monkeypatch):
    from grape.evaluation.lmeval_offline import check_tasks

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    (tmp_path / "datasets" / "allenai___ai2_arc").mkdir(parents=True)  # as `datasets` prepares it
    assert main(["eval", "--list-tasks", "--data", *map(str, ws.heldout)]) == 0
    out = capsys.readouterr().out
    assert "grape_scramble_prose" in out and "grape_cloze_code" in out
    cached = out.split("cached", 1)[1]
    assert "arc_easy" in cached and "arc_challenge" in cached and "hellaswag" not in cached
    check_tasks(["arc_easy", "ai2_arc"])  # a task and a tag whose data is now "cached": accepted


def test_tasks_from_a_task_path_need_their_data_files(tmp_path):
    from grape.evaluation.lmeval_offline import UnavailableTaskError, check_tasks

    data = tmp_path / "mine.jsonl"
    config = ("task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
              "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
              "doc_to_target: label\n")
    (tmp_path / "mine.yaml").write_text(config.format(name="mine", path=data))
    (tmp_path / "gone.yaml").write_text(config.format(name="gone", path=tmp_path / "gone.jsonl"))
    data.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n')
    check_tasks(["mine"], [tmp_path])
    with pytest.raises(UnavailableTaskError, match="gone .data file .*gone.jsonl is not here"):
        check_tasks(["mine", "gone"], [tmp_path])


def test_lm_eval_is_quiet_while_tasks_run_and_everything_is_restored():
    import lm_eval.api.task as task_module

    from grape.evaluation.lmeval_tasks import quiet_lm_eval

    logger = logging.getLogger("lm_eval")
    level, bar = logger.level, task_module.tqdm
    with quiet_lm_eval():
        assert logger.level == logging.ERROR and task_module.tqdm is not bar
        assert task_module.tqdm(range(3)).disable
    assert logger.level == level and task_module.tqdm is bar
    with quiet_lm_eval(quiet=False):  # --verbose
        assert task_module.tqdm is bar


# -- inspect ------------------------------------------------------------------------------------
def test_inspect_reads_a_run_its_summary_and_draws_the_scores(run_dir, tmp_path, capsys):
    assert main(["inspect", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"run {run_dir}") and "mean over domains" in text and "report.md" in text
    assert main(["inspect", str(run_dir / "summary.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["format"] == "grape.run-summary"
    pictures = tmp_path / "pictures"
    assert main(["inspect", str(run_dir / "scores.npz"), "--plot", str(pictures)]) == 0
    for name in ("importance.png", "similarity.png", "cost_curves.png"):
        assert (pictures / name).read_bytes()[:4] == b"\x89PNG", name
        assert (run_dir / name).is_file(), name  # the run report draws them too
    assert "What calibration measured" in (run_dir / "report.md").read_text()


def test_inspect_reads_every_other_thing_grape_writes(run_dir, tmp_path, capsys):
    scores = tmp_path / "s.npz"
    synth_scores(custom_shape(3, 8), seed=1).save(scores)
    compare = tmp_path / "compare"
    assert main(["compare", "--scores", str(scores), "--out", str(compare), "--budget", "6",
                 "--objectives", "additive,curves", "--solvers", "exact,uniform"]) == 0
    assert (compare / "kept_per_layer.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((compare / "compare.json").read_text())["rows"]
    assert all(sum(r["kept_per_layer"].values()) == 18 for r in rows)
    capsys.readouterr()
    expected = {compare: "comparison", compare / "compare.json": "comparison",
                compare / "compare.md": "# Solver comparison", compare / "compare.recipe.yaml": "recipe",
                run_dir / "eval" / "unpruned.json": "eval result", run_dir / "eval": "folder",
                compare / "plans": "folder", run_dir / "plan.json": "plan",
                run_dir / "checkpoint": "checkpoint", run_dir / "run.recipe.yaml": "recipe",
                run_dir / "checkpoint" / "grape_provenance.json": "checkpoint provenance"}
    for path, head in expected.items():
        assert main(["inspect", str(path)]) == 0, path
        assert capsys.readouterr().out.startswith(head), path
    line = _one_line_error(capsys, ["inspect", str(run_dir / "plan.json"), "--plot", str(tmp_path / "p")])
    assert "not a scores file" in line
    assert "picture" in _one_line_error(capsys, ["inspect", str(compare / "compare.png")])


# -- recipes from anywhere ---------------------------------------------------------------------
def test_recipes_resolve_paths_against_their_own_folder(tmp_path, monkeypatch, capsys):
    here, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (here / "data").mkdir(parents=True)
    elsewhere.mkdir()
    synth_scores(custom_shape(3, 8), seed=2).save(here / "data" / "s.npz")
    (here / "recipe.yaml").write_text("solve:\n  scores: data/s.npz\n  out: plans/plan.json\n  budget: 6\n")
    monkeypatch.chdir(elsewhere)
    assert main(["solve", "--recipe", "../project/recipe.yaml", "--quiet"]) == 0
    assert (here / "plans" / "plan.json").is_file() and not (elsewhere / "plans").exists()
    # the resolved recipe repeats the run from anywhere, as its header line says
    resolved = (here / "plans" / "plan.recipe.yaml").read_text()
    assert f"# repeat with: grape solve --recipe {here / 'plans' / 'plan.recipe.yaml'}" in resolved
    assert "out: plan.json" in resolved and f"scores: {here / 'data' / 's.npz'}" in resolved
    (here / "plans" / "plan.json").unlink()
    monkeypatch.chdir(tmp_path)
    assert main(["solve", "--recipe", str(here / "plans" / "plan.recipe.yaml")]) == 0
    assert (here / "plans" / "plan.json").is_file()


# -- models: Hub ids from the local cache, --version ------------------------------------------------
def _fake_hub_cache(root: Path, model: Path, repo: str) -> Path:
    """A Hugging Face hub cache holding `model` as `repo` (the layout huggingface_hub writes)."""
    import shutil

    entry = root / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / ("0" * 40)
    shutil.copytree(model, snapshot)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0" * 40)
    return snapshot


def test_hub_ids_resolve_from_the_local_cache_only(ws, tmp_path, monkeypatch, capsys):
    from grape.models.files import check_model_dir, resolve_model

    snapshot = _fake_hub_cache(tmp_path / "hub", ws.model, "tiny-org/tiny-moe")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("tiny-org/tiny-moe") == snapshot
    assert check_model_dir("tiny-org/tiny-moe")["model_type"] == "qwen3_moe"
    plan = tmp_path / "plan.json"
    assert main(["solve", "--scores", str(_scores(ws, tmp_path)), "--budget", "6", "--out", str(plan)]) == 0
    assert main(["apply", "--model", "tiny-org/tiny-moe", "--plan", str(plan), "--out", str(tmp_path / "p")]) == 0
    line = _one_line_error(capsys, ["apply", "--model", "tiny-org/absent", "--plan", str(plan),
                                    "--out", str(tmp_path / "q")])
    assert "neither a directory here nor a model in the local Hugging Face cache" in line


def _scores(ws, tmp_path: Path) -> Path:
    path = tmp_path / "scores.npz"
    assert main(["calibrate", "--model", str(ws.model), "--data", str(ws.calibration), "--out", str(path),
                 "--samples", "4", "--seq-len", "32", "--subsample", "32", "--no-progress",
                 "--device-map", "cpu"]) == 0
    return path


def test_help_says_what_model_takes_and_version_prints(capsys):
    for verb in ("apply", "eval", "run"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "already in the local Hugging Face cache" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("grape 0.1.0, torch ")


# -- the corpus builder, synthetic scores ------------------------------------------------------------
def test_the_corpus_builder_refuses_a_missing_source(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("build_corpus", REPO / "benchmarks" / "zoo" / "build_corpus.py")
    build_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_corpus)
    monkeypatch.setattr(build_corpus, "PROSE_ROOT", tmp_path / "no-python-docs")
    out, heldout = tmp_path / "data", tmp_path / "heldout"
    assert build_corpus.main(["--out", str(out), "--heldout", str(heldout)]) == 2
    err = capsys.readouterr().err
    assert "no-python-docs does not exist" in err and "python3.11-doc" in err and err.count("\n") == 1
    assert not out.exists() and not heldout.exists()
    with pytest.raises(build_corpus.MissingSource, match="its test split would be empty"):
        build_corpus.check_documents("c", {"train": [{}], "validation": [{}], "test": []})


def test_synthetic_scores_are_written_compressed(tmp_path):
    path = tmp_path / "s.npz"
    assert main(["synth", "--shape", "mixtral-8x7b", "--out", str(path)]) == 0
    with zipfile.ZipFile(path) as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_DEFLATED}
