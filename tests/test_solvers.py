"""Solvers: hand-worked examples, infeasibility messages, file round trips, synthetic shapes."""

import json
import math

import numpy as np
import pytest

from solvers import InfeasibleError, Plan, Scores
from solvers.check import check_plan
from solvers.constraints import (
    Budget,
    EntropyGuard,
    MemoryCap,
    MinKept,
    MultipleOf,
    MustKeep,
    MustRemove,
    RoutingGroups,
    Uniform,
)
from solvers.errors import SolverError, UserError
from solvers.greedy import grape_algorithm1
from solvers.objectives import parse_objective
from solvers.problem import Layer, Problem, build_problem, sparsify
from solvers.registry import SOLVERS
from solvers.solve import solve
from solvers.synth import SHAPES, custom_shape, synth_scores

ALL_SOLVERS = sorted(SOLVERS)


def _sim(n, pairs):
    d = np.eye(n)
    for (i, j), v in pairs.items():
        d[i, j] = d[j, i] = v
    return d


# -- GRAPE Algorithm 1, worked by hand ---------------------------------------------------------------
IMP0 = [0.5, 0.7, 0.2, 0.3]
IMP1 = [0.2, 0.1, 0.9, 0.4]


def _grape_problem(sim1, keep, constraints=()):
    layers = [
        Layer(
            0,
            IMP0,
            [10] * 4,
            1,
            _sim(4, {(0, 1): 0.9, (0, 2): 0.1, (0, 3): 0.2, (1, 2): 0.3, (1, 3): 0.1, (2, 3): 0.4}),
        ),
        Layer(1, IMP1, [10] * 4, 1, sim1),
    ]
    return Problem(
        layers, Budget("remove", 8 - keep), parse_objective("redundancy"), list(constraints)
    )


def test_grape_algorithm1_hand_example():
    # R0 = 2 * (0.9+0.1+0.2+0.3+0.1+0.4) = 4.0 ; R1 = 2 * (0.5+0.6+0.1+0.2+0.3+0.1) = 3.6
    # it 1: l*=0 (4.0), merge (0,1) 0.9 -> sizes [3,4], R0 = 2.2
    # it 2: l*=1 (3.6), merge (0,2) 0.6 -> sizes [3,3], R1 = 2.4
    # it 3: l*=1 (2.4 > 2.2), pair (0,1) 0.5 joins {0,2} and {1} -> sizes [3,2]: 5 kept, stop
    sim1 = _sim(4, {(0, 1): 0.5, (0, 2): 0.6, (0, 3): 0.1, (1, 2): 0.2, (1, 3): 0.3, (2, 3): 0.1})
    masks, merge = grape_algorithm1(_grape_problem(sim1, keep=5))
    # each cluster keeps its most important member
    assert np.flatnonzero(masks[0]).tolist() == [1, 2, 3] and merge[0] == {0: 1}
    assert np.flatnonzero(masks[1]).tolist() == [2, 3] and merge[1] == {0: 2, 1: 2}


SIM_B = _sim(4, {(0, 1): 0.8, (2, 3): 0.7, (0, 2): 0.5, (0, 3): 0.5, (1, 2): 0.5, (1, 3): 0.5})


def test_grape_algorithm1_entropy_freeze_and_restart():
    # Layer 1: R1 = 2 * (0.8+0.7+4*0.5) = 7.0 ; layer 0: R0 = 2.8 with pairs (0,1)=0.9, rest 0.1.
    layer0 = _sim(4, {(0, 1): 0.9, (0, 2): 0.1, (0, 3): 0.1, (1, 2): 0.1, (1, 3): 0.1, (2, 3): 0.1})

    def run(keep, gamma):
        problem = _grape_problem(SIM_B, keep, [EntropyGuard(gamma)] if gamma is not None else [])
        problem.layers[0].similarity = layer0
        return grape_algorithm1(problem)

    # without a guard: it1 L1 (0,1) [4,3] R1=5.4; it2 L1 (2,3) [4,2] R1=4.0;
    # it3 L1 again (4.0 > 2.8): pair (0,2) 0.5 joins {0,1},{2,3} -> [4,1]
    masks, merge = run(5, None)
    assert [m.sum() for m in masks] == [4, 1] and merge[1] == {0: 2, 1: 2, 3: 2}
    # gamma 0.02: E_b = 0.98 log 2 = 0.6793. After it2 the sizes [4,2] have entropy 0.6365 < E_b:
    # layer 1 freezes, so it3 merges layer 0's (0,1) -> [3,2] (entropy 0.6730: layer 0 freezes too)
    masks, merge = run(5, 0.02)
    assert np.flatnonzero(masks[0]).tolist() == [1, 2, 3] and merge[0] == {0: 1}
    assert np.flatnonzero(masks[1]).tolist() == [0, 2] and merge[1] == {1: 0, 3: 2}
    # one more removal: F holds every layer, so it restarts; l* = argmax R = layer 1 (4.0 > 1.0),
    # whose next pair (0,2) joins its two clusters -> [3,1]
    masks, _ = run(4, 0.02)
    assert [m.sum() for m in masks] == [3, 1]


def test_grape_solver_repairs_what_algorithm1_breaks():
    # Algorithm 1 freezes *after* the merge that breaks the guard: here it stops at sizes [4, 2]
    # (entropy 0.6365 < 0.6793); the plan is repaired to obey the guard ([3, 3])
    problem = _grape_problem(SIM_B, 6, [EntropyGuard(0.02)])
    plan = solve(problem, "grape")
    assert check_plan(plan, problem) == [] and plan.provenance.get("repaired")
    assert sorted(plan.kept_counts().values()) == [3, 3]
    assert (
        EntropyGuard.entropy(np.array(list(plan.kept_counts().values())))
        >= 0.98 * math.log(2) - 1e-9
    )


# -- infeasibility: one named error, the same message from every solver ---------------------------
def _flat_problem(layers=58, experts=10, remove=180, constraints=(), objective="additive"):
    rng = np.random.default_rng(0)
    return Problem(
        [
            Layer(layer, rng.random(experts), np.full(experts, 100), 8, _sym(rng, experts))
            for layer in range(layers)
        ],
        Budget("remove", remove),
        parse_objective(objective),
        [MinKept(), *constraints],
    )


def _sym(rng, n):
    a = rng.random((n, n))
    return (a + a.T) / 2


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_infeasible_floor_message_from_every_solver(solver):
    problem = _flat_problem()
    with pytest.raises(
        InfeasibleError,
        match=r"per-layer minimum 8 x 58 layers = 464 kept, but the budget keeps 400",
    ):
        solve(problem, solver)


def test_infeasible_messages_name_the_constraints():
    with pytest.raises(
        InfeasibleError,
        match=r"multiple of 58 layers; the budget keeps 570 \(nearest uniform totals: 522, 580\)",
    ):
        solve(_flat_problem(remove=10, constraints=[Uniform()]), "exact")
    with pytest.raises(
        InfeasibleError, match=r"must-keep .* must-remove|both must-keep and must-remove"
    ):
        solve(
            _flat_problem(remove=10, constraints=[MustKeep({0: [1]}), MustRemove({0: [1]})]),
            "greedy",
        )
    with pytest.raises(InfeasibleError, match=r"entropy guard .* most even allocation"):
        problem = Problem(
            [Layer(0, np.ones(2), [1, 1], 1), Layer(1, np.ones(40), np.ones(40), 1)],
            Budget("remove", 0),
            parse_objective("additive"),
            [EntropyGuard(0.01)],
        )
        solve(problem, "exact")
    with pytest.raises(
        InfeasibleError,
        match=r"multiple of 4: maximum 8 x 58 layers = 464 kept at most, "
        r"but the budget keeps 578",
    ):
        solve(_flat_problem(remove=2, constraints=[MultipleOf(4)]), "exact")
    combined = Problem(
        [Layer(i, np.ones(8), np.ones(8), 2) for i in range(2)],
        Budget("remove", 12),
        parse_objective("additive"),
        [MinKept(3), MultipleOf(2)],
    )
    with pytest.raises(
        InfeasibleError,
        match=r"per-layer minimum 3 raised by .*multiple of 2.* to 4 x 2 layers = 8 kept",
    ):
        solve(combined, "dp")
    small = Problem(
        [Layer(layer, np.ones(8), np.ones(8), 2) for layer in range(3)],
        Budget("remove", 2),
        parse_objective("additive"),
        [MinKept(), MultipleOf(4)],
    )
    with pytest.raises(
        InfeasibleError, match=r"keeps 22 experts.*multiple of 4.*nearest reachable totals: 20, 24"
    ):
        solve(small, "greedy")


@pytest.mark.parametrize("solver", [s for s in ALL_SOLVERS if s != "dp"])
def test_infeasible_found_by_the_solver_is_named(solver):
    # each check alone passes (the cheapest 4 experts of a layer cost 4, so device 0's floors
    # 8 <= 15; the caps hold 8 + 8 = 16 kept experts, as many as the budget keeps), but with
    # expert 0 of layers 0 and 1 removed those layers keep experts 1-4, 8 bytes each: 16 > 15
    layers = [
        Layer(layer, np.arange(1, 6, dtype=float), np.array([1, 1, 1, 1, 5]), 4,
              np.full((5, 5), 0.5))
        for layer in range(4)
    ]
    cap = MemoryCap({"0": 15, "1": 9}, {"layers": {"0": [0, 1], "1": [2, 3]}})
    problem = Problem(layers, Budget("remove", 4), parse_objective("additive"),
                      [MinKept(), cap, MustRemove({0: [0], 1: [0]})])
    with pytest.raises(InfeasibleError, match="no plan satisfies all constraints together"):
        solve(problem, solver)


def test_dp_names_what_it_cannot_do():
    problem = _flat_problem(layers=3, experts=6, remove=3, constraints=[EntropyGuard(0.5)])
    problem.layers = [
        Layer(layer.index, layer.importance, layer.expert_bytes, 2, layer.similarity)
        for layer in problem.layers
    ]
    with pytest.raises(SolverError, match="dp does not handle entropy guard.*--solver exact"):
        solve(problem, "dp")


# -- budgets, parsing, building -------------------------------------------------------------------
def test_budget_parse():
    assert Budget.parse("0.5") == Budget("fraction", 0.5)
    assert Budget.parse("64") == Budget("remove", 64)
    assert Budget.parse("free:1.5GB") == Budget("free_bytes", 1.5e9)
    assert Budget.parse("keep:2GiB") == Budget("keep_bytes", 2 * 2**30)
    for bad in ("lots", "free:many", "2.5", "-3"):
        with pytest.raises(UserError):
            Budget.parse(bad)


def test_objective_parse():
    obj = parse_objective("redundancy + 0.5*additive")
    assert obj.names == ["redundancy", "additive"] and obj.terms[1][0] == 0.5
    for bad in ("nope", "0*additive", "additive+"):
        with pytest.raises(UserError):
            parse_objective(bad)


def test_build_problem_from_synthetic_deepseek_v3_adds_routing_groups():
    scores = synth_scores("deepseek-v3", similarity=False)
    problem = build_problem(scores, 0.5)
    assert any(isinstance(c, RoutingGroups) for c in problem.constraints)
    assert any(isinstance(c, MinKept) for c in problem.constraints)
    plan = solve(problem, "exact")
    assert plan.status == "optimal" and check_plan(plan, problem) == []
    for layer in problem.layers:  # 8 groups of 32: equal kept per group
        per = np.bincount(np.asarray(plan.kept[layer.index]) // 32, minlength=8)
        assert np.all(per == per[0]) and per[0] >= 2
    with pytest.raises(UserError, match="similarity"):
        build_problem(scores, 0.5, "redundancy")


def test_byte_budgets_are_met():
    scores = synth_scores("mixtral-8x7b")
    per_expert = int(scores.layers[0].expert_bytes[0])
    problem = build_problem(scores, f"free:{40 * per_expert}")
    for solver in ("exact", "greedy", "uniform", "dp", "relaxation"):
        plan = solve(problem, solver)
        assert plan.num_removed >= 40 and check_plan(plan, problem) == []
    assert solve(problem, "exact").num_removed == 40  # additive: removing more only costs


def test_sparsify_keeps_top_m_symmetric():
    rng = np.random.default_rng(1)
    sim = _sym(rng, 12)
    out = sparsify(sim, 3)
    assert np.allclose(out, out.T) and np.all(np.diag(out) == np.diag(sim))
    assert np.all((out != 0).sum(axis=1) >= 4)  # itself + at least its 3 neighbours


def test_plan_file_round_trip_keeps_checker_happy(tmp_path):
    scores = synth_scores(custom_shape(3, 8, 2))
    problem = build_problem(scores, 0.25, "coverage")
    plan = solve(problem, "exact")
    plan.save(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    for key in (
        "kept",
        "removed",
        "status",
        "objective",
        "bound",
        "gap",
        "solver",
        "seconds",
        "merge_map",
    ):
        assert key in data
    again = Plan.load(tmp_path / "plan.json")
    assert check_plan(again, problem) == []
    again.kept[0], again.removed[0] = again.kept[0][1:], again.removed[0] + again.kept[0][:1]
    assert any("objective" in p or "budget" in p for p in check_plan(again, problem))


def test_checker_catches_each_kind_of_violation():
    problem = _flat_problem(
        layers=2, experts=6, remove=4, constraints=[MultipleOf(2), MustKeep({1: [0]})]
    )
    problem.layers = [
        Layer(layer.index, layer.importance, layer.expert_bytes, 2, layer.similarity)
        for layer in problem.layers
    ]
    good = solve(problem, "exact")
    assert check_plan(good, problem) == []
    bad = Plan(
        kept={0: [0, 1, 2, 3], 1: [1, 2, 3, 4, 5]},
        removed={0: [4, 5], 1: [0]},
        status="optimal",
        objective=good.objective,
        bound=1e9,
        solver="x",
    )
    found = " ".join(check_plan(bad, problem))
    for words in ("budget", "not a multiple of 2", "must_keep", "objective", "lower bound"):
        assert words in found


# -- synthetic scores --------------------------------------------------------------------------------
def test_synth_scores_every_shape_round_trips(tmp_path):
    for name, shape in SHAPES.items():
        s = synth_scores(name, similarity=shape.experts <= 64, cost_curve=True)
        assert s.model.experts_per_layer == {layer: shape.experts for layer in shape.moe_layers}
        assert sum(len(layer.stats["count"]) for layer in s.layers.values()) == shape.total_experts
    s = synth_scores("olmoe-1b-7b", seed=3)
    s.save(tmp_path / "s.npz")
    t = Scores.load(tmp_path / "s.npz")
    assert t.fingerprint() == s.fingerprint() == synth_scores("olmoe-1b-7b", seed=3).fingerprint()
    assert t.fingerprint() != synth_scores("olmoe-1b-7b", seed=4).fingerprint()
    imp = t.importance("reap_mass")
    assert all(v.min() >= 0 for v in imp.values())
    sim = t.layers[0].similarity["cka"]
    assert np.allclose(sim, sim.T) and np.all(np.diag(sim) == 1) and sim.min() >= 0
    curve = t.layers[0].cost_curve
    assert curve[-1] == 0 and np.all(np.diff(curve) <= 1e-12)


def test_coverage_programs_allow_a_layer_to_keep_nothing():
    # regression: the coverage program must price an expert whose layer keeps no expert at all
    rng = np.random.default_rng(3)
    layers = [
        Layer(0, [0.01, 0.02, 0.01], [1, 1, 1], 1, _sym(rng, 3)),
        Layer(1, [1.0, 2.0, 3.0], [1, 1, 1], 1, _sym(rng, 3)),
    ]
    roomy = MemoryCap(100, {"experts": {0: ["0", "1", "0"], 1: ["0", "1", "1"]}})  # expert level
    free = Problem(layers, Budget("remove", 4), parse_objective("coverage"), [MinKept(0)])
    forced = Problem(layers, Budget("remove", 4), parse_objective("coverage"), [MinKept(0), roomy])
    best = solve(free, "exact")
    assert best.kept[0] == [] and best.status == "optimal"
    assert abs(solve(forced, "exact").objective - best.objective) < 1e-9
    assert solve(free, "relaxation").bound <= best.objective + 1e-9
