"""Fit to hardware (issue 13): per-device cap lists, --fit SPEC and --kv-reserve, the budget
`fit`, the plan's per-device placement table, its re-check and the infeasibility message."""

import json

import pytest

from grape.api import build_problem
from grape.cli.main import main
from grape.cli.problem import SolveConfig
from solvers import InfeasibleError, Plan
from solvers.check import check_plan
from solvers.constraints import MemoryCap, parse_caps
from solvers.constraints.fit import fit_caps, parse_fit, parse_reserve
from solvers.errors import UserError
from solvers.solve import solve
from solvers.synth import custom_shape, synth_scores

PER_EXPERT = 3 * 64 * 32 * 2  # bf16 bytes of one expert of custom_shape


@pytest.fixture(scope="module")
def scores():
    return synth_scores(custom_shape(8, 16, top_k=2), seed=3, similarity=False)


@pytest.fixture(scope="module")
def scores_path(tmp_path_factory, scores):
    path = tmp_path_factory.mktemp("fit") / "s.npz"
    scores.save(path)
    return path


def test_caps_parse_as_one_size_or_one_per_device():
    assert parse_caps("80GB") == 80e9
    assert parse_caps("80GB,80GB, 40GB") == [80e9, 80e9, 40e9]
    with pytest.raises(UserError, match="empty entry"):
        parse_caps("80GB,,40GB")
    with pytest.raises(UserError, match="lists 3 caps but --pipeline 2"):
        MemoryCap.pipeline([0, 1, 2, 3], 2, [1, 2, 3])
    cap = MemoryCap.pipeline([0, 1, 2, 3], 3, [1, 2, 3])
    assert cap.caps == {"0": 1.0, "1": 2.0, "2": 3.0}


def test_placements_larger_than_the_model_are_refused():
    with pytest.raises(UserError, match="more pipeline devices than the model's 4 MoE layers"):
        MemoryCap.pipeline([0, 1, 2, 3], 5, 1e9)
    with pytest.raises(UserError, match="more expert-parallel ranks than the 8 experts"):
        MemoryCap.expert_parallel({0: 8, 1: 16}, 9, 1e9)


def test_fit_specs():
    assert parse_fit("2x80GB") == (2, 80e9)
    assert parse_fit("8xH100") == (8, 80e9)
    assert parse_fit("4xh200") == (4, 141e9)
    assert parse_fit("4x141GB") == (4, 141e9)
    assert parse_fit("1xMI300X") == (1, 192e9)
    assert parse_reserve("20%") == pytest.approx(0.2) and parse_reserve("0.1") == 0.1
    assert parse_reserve(None) == 0.0
    assert fit_caps("4x80GB", "20%") == (4, 64e9)
    for bad, words in (("4xFOO", "unknown GPU 'FOO'"), ("0x80GB", "at least 1"), ("80GB", "COUNTx")):
        with pytest.raises(UserError, match=words):
            parse_fit(bad)
    for bad in ("100%", "-1%", "abc"):
        with pytest.raises(UserError, match="--kv-reserve"):
            parse_reserve(bad)


@pytest.mark.parametrize("kwargs, words", [
    ({"kv_reserve": "20%"}, "only applies to --fit"),
    ({"fit": "2x80GB", "memory_cap": "80GB"}, "not both"),
    ({"fit": "2x80GB", "pipeline": 3}, "places 2 devices but --pipeline says 3"),
    ({"fit": "2xNOPE"}, "unknown GPU"),
])
def test_fit_flags_are_validated_before_any_file(kwargs, words):
    with pytest.raises(UserError, match=words):
        SolveConfig(**kwargs)


def test_the_budget_defaults_to_fit_with_fit_only():
    assert SolveConfig().budget == 0.25
    assert SolveConfig(fit="2x80GB").budget == "fit"
    assert SolveConfig(fit="2x80GB", budget=0.5).budget == 0.5


def _plan(scores, **config):
    problem = build_problem(scores, SolveConfig(**config))
    return problem, solve(problem, "exact", time_limit=30)


def test_fit_removes_the_fewest_experts_and_records_the_placement(scores):
    cap = 40 * PER_EXPERT  # 4 layers x 16 experts = 64 per device; 40 fit
    problem, plan = _plan(scores, fit=f"2x{cap}", objective="additive")
    assert plan.num_removed == 2 * (64 - 40)
    assert [row["device"] for row in plan.placement] == [0, 1]
    assert [row["layers"] for row in plan.placement] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(row["bytes"] == 40 * PER_EXPERT and row["cap"] == cap for row in plan.placement)
    with pytest.raises(InfeasibleError, match=r"Remove at least 48 experts \(--budget 48\)"):
        _plan(scores, fit=f"2x{cap}", budget=47)
    # the reserve lowers every cap: 40 experts' bytes less 25% hold 30 experts per device
    _, reserved = _plan(scores, fit=f"2x{cap}", kv_reserve="25%")
    assert reserved.num_removed == 2 * (64 - 30)


def test_placement_round_trips_and_the_checker_recomputes_it(scores, tmp_path):
    problem, plan = _plan(scores, budget=0.5, memory_cap=f"{40 * PER_EXPERT},{40 * PER_EXPERT}",
                          pipeline=2)
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert {"kept", "removed", "merge_map", "status", "objective", "provenance"} <= set(data)
    assert data["placement"] == plan.placement
    again = Plan.load(path)
    assert again.placement == plan.placement and check_plan(again, problem) == []
    older = [{k: row[k] for k in ("device", "layers", "bytes", "cap")} for row in data["placement"]]
    assert check_plan(Plan.from_json({**data, "placement": older}), problem) == []  # before the breakdown
    data["placement"][0]["bytes"] -= 1  # a table that does not match the scores
    assert any("placement" in p for p in check_plan(Plan.from_json(data), problem))
    without = _plan(scores, budget=0.5)[1]
    assert without.placement == [] and "placement" not in without.to_json()


def test_uneven_caps_and_the_binding_device(scores):
    caps = f"{60 * PER_EXPERT},{20 * PER_EXPERT}"
    _, plan = _plan(scores, fit=None, memory_cap=caps, pipeline=2, budget="fit")
    assert [row["bytes"] for row in plan.placement] == [60 * PER_EXPERT, 20 * PER_EXPERT]
    with pytest.raises(InfeasibleError) as err:
        _plan(scores, memory_cap=caps, pipeline=2, budget=0.25)
    text = str(err.value)
    assert "the budget keeps 96 experts, but the 2 devices hold at most 80" in text
    assert "device 1 (layers 4-7) would keep 48" in text and "Remove at least 48" in text


def test_budget_fit_needs_a_pipeline_cap(scores):
    with pytest.raises(UserError, match="budget fit needs a pipeline memory cap"):
        _plan(scores, budget="fit")


def test_cli_prints_the_device_table(scores_path, capsys):
    assert main(["solve", "--scores", str(scores_path), "--fit", f"2x{40 * PER_EXPERT}B"]) == 0
    out = capsys.readouterr().out
    assert "fit: the fewest removals" in out and "per device" in out
    assert "0-3 (4)" in out and "4-7 (4)" in out and "100.0%" in out
    for argv, words in (
        (["--memory-cap", "1GB", "--pipeline", "9"], "more pipeline devices than the model's 8"),
        (["--memory-cap", "1GB", "--expert-parallel", "17"], "more expert-parallel ranks"),
        (["--memory-cap", "1GB,1GB", "--pipeline", "3"], "lists 2 caps but --pipeline 3"),
    ):
        assert main(["solve", "--scores", str(scores_path), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and err.count("\n") == 0 and "Traceback" not in err


def test_the_recipe_records_the_budget_the_run_used(scores_path, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["solve", "--scores", str(scores_path), "--fit", f"2x{40 * PER_EXPERT}B",
                 "--out", str(out), "--quiet"]) == 0
    recipe = tmp_path / "plan.recipe.yaml"
    assert "budget: fit" in recipe.read_text()
    assert main(["solve", "--recipe", str(recipe), "--out", str(tmp_path / "again.json"), "--quiet"]) == 0
    assert Plan.load(tmp_path / "again.json").kept == Plan.load(out).kept
    plain = tmp_path / "plain.json"
    assert main(["solve", "--scores", str(scores_path), "--out", str(plain), "--quiet"]) == 0
    assert "budget: '0.25'" in (tmp_path / "plain.recipe.yaml").read_text()


def test_inspect_prints_the_device_table(scores_path, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["solve", "--scores", str(scores_path), "--fit", f"2x{40 * PER_EXPERT}B",
                 "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "per device" in text and "0-3 (4)" in text and "4-7 (4)" in text


# -- all parameters and the KV cache (sizes recorded in the scores) -----------------------------
def _footprint(tied=True, window=None):
    from solvers.sizes import Footprint, KVShape

    kv = KVShape((8,) * 5, (None, None, window, None, None), heads=2)
    return Footprint({i: 100 * (i + 1) for i in range(5)}, embed=1000, head=2000, tied=tied,
                     kv=kv, kv_width=2.0)


def test_pipeline_devices_hold_their_layers_the_embeddings_and_the_head():
    from solvers.sizes import device_parts

    stages = {"0": [1, 2], "1": [3, 4]}  # decoder layer 0 is dense: it goes with layer 1
    kv = {"max_seq_len": 10, "batch": 3}
    parts = device_parts(_footprint(window=4), ["0", "1"], stages, kv)
    per_layer = 8 * 10 * 3 * 2  # K and V elements per token x tokens x batch x bytes
    assert parts["0"] == (100 + 200 + 300 + 1000, 2 * per_layer + 8 * 4 * 3 * 2)  # windowed layer 2
    assert parts["1"] == (400 + 500 + 2000 + 1000, 2 * per_layer)  # tied: a copy of the embeddings
    untied = device_parts(_footprint(tied=False), ["0", "1"], stages, None)
    assert untied["1"] == (400 + 500 + 2000, 0.0)
    one = device_parts(_footprint(), ["0"], {"0": [1, 2, 3, 4]}, None)  # one device: one copy
    assert one["0"] == (1500 + 3000, 0.0)


def test_expert_parallel_ranks_split_the_rest_and_the_kv_heads():
    from solvers.sizes import device_parts

    kv = {"max_seq_len": 10, "batch": 1}
    total_kv = 5 * 8 * 10 * 2
    two = device_parts(_footprint(), ["0", "1"], None, kv)
    assert two["0"] == ((1500 + 3000) / 2, total_kv / 2)
    four = device_parts(_footprint(), list("0123"), None, kv)  # 2 KV heads: replicated over pairs
    assert four["3"] == ((1500 + 3000) / 4, total_kv / 2)


@pytest.mark.parametrize("kwargs, words", [
    ({"batch": 4}, "--batch sizes the KV cache with --max-seq-len"),
    ({"max_seq_len": 4096}, "give --fit SPEC or --memory-cap SIZE too"),
    ({"fit": "2x80GB", "max_seq_len": 0}, "--max-seq-len 0 must be a whole number >= 1"),
    ({"deploy_dtype": "int4"}, "--deploy-dtype 'int4': choose one of"),
])
def test_kv_and_deploy_flags_are_validated_before_any_file(kwargs, words):
    with pytest.raises(UserError, match=words):
        SolveConfig(**kwargs)


@pytest.fixture(scope="module")
def real():
    return synth_scores("qwen3-30b-a3b", seed=0, similarity=False, cost_curve=False)


def test_fit_counts_all_parameters_and_the_kv_cache(real, tmp_path):
    """Qwen3-30B-A3B (48 layers, 4 KV heads of 128) on 2 x 24 GB with 8 x 4096 tokens of KV."""
    config = SolveConfig(fit="2x24GB", kv_reserve="5%", max_seq_len=4096, batch=8)
    problem = build_problem(real, config)
    plan = solve(problem, "exact", time_limit=30)
    kv_layer = 2 * 4 * 128 * 4096 * 8 * 2  # K and V x heads x head_dim x tokens x batch x bf16
    sizes = real.sizes
    for row, layers in zip(plan.placement, ([*range(24)], [*range(24, 48)])):
        assert row["layers"] == layers and row["kv"] == 24 * kv_layer
        other = sum(sizes.layers[i].bytes for i in layers)
        other += sizes.embed.bytes if layers[0] == 0 else sizes.head.bytes
        assert row["other"] == other and row["bytes"] == row["experts"] + other + row["kv"]
        assert row["bytes"] <= row["cap"] == int(24e9 * 0.95)
    assert check_plan(plan, problem) == []
    path = tmp_path / "plan.json"
    plan.save(path)
    recorded = json.loads(path.read_text())["provenance"]["constraint_specs"]
    cap = next(c for c in recorded if c["name"] == "memory_cap")
    assert cap["kv"] == {"max_seq_len": 4096, "batch": 8}
    assert MemoryCap.from_json(cap) == problem.constraints[-1]
    # without the KV cache the same devices keep more experts
    assert _plan(real, fit="2x24GB", kv_reserve="5%")[1].num_kept > plan.num_kept


def test_kv_cache_needs_the_recorded_attention_shape(scores):
    with pytest.raises(UserError, match="re-run `grape calibrate`"):
        build_problem(scores, SolveConfig(fit="2x1GB", max_seq_len=1024))


def test_infeasible_fits_name_the_smallest_cap_and_device_count(scores, real):
    cap = 40 * PER_EXPERT
    with pytest.raises(InfeasibleError) as err:
        _plan(scores, fit=f"2x{cap}", budget=0)
    text = str(err.value)
    assert "give the devices at least" in text and "(1.600 x the caps)" in text  # 64 of 40 experts
    assert "or use at least 4 devices of this cap (--pipeline 4, or --fit 4xSIZE)" in text
    # a device whose other parts and KV cache alone exceed its cap: named, with the numbers
    with pytest.raises(InfeasibleError) as err:
        _plan(real, fit="2x24GB", max_seq_len=131072, batch=4)
    text = str(err.value)
    assert "device 0 (layers 0-23) holds" in text and "of KV cache" in text
    assert "even at the per-layer minimum" in text and "its cap 22.35 GiB - " in text
    assert "or use at least" in text


def test_run_report_shows_memory_per_device(real, tmp_path):
    from grape.report.tables import RunReport, plan_placement

    config = SolveConfig(fit="2x24GB", max_seq_len=4096, batch=8)
    plan = solve(build_problem(real, config), "exact", time_limit=30)
    searched = Plan(kept=plan.kept, removed=plan.removed, provenance=plan.provenance)
    assert plan_placement(searched, real, config) == plan.placement  # recomputed when missing
    assert plan_placement(searched, real, SolveConfig()) == []
    report = RunReport(model="m", budget="fit", objective="additive", solver="exact",
                       method="remove", original=dict(real.model.experts_per_layer),
                       plans={"exact": plan}, placement=plan.placement)
    text = report.write(tmp_path).read_text()
    assert "## Memory per device" in text and "![memory per device](memory_per_device.png)" in text
    assert "| 0 | 0-23 (24) |" in text and "| 1 | 24-47 (24) |" in text and "KV cache" in text
    assert (tmp_path / "memory_per_device.png").stat().st_size > 1000
    plain = RunReport(model="m", budget="0.25", objective="additive", solver="exact",
                      method="remove", original=dict(real.model.experts_per_layer), plans={"exact": plan})
    assert "Memory per device" not in plain.markdown()


def test_balanced_stages_minimise_the_fullest_device():
    import itertools

    from solvers.constraints.memory import balanced_stages

    weights = [5.0, 1.0, 1.0, 1.0, 1.0, 5.0, 2.0]
    layers = list(range(10, 17))
    for devices in (1, 2, 3, 4):
        stages = balanced_stages(layers, devices, weights, first=3.0, last=1.0)
        assert [x for s in stages for x in s] == layers and all(stages)

        def worst(cuts):
            bounds = [0, *cuts, len(weights)]
            return max(sum(weights[a:b]) + (3.0 if a == 0 else 0) + (1.0 if b == len(weights) else 0)
                       for a, b in zip(bounds, bounds[1:]))

        brute = min(worst(c) for c in itertools.combinations(range(1, len(weights)), devices - 1))
        sizes = [len(s) for s in stages]
        assert worst(list(itertools.accumulate(sizes))[:-1]) == brute


def test_balanced_stages_need_a_pipeline_and_never_need_more_removals(tmp_path):
    from dataclasses import replace

    from grape.api import build_problem, solve
    from grape.cli.problem import SolveConfig
    from solvers.synth import synth_scores

    with pytest.raises(UserError, match="--stages balanced"):
        SolveConfig(stages="balanced")
    with pytest.raises(UserError, match="--stages balanced"):
        SolveConfig(fit="2x80GB", expert_parallel=2, budget=0.25, stages="balanced")
    scores = synth_scores("qwen3-30b-a3b", seed=0, similarity=False, cost_curve=False)
    # equal counts in every layer (vLLM): the fullest device decides. On 5 x 12 GB, stages of
    # near-equal layer counts leave the embeddings' device too full for 122 experts per layer;
    # balanced stages move layers off it and fit them
    config = SolveConfig(fit="5x12GB", uniform=True, budget=48 * (128 - 122), time_limit=20)
    with pytest.raises(UserError):
        solve(build_problem(scores, config), config)
    balanced = replace(config, stages="balanced")
    plan = solve(build_problem(scores, balanced), balanced)
    assert set(plan.kept_counts().values()) == {122}
    assert check_plan(plan, build_problem(scores, balanced)) == []
