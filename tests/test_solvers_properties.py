"""Property tests on small drawn problems: every solver, every constraint, against brute force.

The problem itself is drawn by hypothesis strategies (layers, experts, importance, similarity,
cost curves, constraints and budget), so a failure shrinks to a small problem. Budgets are drawn
among the totals the per-layer constraints can reach, which keeps infeasible draws rare
(checked below: under 20%).
"""

import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings
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
    precheck,
    reachable_totals,
)
from solvers.errors import InfeasibleError, SolverError, UserError
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
SMALL = ((2, 4), (2, 5), (3, 4), (2, 6))  # (layers, experts): brute force stays under 4096 plans
TOL = 1e-6


# -- strategies ---------------------------------------------------------------------------------
@st.composite
def layers_strategy(draw, n_layers: int, n: int, unequal_bytes: bool = False):
    unit = st.floats(0.0, 1.0, allow_nan=False)
    out = []
    for i in range(n_layers):
        importance = draw(st.lists(st.floats(0.01, 5.0, allow_nan=False), min_size=n, max_size=n))
        upper = draw(st.lists(unit, min_size=n * (n - 1) // 2, max_size=n * (n - 1) // 2))
        sim = np.eye(n)
        sim[np.triu_indices(n, 1)] = upper
        sim = sim + np.triu(sim, 1).T
        steps = draw(st.lists(unit, min_size=n, max_size=n))  # curve: falls to 0 at n kept
        curve = np.concatenate([np.cumsum(steps[::-1])[::-1], [0.0]])
        sizes = st.sampled_from([100, 150, 200]) if unequal_bytes else st.just(100)
        nbytes = draw(st.lists(sizes, min_size=n, max_size=n))
        top_k = draw(st.integers(1, 2))
        out.append(Layer(2 * i + 1, importance, nbytes, top_k, sim, curve))  # decoder 1, 3, 5
    return out


def _constraint(draw, kind, layers, n):
    """One constraint of `kind` with drawn parameters (None where it does not apply)."""
    indices = [layer.index for layer in layers]
    pick = lambda: {draw(st.sampled_from(indices)): [draw(st.integers(0, n - 1))]}  # noqa: E731
    if kind == "min_kept":
        return MinKept(draw(st.integers(0, 2)))
    if kind == "max_removed":
        return MaxRemovedFraction(draw(st.sampled_from([0.5, 0.75])))
    if kind == "multiple_of":
        return MultipleOf(2)
    if kind == "groups":
        return RoutingGroups(2, 1) if n % 2 == 0 else None
    if kind == "must_keep":
        return MustKeep(pick())
    if kind == "must_remove":
        return MustRemove(pick())
    if kind == "uniform":
        return Uniform()
    if kind == "entropy":
        return EntropyGuard(draw(st.sampled_from([0.02, 0.1, 0.3])))
    if kind == "pipeline_cap":
        return MemoryCap.pipeline(indices, 2, 100 * draw(st.integers(n // 2, n)))
    if kind == "expert_cap":
        cap = 100 * draw(st.integers(len(layers), len(layers) * n // 2))
        return MemoryCap.expert_parallel({i: n for i in indices}, 2, cap)
    return None


def _count_budget(draw, layers, objective, cons) -> Budget:
    """Remove at least one expert, down to a total the per-layer constraints can reach and the
    cheap checks accept; from the drawn one on, the first total some plan meets (if any)."""
    total = sum(layer.num_experts for layer in layers)
    free = Problem(layers, Budget("remove", 0), objective, cons)
    allowed = free.allowed_counts()
    reach = reachable_totals(allowed) if all(a.any() for a in allowed) else 0
    kept = [t for t in range(total) if (reach >> t) & 1]
    passing = []
    for t in kept:
        try:
            precheck(Problem(layers, Budget("remove", total - t), objective, cons))
            passing.append(t)
        except InfeasibleError:
            pass
    options = passing or kept or [total - 1]
    first = draw(st.integers(0, len(options) - 1))
    if total > 12:  # too many plans to look for one: the cheap checks must do
        return Budget("remove", total - options[first])
    for k in options[first:] + options[:first]:
        budget = Budget("remove", total - k)
        if has_plan(Problem(layers, budget, objective, cons)):
            return budget
    return Budget("remove", total - options[first])


def has_plan(problem) -> bool:
    """Whether any plan passes every constraint's check (layer sets prefiltered by their rule
    and allowed counts; stops at the first plan found)."""
    per_layer = []
    rules, allowed_counts = problem.layer_rules(), problem.allowed_counts()
    for layer, rule, allowed in zip(problem.layers, rules, allowed_counts):
        masks = np.array(list(itertools.product([False, True], repeat=layer.num_experts)))
        ok = [allowed[m.sum()] and rule.mask_ok(m) for m in masks]
        per_layer.append(masks[np.array(ok, bool)])
    for combo in itertools.product(*per_layer):
        plan = Plan(
            kept={la.index: np.flatnonzero(m).tolist() for la, m in zip(problem.layers, combo)},
            removed={la.index: np.flatnonzero(~m).tolist() for la, m in zip(problem.layers, combo)},
        )
        if all(not c.check(plan, problem) for c in problem.all_constraints):
            return True
    return False


@st.composite
def problems(draw, kinds=None, objective=None, sizes=SMALL):
    n_layers, n = draw(st.sampled_from(sizes))
    if kinds is None:
        kinds = sorted(draw(st.sets(st.sampled_from(CONSTRAINT_KINDS), max_size=3)))
    unequal = "bytes_budget" in kinds and draw(st.booleans())
    layers = draw(layers_strategy(n_layers, n, unequal))
    objective = parse_objective(objective or draw(st.sampled_from(OBJECTIVES)))
    cons = [c for c in (_constraint(draw, k, layers, n) for k in kinds) if c is not None]
    if "bytes_budget" in kinds:
        share = draw(st.floats(0.4, 0.9, allow_nan=False))
        budget = Budget("keep_bytes", float(sum(la.expert_bytes.sum() for la in layers)) * share)
    else:
        budget = _count_budget(draw, layers, objective, cons)
    return Problem(layers, budget, objective, cons)


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


def _against_brute_force(problem, best, solvers=None):
    for name in solvers or sorted(SOLVERS):
        try:
            plan = solve(problem, name, time_limit=30)
        except InfeasibleError:
            assert best is None, f"{name} called a feasible problem infeasible"
            continue
        except SolverError as exc:
            assert name == "dp" and "does not handle" in str(exc), exc
            continue
        assert best is not None, f"{name} returned a plan for an infeasible problem"
        assert check_plan(plan, problem) == []
        assert plan.objective >= best[0] - TOL * max(1, abs(best[0]))
        if plan.bound is not None:  # every bound is a true lower bound
            assert plan.bound <= best[0] + TOL * max(1, abs(best[0])), name
        if name == "exact":
            assert plan.status == "optimal"
            assert abs(plan.objective - best[0]) <= TOL * max(1, abs(best[0]))


# -- properties ---------------------------------------------------------------------------------
@settings(max_examples=45, **SETTINGS)
@given(problem=problems())
def test_every_solver_is_valid_and_exact_matches_brute_force(problem):
    _against_brute_force(problem, brute_force(problem))


@pytest.mark.parametrize("kind", CONSTRAINT_KINDS)
def test_each_constraint_kind_alone(kind):
    # every constraint type, on its own, with every solver: valid plans and optimal exact
    @settings(max_examples=6, **SETTINGS)
    @given(problem=problems(kinds=sorted({kind, "min_kept"})))
    def check(problem):
        _against_brute_force(problem, brute_force(problem))

    check()


def test_infeasible_draws_are_rare():
    # the strategy must mostly draw problems that have a plan, or the properties test little
    feasible = []

    @settings(max_examples=120, **SETTINGS)
    @given(problem=problems())
    def record(problem):
        feasible.append(brute_force(problem) is not None)

    record()
    infeasible = feasible.count(False) / len(feasible)
    assert infeasible < 0.2, f"{infeasible:.0%} of {len(feasible)} draws are infeasible"


@settings(max_examples=20, **SETTINGS)
@given(
    problem=problems(kinds=["min_kept"], sizes=((3, 8), (4, 10), (3, 12))),
)
def test_exact_is_no_worse_than_heuristics_and_bounds_hold(problem):
    # medium instances (no brute force): exact is optimal (these layers enumerate) and no
    # heuristic beats it; every other solver's bound stays below it
    exact = solve(problem, "exact")
    assert exact.status == "optimal"
    for name in ("greedy", "marginal", "uniform", "relaxation", "dp"):
        plan = solve(problem, name)
        assert plan.objective >= exact.objective - TOL * max(1, abs(exact.objective)), name
        if plan.bound is not None:
            assert plan.bound <= exact.objective + TOL * max(1, abs(exact.objective)), name


@settings(max_examples=25, **SETTINGS)
@given(
    importance=st.lists(
        st.lists(st.floats(0.0, 20.0, allow_nan=False), min_size=4, max_size=40),
        min_size=2,
        max_size=8,
    ),
    top_k=st.integers(1, 3),
    data=st.data(),
)
def test_additive_with_budget_and_floors_exact_equals_global_ranking(importance, top_k, data):
    layers = [Layer(i, imp, np.full(len(imp), 7), top_k) for i, imp in enumerate(importance)]
    total = sum(layer.num_experts for layer in layers)
    remove = data.draw(st.integers(0, total - top_k * len(layers)))
    problem = Problem(layers, Budget("remove", remove), parse_objective("additive"), [MinKept()])
    exact, ranking = solve(problem, "exact"), solve(problem, "ranking")
    assert exact.status == "optimal"
    assert abs(exact.objective - ranking.objective) <= 1e-9 * max(1, exact.objective)
    assert solve(problem, "greedy").kept == ranking.kept


@settings(max_examples=30, **SETTINGS)
@given(
    layer=st.integers(3, 8).flatmap(lambda n: layers_strategy(1, n)),
    objective=st.sampled_from(OBJECTIVES),
    data=st.data(),
)
def test_term_states_match_recomputation(layer, objective, data):
    # the incremental deltas every heuristic relies on equal plain re-evaluation
    layer = layer[0]
    n = layer.num_experts
    problem = Problem([layer], Budget("remove", 1), parse_objective(objective))
    obj = problem.objective
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    mask[0], mask[1] = True, False
    state = obj.state(layer, mask)
    for _ in range(4):
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
                expect = obj.layer_value(layer, other) - value
                assert abs(swaps[a, b] - expect) <= 1e-9 * max(1, abs(value))
        e = data.draw(st.integers(0, n - 1))  # move one expert and keep checking the state
        if mask[e] and mask.sum() > 1:
            state.remove(e)
            mask[e] = False
        elif not mask[e]:
            state.add(e)
            mask[e] = True


def _rules(data, layer):
    n = layer.num_experts
    rules = [MustKeep({layer.index: [data.draw(st.integers(0, n - 1))]})] if data.draw(
        st.booleans()
    ) else []
    if n % 2 == 0 and data.draw(st.booleans()):
        rules.append(RoutingGroups(2, 1))
    return rules


@settings(max_examples=30, **SETTINGS)
@given(
    layer=st.integers(2, 8).flatmap(lambda n: layers_strategy(1, n)),
    objective=st.sampled_from(OBJECTIVES),
    data=st.data(),
)
def test_lower_bounds_and_order_curves_against_enumeration(layer, objective, data):
    layer = layer[0]
    n = layer.num_experts
    problem = Problem([layer], Budget("remove", 1), parse_objective(objective))
    counts = np.arange(n + 1)
    truth = enumerate_curve(problem, 0, counts)
    bounds = problem.objective.lower_bounds(layer)
    assert np.all(bounds <= truth.value + 1e-9 * np.maximum(1, np.abs(truth.value)))
    if problem.objective.order_exact:
        assert np.allclose(order_curve(problem, 0, counts).value, truth.value)
    for _, term in problem.objective.terms:
        if term.name == "coverage":  # Lagrangian LP bounds: few candidates (fallback), rules
            term.candidates = data.draw(st.integers(1, n))
            ruled = Problem([layer], Budget("remove", 1), parse_objective("coverage"),
                            _rules(data, layer))
            at = data.draw(st.lists(st.integers(0, n), min_size=1, max_size=2))
            lagrange = term.lp_lower_bounds(layer, at, ruled.layer_rules()[0])
            truth_cov = enumerate_curve(ruled, 0, counts).value  # inf where the rules allow none
            assert np.all(lagrange <= truth_cov + 1e-9 * np.maximum(1, np.abs(truth_cov)))


@settings(max_examples=30, **SETTINGS)
@given(
    layer=st.integers(2, 9).flatmap(lambda n: layers_strategy(1, n)),
    objective=st.sampled_from(["redundancy", "redundancy+0.5*additive", "redundancy+coverage"]),
    data=st.data(),
)
def test_certificate_bounds_hold_at_every_count(layer, objective, data):
    # the first-order convex bound (uniform and SDP shifts) and the Lagrangian LP bound, from
    # evaluations at drawn counts, stay below the best kept set of every count
    from solvers.certify import Certificate
    from solvers.layer_search import greedy_curve

    layer = layer[0]
    n = layer.num_experts
    problem = Problem([layer], Budget("remove", 1), parse_objective(objective), _rules(data, layer))
    allowed = np.flatnonzero(problem.allowed_counts()[0])
    assume(allowed.size > 0)
    truth = enumerate_curve(problem, 0, np.arange(n + 1)).value
    curve = greedy_curve(problem, 0, allowed)
    cert = Certificate(problem, [curve])
    at = data.draw(st.lists(st.sampled_from(allowed.tolist()), min_size=1, max_size=3))
    cert.evaluate(cert.pending({0: set(at)}))
    if data.draw(st.booleans()) and cert.sdp_candidates(np.array([at[0]])):
        cert.apply_sdp([0], np.array([at[0]]))
        cert.evaluate(cert.pending({0: set(at)}))
    bound = cert.layer_bounds(0)
    assert np.all(bound[allowed] <= truth[allowed] + 1e-9 * np.maximum(1, np.abs(truth[allowed])))
    assert np.all(curve.bound <= curve.value + 1e-9 * np.maximum(1, np.abs(curve.value)))


@settings(max_examples=25, **SETTINGS)
@given(problem=problems(kinds=["min_kept", "multiple_of"], objective="redundancy", sizes=((3, 8),)))
def test_knapsack_equals_the_integer_program(problem):
    # the dynamic program that replaces HiGHS for row-free count programs finds its optimum
    from solvers.formulation import Formulation, solve_count_program
    from solvers.layer_search import build_curves

    costs = [c.value for c in build_curves(problem)]
    try:
        counts, res = solve_count_program(problem, costs, 30)
    except InfeasibleError:
        return
    form = Formulation(problem, "count", curves=[np.where(np.isfinite(c), c, 0.0) for c in costs])
    for p, c in enumerate(costs):
        if (~np.isfinite(c)).any():
            form.mip.set_bounds(form.y[p][~np.isfinite(c)], ub=0.0)
    mip = form.mip.solve(30)
    assert res.x is None and abs(res.objective - mip.objective) <= 1e-9 * max(1, abs(mip.objective))


@settings(max_examples=10, **SETTINGS)
@given(problem=problems(sizes=((3, 8), (2, 14), (2, 20))), data=st.data())
def test_same_input_same_plan(problem, data):
    for name in sorted(SOLVERS):
        try:
            first = solve(problem, name)
        except (InfeasibleError, SolverError):
            continue
        again = solve(problem, name)
        assert first.kept == again.kept and first.objective == again.objective, name
        assert first.bound == again.bound, name


def test_strategy_problems_are_valid_problems():
    # a drawn problem is a Problem that validates; a constraint set that does not fit is refused
    @settings(max_examples=20, **SETTINGS)
    @given(problem=problems())
    def check(problem):
        assert isinstance(problem, Problem) and problem.total_experts <= 12

    check()
    with pytest.raises(UserError):
        Problem([Layer(0, [1.0, 2.0, 3.0], [1, 1, 1], 1)], Budget("remove", 1),
                parse_objective("additive"), [RoutingGroups(2, 1)])
