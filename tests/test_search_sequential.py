"""Layer-sequential search (grape.searching.sequential, grape.searching.meter): measured one decoder
layer at a time from the shards, a generation of plans at once, the NLLs equal the whole-model
meter's to the bit for every family tried (hybrids included), a full search chooses the same plan
with the same candidate NLLs, `grape search --mode sequential` writes the same plan.json, and
`grape run` on a model that does not fit searches layer by layer without loading it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cli_workspace import RUN_FLAGS, make_workspace

import grape
from grape.models.adapters import get_adapter
from grape.cli.main import main
from grape.models.loading import load_model
from grape.searching.algorithm import search
from grape.searching.config import SearchConfig
from grape.searching.meter import Meter, WholeModelEvaluator
from grape.searching.sequential import LayerStream, SequentialModel
from grape.searching.sensitivity import masked, sequence_nll
from solvers.plan import Plan
from solvers.spec import SolveConfig
from tests.tiny_families import make_family
from tests.tiny_models import FAMILIES, make_tiny, tiny_input_ids

QUICK = SearchConfig(batch_size=2, progress=False)
# DeepSeek-V3's group-limited routing: two groups of four, so removing one expert per group
# keeps every group routable
OVERRIDES = {"deepseek_v3": dict(n_group=2, topk_group=2)}


def saved(tmp_path: Path, family: str) -> Path:
    """A tiny model of `family` written as a safetensors checkpoint."""
    if family in FAMILIES:
        model = make_tiny(family, **OVERRIDES.get(family, {}))
    else:
        model = make_family(family)
    model.save_pretrained(tmp_path / family)
    return tmp_path / family


def drop(model, removed: dict[int, list[int]]) -> Plan:
    adapter = get_adapter(model)
    layers = sorted(adapter.moe_blocks())
    kept = {i: [e for e in range(adapter.num_experts(i)) if e not in removed.get(i, [])] for i in layers}
    return Plan(kept=kept, removed={i: sorted(removed.get(i, [])) for i in layers})


def generation(model) -> list[Plan | None]:
    """Plans sharing prefixes of every length: the unpruned model, the last MoE layer alone (two
    ways), the first and last layers, and a plan that removes nothing."""
    layers = sorted(get_adapter(model).moe_blocks())
    group = int(getattr(model.config, "n_group", None) or 1)
    first, last = layers[0], layers[-1]
    return [None,
            drop(model, {last: list(range(group))}),
            drop(model, {last: list(range(group, 2 * group))}),
            drop(model, {first: list(range(group)), last: list(range(group))}),
            drop(model, {first: list(range(group)), last: list(range(group, 2 * group))}),
            drop(model, {})]


def full_forward(model, ids, plan) -> np.ndarray:
    if plan is None:
        return sequence_nll(model, ids, 2)
    with masked(model, plan):
        return sequence_nll(model, ids, 2)


# -- the evaluator --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", [
    "qwen3_moe", "mixtral", "deepseek_v3", "nemotron_h",  # nemotron_h: mamba, MoE, attention, MoE
    pytest.param("gpt_oss", marks=pytest.mark.slow), pytest.param("qwen3_next", marks=pytest.mark.slow)])
def test_the_sequential_evaluator_equals_the_whole_model_meter_to_the_bit(family, tmp_path):
    directory = saved(tmp_path, family)
    model = load_model(directory, "cpu")
    ids = tiny_input_ids(5, 12)
    plans = generation(model)
    whole = WholeModelEvaluator(model, ids, QUICK).measure(plans)
    evaluator = LayerStream(SequentialModel(directory)).evaluator(ids, 2)
    streamed = evaluator.measure(plans)
    for plan, a, b in zip(plans, whole, streamed):
        np.testing.assert_array_equal(b, a)
        np.testing.assert_array_equal(b, full_forward(model, ids, plan))
    # each distinct prefix ran once: the unpruned model's layers are shared by every plan up to its
    # first pruned layer, the two variants of the first layer by the plans that prune it
    layers, moe = evaluator.layer_count, sorted(get_adapter(model).moe_blocks())
    first, last = moe[0], moe[-1]
    assert evaluator.layers_run == layers + 2 * (layers - last) + (layers - first) + (layers - last)
    assert evaluator.peak_states == 5  # unpruned (= removes nothing), 2 x last alone, 2 x first and last


def test_hidden_states_on_disk_give_the_same_nlls(tmp_path):
    directory = saved(tmp_path, "qwen3_moe")
    model = load_model(directory, "cpu")
    ids = tiny_input_ids(3, 10)
    plans = generation(model)[:3]
    spec = SequentialModel(directory, hidden_states="disk", scratch=tmp_path / "scratch")
    evaluator = LayerStream(spec).evaluator(ids, 2)
    for plan, got in zip(plans, evaluator.measure(plans)):
        np.testing.assert_array_equal(got, full_forward(model, ids, plan))
    assert evaluator.storage == "disk" and not list((tmp_path / "scratch").iterdir())  # files removed


def test_a_tied_head_and_an_uneven_last_batch(tmp_path):
    """Tied embeddings (the zoo's models): the head reads the embedding table; 5 rows in batches
    of 2 leave a last batch of 1, as the whole-model search batches them."""
    model = make_tiny("mixtral", tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "tied")
    loaded = load_model(tmp_path / "tied", "cpu")
    ids = tiny_input_ids(5, 12)
    plans = generation(loaded)[:2]
    got = LayerStream(SequentialModel(tmp_path / "tied")).evaluator(ids, 2).measure(plans)
    for plan, nll in zip(plans, got):
        np.testing.assert_array_equal(nll, full_forward(loaded, ids, plan))


# -- the meter's hints -----------------------------------------------------------------------------
class _Counting:
    """A batched evaluator that records what it was asked to measure."""

    batched, layer_count = True, 4

    def __init__(self):
        self.calls, self.layers_run = [], 0

    def measure(self, plans):
        self.calls.append(list(plans))
        self.layers_run += 4
        return [np.full(2, 1.0 + i) for i, _ in enumerate(plans)]


def test_hints_measure_ahead_but_only_asked_plans_count(tmp_path):
    evaluator = _Counting()
    plans = [Plan(kept={0: [e]}, removed={0: [1 - e]}) for e in (0, 1)]
    meter = Meter(evaluator, tiny_input_ids(2, 4), replace(QUICK, max_passes=3), tmp_path / "c.json")
    meter.prefetch([None, *plans, plans[0]])  # one generation, duplicates once, at most 3 (passes left)
    assert [len(c) for c in evaluator.calls] == [3] and meter.used == 0
    assert meter.ready(plans[1]) and meter.nll("a", plans[1])[0] == 3.0
    assert meter.used == 1 and json.loads((tmp_path / "c.json").read_text())["measured"]  # cached once asked
    meter.prefetch(lambda: [plans[1], None])  # measured already: nothing new
    assert len(evaluator.calls) == 1
    other = Plan(kept={0: [0, 1]}, removed={0: []})
    meter.nll("b", other)  # never hinted: measured on demand, alone
    assert evaluator.calls[-1] == [other] and meter.used == 2 and meter.left == 1
    assert meter.computed_passes == 2.0  # 8 layers run / 4 per pass, the unused hint included


# -- the whole search -------------------------------------------------------------------------------
def _search_both(directory: Path, config: SearchConfig):
    model = load_model(directory, "cpu")
    scores = grape.calibrate(model, tiny_input_ids(8, 16, seed=1),
                             grape.CalibrationConfig(subsample=32, batch_size=4, progress=False))
    ids, confirm = tiny_input_ids(3, 10, seed=2), tiny_input_ids(4, 10, seed=3)
    solve = SolveConfig(budget=0.5, time_limit=10)
    whole = search(model, scores, solve, ids, config, confirm_ids=confirm)
    stream = LayerStream(SequentialModel(directory))
    return whole, search(stream, scores, solve, ids, config, confirm_ids=confirm)


def same_search(a, b) -> None:
    assert a.best.plan.kept == b.best.plan.kept and a.best.name == b.best.name
    assert [(c.name, c.role, c.nll) for c in a.candidates] == [(c.name, c.role, c.nll) for c in b.candidates]
    for x, y in zip(a.candidates, b.candidates):
        np.testing.assert_array_equal(x.per_sequence, y.per_sequence)
    assert a.confirmed == b.confirmed and a.passes == b.passes and a.unpruned_nll == b.unpruned_nll
    assert (a.nll_curves is None) == (b.nll_curves is None)
    if a.nll_curves is not None:
        for layer, curve in a.nll_curves.curves.items():
            np.testing.assert_array_equal(b.nll_curves.curves[layer], curve)


@pytest.mark.slow  # the quick suite compares a shorter search end to end (the CLI test below)
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_a_full_search_makes_the_same_choices_with_the_same_nlls(family, tmp_path):
    """Seeds, curves, criterion orders, level switches, per-layer criteria and confirmation: every
    generation the search hints."""
    config = SearchConfig(max_passes=26, moves_per_round=3, batch_size=2, progress=False,
                          min_confirm_tokens=0, min_confirm_documents=0)
    whole, streamed = _search_both(saved(tmp_path, family), config)
    same_search(whole, streamed)
    assert whole.mode == {"mode": "whole"} and streamed.mode["mode"] == "sequential"
    # on qwen3_moe every stage runs (DeepSeek's routing groups leave no level switch here)
    roles = {c.role.value for c in whole.candidates}
    assert family != "qwen3_moe" or {"uniform seed", "curves seed", "move", "layer criterion"} <= roles


# -- the stage, from the command line -----------------------------------------------------------------
SEARCH_FLAGS = ["--search-passes", "12", "--search-tokens", "128", "--confirm-tokens", "256",
                "--budget", "0.5", "--time-limit", "10", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("search_sequential"))
    assert main(["calibrate", "--model", str(ws.model), "--data", str(ws.calibration), "--out",
                 str(ws.root / "scores.npz"), "--samples", "4", "--seq-len", "32", "--subsample", "32",
                 "--no-progress", "--device-map", "cpu"]) == 0
    return ws


def _searched(ws, out: Path, *extra: str) -> int:
    return main(["search", "--model", str(ws.model), "--scores", str(ws.root / "scores.npz"),
                 "--search-data", *map(str, ws.heldout), "--out", str(out), *SEARCH_FLAGS, *extra])


def _plan_file(path: Path) -> dict:
    """plan.json without what differs between two runs of the same search: the seed solver's
    wall time and the layers run (a generation may run more than the prefix reuse of whole mode)."""
    plan = json.loads(path.read_text())
    plan.pop("seconds")
    plan["provenance"]["search"].pop("computed_passes")
    return plan


def test_grape_search_sequential_writes_the_plan_whole_mode_writes(ws, tmp_path, capsys):
    assert _searched(ws, tmp_path / "whole", "--mode", "whole") == 0
    assert _searched(ws, tmp_path / "layers", "--sequential") == 0
    assert "grape search: sequential mode (--mode sequential)" in capsys.readouterr().out
    assert _plan_file(tmp_path / "layers" / "plan.json") == _plan_file(tmp_path / "whole" / "plan.json")
    whole, layers = (json.loads((tmp_path / d / "search.json").read_text()) for d in ("whole", "layers"))
    assert [c["nll"] for c in layers["candidates"]] == [c["nll"] for c in whole["candidates"]]
    assert layers["confirmed"] == whole["confirmed"] and layers["mode"]["mode"] == "sequential"


def test_contradicting_mode_flags_are_refused_in_one_line(ws, tmp_path, capsys):
    assert _searched(ws, tmp_path / "bad", "--sequential", "--mode", "whole") == 2
    err = capsys.readouterr().err.strip()
    assert "--sequential and --mode whole" in err and len(err.splitlines()) == 1


def _not_fitting(monkeypatch):
    """Every whole-model placement has 1 kB free: the rule of calibration says sequential."""
    import grape.models.placement

    monkeypatch.setattr(grape.models.placement, "whole_capacity", lambda placement, world: (1000, "a test"))


def test_grape_run_on_a_model_that_does_not_fit_searches_layer_by_layer(ws, tmp_path, monkeypatch, capsys):
    """The run never loads the model: the search streams it, the checkpoint is written by
    streaming, the evaluations are skipped with a notice; the plan is the whole-mode search's."""
    import grape.models.loading

    assert _searched(ws, tmp_path / "whole", "--mode", "whole") == 0
    _not_fitting(monkeypatch)
    monkeypatch.setattr(grape.models.loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    data = [str(p) for p in ws.heldout]
    out = tmp_path / "run"
    assert main(["run", "--model", str(ws.model), "--scores", str(ws.root / "scores.npz"),
                 "--eval-data", *data, "--search-data", *data, "--out", str(out), "--baselines", "none",
                 "--no-compare", *RUN_FLAGS, *SEARCH_FLAGS[:-2]]) == 0
    printed = capsys.readouterr().out
    assert "searching layer by layer" in printed and "does not fit in memory" in printed
    assert json.loads((out / "plan.json").read_text())["kept"] == json.loads(
        (tmp_path / "whole" / "plan.json").read_text())["kept"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nll"] == {} and summary["search"]["mode"]["mode"] == "sequential"
    assert (out / "checkpoint" / "config.json").is_file() and "grape eval" in (out / "report.md").read_text()


def test_a_run_that_needs_the_model_loaded_is_refused_before_any_work(ws, tmp_path, monkeypatch, capsys):
    _not_fitting(monkeypatch)
    data = [str(p) for p in ws.heldout]
    assert main(["run", "--model", str(ws.model), "--scores", str(ws.root / "scores.npz"),
                 "--eval-data", *data, "--out", str(tmp_path / "merge"), "--method", "merge", *RUN_FLAGS]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit in memory" in err and "--method remove" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "merge" / "scores.npz").exists()


# -- the stage, from Python ---------------------------------------------------------------------------
def _api_search(ws, runtime, out: Path):
    config = SearchConfig(max_passes=8, tokens=128, confirm_tokens=256, progress=False)
    return grape.search(ws.model, ws.root / "scores.npz", [str(p) for p in ws.heldout],
                        SolveConfig(budget=0.5, time_limit=10), config, out=out, runtime=runtime)


def test_the_python_api_holds_a_directory_as_grape_search_does(ws, tmp_path, monkeypatch):
    """`grape.search(path, ..., runtime=...)`: mode 'sequential' measures layer by layer with the
    choice and NLLs of the whole-model search; 'auto' does so by itself (never loading the model)
    when the model does not fit."""
    import grape.models.loading
    from grape.calibration.calibrate import CalibrationConfig

    whole = _api_search(ws, CalibrationConfig(mode="whole", device_map="cpu"), tmp_path / "whole")
    layers = _api_search(ws, "sequential", tmp_path / "layers")
    assert whole.mode == {"mode": "whole"} and layers.mode["mode"] == "sequential"
    assert layers.best.plan.kept == whole.best.plan.kept and layers.best.name == whole.best.name
    assert len(whole.candidates) > 2
    assert [c.nll for c in layers.candidates] == [c.nll for c in whole.candidates]
    assert layers.confirmed == whole.confirmed and layers.unpruned_nll == whole.unpruned_nll
    assert _plan_file(tmp_path / "layers" / "plan.json") == _plan_file(tmp_path / "whole" / "plan.json")

    _not_fitting(monkeypatch)
    monkeypatch.setattr(grape.models.loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    auto = _api_search(ws, None, tmp_path / "auto")
    assert auto.mode["mode"] == "sequential" and "free on a test" in auto.mode["reason"]
    assert [c.nll for c in auto.candidates] == [c.nll for c in whole.candidates]


def test_the_python_api_refuses_sequential_mode_on_a_loaded_model(ws):
    from solvers.errors import UserError

    with pytest.raises(UserError, match="pass the model directory"):
        grape.search(load_model(ws.model, "cpu"), ws.root / "scores.npz", [str(p) for p in ws.heldout],
                     runtime="sequential")
    with pytest.raises(UserError, match="not one of auto, whole, sequential"):
        grape.search(ws.model, ws.root / "scores.npz", [str(p) for p in ws.heldout], runtime="layers")


def test_unknown_storage_is_refused(tmp_path):
    from grape.errors import DataError

    with pytest.raises(DataError, match="hidden_states 'floppy' is not one of"):
        SequentialModel(tmp_path, hidden_states="floppy")
