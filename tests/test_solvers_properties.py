"""Property tests on random small instances: every solver, every constraint, against brute force."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solvers.check import check_plan
from solvers.constraints import (
    Budget,
    EntropyGuard,
    MaxRemovedFraction,
    MemoryCap,
    MinKept,
    MultipleOf,
    MustKeep,
    MustRemove,
    RoutingGroups,
    Uniform,
)
from solvers.errors import InfeasibleError, SolverError
from solvers.layer_search import enumerate_curve, order_curve
from solvers.objectives import parse_objective
from solvers.plan import Plan
from solvers.problem import Layer, Problem
from solvers.registry import SOLVERS
from solvers.solve import solve

SETTINGS = dict(deadline=None, derandomize=True)
OBJECTIVES = [
    "additive",
    "redundancy",
    "coverage",
    "curves",
    "redundancy+0.5*additive",
    "coverage+2*curves",
]
CONSTRAINT_KINDS = [
    "min_kept",
    "max_removed",
    "multiple_of",
    "groups",
    "must_keep",
    "must_remove",
    "uniform",
    "entropy",
    "pipeline_cap",
    "expert_cap",
    "bytes_budget",
]
TOL = 1e-6


def _layer(rng, index, n, unequal_bytes):
    sim = rng.random((n, n))
    sim = (sim + sim.T) / 2
    curve = np.sort(rng.random(n + 1))[::-1] * rng.uniform(0.5, 2)
    curve[-1] = 0.0
    nbytes = rng.choice([100, 150, 200], size=n) if unequal_bytes else np.full(n, 100)
    return Layer(index, rng.lognormal(0, 1, n), nbytes, int(rng.integers(1, 3)), sim, curve)


def random_problem(seed, kinds=None, objective=None, sizes=((2, 4), (2, 5), (3, 4), (2, 6))):
    rng = np.random.default_rng(seed)
    n_layers, n = sizes[int(rng.integers(len(sizes)))]
    kinds = kinds if kinds is not None else [k for k in CONSTRAINT_KINDS if rng.random() < 0.25]
    unequal = "bytes_budget" in kinds and rng.random() < 0.5
    layers = [
        _layer(rng, 2 * layer + 1, n, unequal) for layer in range(n_layers)
    ]  # decoder indices 1, 3, 5
    total = n_layers * n
    objective = objective or OBJECTIVES[int(rng.integers(len(OBJECTIVES)))]
    cons = []
    floor = 1
    if "min_kept" in kinds:
        floor = int(rng.integers(0, 3))
        cons.append(MinKept(floor))
    if "max_removed" in kinds:
        cons.append(MaxRemovedFraction(float(rng.choice([0.5, 0.75]))))
    if "multiple_of" in kinds:
        cons.append(MultipleOf(2))
    if "groups" in kinds and n % 2 == 0:
        cons.append(RoutingGroups(2, 1))
    pick = lambda: {layers[int(rng.integers(n_layers))].index: [int(rng.integers(n))]}  # noqa: E731
    if "must_keep" in kinds:
        cons.append(MustKeep(pick()))
    if "must_remove" in kinds:
        cons.append(MustRemove(pick()))
    if "uniform" in kinds:
        cons.append(Uniform())
    if "entropy" in kinds:
        cons.append(EntropyGuard(float(rng.choice([0.02, 0.1, 0.3]))))
    if "pipeline_cap" in kinds:
        cons.append(
            MemoryCap.pipeline(
                [layer.index for layer in layers], 2, 100 * rng.integers(n // 2, n + 1)
            )
        )
    if "expert_cap" in kinds:
        cons.append(
            MemoryCap.expert_parallel(
                {layer.index: n for layer in layers},
                2,
                100 * rng.integers(n_layers, total // 2 + 1),
            )
        )
    if "bytes_budget" in kinds:
        budget = Budget(
            "keep_bytes",
            float(sum(layer.expert_bytes.sum() for layer in layers)) * rng.uniform(0.4, 0.9),
        )
    else:
        budget = Budget("remove", int(rng.integers(1, total - n_layers * max(floor, 1) + 1)))
    return Problem(layers, budget, parse_objective(objective), cons)


def brute_force(problem):
    """(best objective, plan) over every plan that passes every constraint's check; None if none."""
    per_layer = []
    for layer in problem.layers:
        masks = np.array(list(itertools.product([False, True], repeat=layer.num_experts)))
        per_layer.append((masks, problem.objective.layer_values(layer, masks)))
    best = None
    for combo in itertools.product(*[range(len(m)) for m, _ in per_layer]):
        value = sum(v[i] for (_, v), i in zip(per_layer, combo))
        if best is not None and value >= best[0] - 1e-12:
            continue
        plan = Plan(
            kept={
                layer.index: np.flatnonzero(m[i]).tolist()
                for layer, (m, _), i in zip(problem.layers, per_layer, combo)
            },
            removed={
                layer.index: np.flatnonzero(~m[i]).tolist()
                for layer, (m, _), i in zip(problem.layers, per_layer, combo)
            },
        )
        if all(not c.check(plan, problem) for c in problem.all_constraints):
            best = (value, plan)
    return best


@settings(max_examples=45, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1))
def test_every_solver_is_valid_and_exact_matches_brute_force(seed):
    problem = random_problem(seed)
    best = brute_force(problem)
    for name in sorted(SOLVERS):
        try:
            plan = solve(problem, name, time_limit=30)
        except InfeasibleError:
            assert best is None, f"{name} called a feasible problem infeasible"
            continue
        except SolverError as exc:
            assert name == "dp" and ("does not handle" in str(exc) or "same size" in str(exc)), exc
            continue
        assert best is not None, f"{name} returned a plan for an infeasible problem"
        assert check_plan(plan, problem) == []
        assert plan.objective >= best[0] - TOL * max(1, abs(best[0]))
        if plan.bound is not None:  # every bound is a true lower bound
            assert plan.bound <= best[0] + TOL * max(1, abs(best[0]))
        if name == "exact":
            assert plan.status == "optimal"
            assert abs(plan.objective - best[0]) <= TOL * max(1, abs(best[0]))


@pytest.mark.parametrize("kind", CONSTRAINT_KINDS)
def test_each_constraint_kind_alone(kind):
    # every constraint type, on its own, with every solver: valid plans and optimal exact
    for seed in range(6):
        _check_kind(kind, seed)


def _check_kind(kind, seed):
    problem = random_problem(1000 * seed + CONSTRAINT_KINDS.index(kind), kinds=[kind, "min_kept"])
    best = brute_force(problem)
    for name in sorted(SOLVERS):
        try:
            plan = solve(problem, name, time_limit=30)
        except InfeasibleError:
            assert best is None
            continue
        except SolverError:
            assert name == "dp"
            continue
        assert check_plan(plan, problem) == [] and best is not None
        if name == "exact":
            assert abs(plan.objective - best[0]) <= TOL * max(1, abs(best[0]))


@settings(max_examples=20, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), objective=st.sampled_from(OBJECTIVES))
def test_exact_is_no_worse_than_heuristics_and_bounds_hold(seed, objective):
    # medium instances (no brute force): exact is optimal (layers <= 12 experts enumerate) and
    # no heuristic beats it; the relaxation bound stays below it
    problem = random_problem(
        seed, kinds=["min_kept"], objective=objective, sizes=((3, 8), (4, 10), (3, 12))
    )
    exact = solve(problem, "exact")
    assert exact.status == "optimal"
    for name in ("greedy", "marginal", "uniform", "relaxation", "dp"):
        plan = solve(problem, name)
        assert plan.objective >= exact.objective - TOL * max(1, abs(exact.objective)), name
        if plan.bound is not None:
            assert plan.bound <= exact.objective + TOL * max(1, abs(exact.objective)), name


@settings(max_examples=25, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1))
def test_additive_with_budget_and_floors_exact_equals_global_ranking(seed):
    rng = np.random.default_rng(seed)
    layers = [
        Layer(layer, rng.lognormal(0, 1.5, n), np.full(n, 7), int(rng.integers(1, 4)))
        for layer, n in enumerate(rng.integers(4, 40, size=int(rng.integers(2, 9))))
    ]
    total = sum(layer.num_experts for layer in layers)
    floors = sum(layer.top_k for layer in layers)
    problem = Problem(
        layers,
        Budget("remove", int(rng.integers(0, total - floors + 1))),
        parse_objective("additive"),
        [MinKept()],
    )
    exact, ranking = solve(problem, "exact"), solve(problem, "ranking")
    assert exact.status == "optimal"
    assert abs(exact.objective - ranking.objective) <= 1e-9 * max(1, exact.objective)
    assert solve(problem, "greedy").kept == ranking.kept


@settings(max_examples=30, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), objective=st.sampled_from(OBJECTIVES))
def test_term_states_match_recomputation(seed, objective):
    # the incremental deltas every heuristic relies on equal plain re-evaluation
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 9))
    layer = _layer(rng, 0, n, False)
    problem = Problem([layer], Budget("remove", 1), parse_objective(objective))
    obj = problem.objective
    mask = rng.random(n) < 0.6
    mask[0], mask[1] = True, False
    state = obj.state(layer, mask)
    for step in range(4):
        value = obj.layer_value(layer, mask)
        rem, add = state.removal_deltas(), state.addition_deltas()
        for e in range(n):
            other = mask.copy()
            other[e] = not mask[e]
            expect = obj.layer_value(layer, other) - value
            assert abs((rem if mask[e] else add)[e] - expect) <= 1e-9 * max(1, abs(value))
        out, into = np.flatnonzero(mask), np.flatnonzero(~mask)
        swaps = state.swap_deltas(out, into)
        for a, i in enumerate(out):
            for b, j in enumerate(into):
                other = mask.copy()
                other[i], other[j] = False, True
                assert abs(swaps[a, b] - (obj.layer_value(layer, other) - value)) <= 1e-9 * max(
                    1, abs(value)
                )
        e = int(rng.integers(n))  # move one expert and keep checking the updated state
        if mask[e] and mask.sum() > 1:
            state.remove(e)
            mask[e] = False
        elif not mask[e]:
            state.add(e)
            mask[e] = True


@settings(max_examples=30, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), objective=st.sampled_from(OBJECTIVES))
def test_lower_bounds_and_order_curves_against_enumeration(seed, objective):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    problem = Problem([_layer(rng, 0, n, False)], Budget("remove", 1), parse_objective(objective))
    layer = problem.layers[0]
    counts = np.arange(n + 1)
    truth = enumerate_curve(problem, 0, counts)
    bounds = problem.objective.lower_bounds(layer)
    assert np.all(bounds <= truth.value + 1e-9 * np.maximum(1, np.abs(truth.value)))
    if problem.objective.order_exact:
        assert np.allclose(order_curve(problem, 0, counts).value, truth.value)
    for _, term in problem.objective.terms:
        if term.name == "coverage":  # LP tangents: few candidates (fallback used), layer rules
            term.candidates = int(rng.integers(1, n + 1))
            rules = [MustKeep({0: [int(rng.integers(n))]})] if rng.random() < 0.5 else []
            if n % 2 == 0 and rng.random() < 0.5:
                rules.append(RoutingGroups(2, 1))
            ruled = Problem([layer], Budget("remove", 1), parse_objective("coverage"), rules)
            tangents = term.lp_lower_bounds(
                layer, rng.integers(0, n + 1, size=2), ruled.layer_rules()[0]
            )
            truth_cov = enumerate_curve(ruled, 0, counts).value  # inf where the rules allow no set
            assert np.all(tangents <= truth_cov + 1e-9 * np.maximum(1, np.abs(truth_cov)))


@settings(max_examples=10, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1))
def test_same_input_same_plan(seed):
    problem = random_problem(seed, sizes=((3, 8), (2, 14)))
    for name in sorted(SOLVERS):
        try:
            first = solve(problem, name)
        except (InfeasibleError, SolverError):
            continue
        again = solve(random_problem(seed, sizes=((3, 8), (2, 14))), name)
        assert first.kept == again.kept and first.objective == again.objective, name
