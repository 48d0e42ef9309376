"""The exact solver's certificates, size-based choices, deadlines and determinism, the checker's
bound rules, and the entropy-guard bugs of issue 12 (each with its regression test)."""

import math
import subprocess
import sys
import time

import numpy as np
import pytest

from solvers.certify import Certificate
from solvers.check import check_plan
from solvers.constraints import Budget, EntropyGuard, MinKept
from solvers.exact import Progress
from solvers.greedy import grape_algorithm1
from solvers.layer_search import build_curves, enumerated_layers, greedy_curve
from solvers.objectives import parse_objective
from solvers.plan import Plan
from solvers.problem import Layer, Problem, build_problem
from solvers.solve import solve
from solvers.synth import custom_shape, synth_scores


# -- first-order convex bounds -------------------------------------------------------------------
def _relaxation_value(matrix, linear, const, n):
    """min over {0 <= x <= 1, sum x = n} of x'(M + mu I)x + (c - mu)'x + const, by CVXPY."""
    import cvxpy as cp

    mu = max(0.0, -float(np.linalg.eigvalsh(matrix)[0])) + 1e-10
    x = cp.Variable(matrix.shape[0])
    q = cp.quad_form(x, matrix + mu * np.eye(matrix.shape[0]), assume_PSD=True)
    prob = cp.Problem(cp.Minimize(q + (linear - mu) @ x + const), [x >= 0, x <= 1, cp.sum(x) == n])
    prob.solve(solver=cp.CLARABEL)
    return prob.value


@pytest.mark.parametrize("objective", ["redundancy", "redundancy+0.5*additive"])
def test_first_order_bound_reaches_the_convex_relaxation_and_stays_below_it(objective):
    scores = synth_scores(custom_shape(2, 48, 4), seed=3)
    problem = build_problem(scores, 0.5, objective)
    curve = greedy_curve(problem, 0, np.flatnonzero(problem.allowed_counts()[0]))
    cert = Certificate(problem, [curve, greedy_curve(problem, 1, np.arange(4, 49))])
    cert.evaluate(cert.pending({0: {24}}))
    q = cert.quadratic_of(0)
    relaxed = _relaxation_value(q.matrix, q.linear, q.const, 24)
    bound = cert.layer_bounds(0)[24]
    # valid (below the relaxation's minimum, which is below every kept set of 24) and converged
    assert bound <= relaxed + 1e-6 * abs(relaxed)
    assert bound >= relaxed - 2e-4 * abs(relaxed)
    assert bound <= curve.value[curve.at(24)]


def test_one_evaluation_bounds_every_count():
    # the tangent plane at one point bounds all counts: the array is finite everywhere allowed
    # and raises the cheap per-count bounds near the evaluated count
    problem = build_problem(synth_scores(custom_shape(1, 40, 2), seed=1), 0.5, "redundancy")
    counts = np.flatnonzero(problem.allowed_counts()[0])
    curve = greedy_curve(problem, 0, counts)
    cheap = curve.bound.copy()
    cert = Certificate(problem, [curve])
    cert.evaluate(cert.pending({0: {20}}))
    assert np.all(np.isfinite(curve.bound)) and np.all(curve.bound >= cheap)
    assert curve.bound[curve.at(20)] > cheap[curve.at(20)] * 1.01


def test_progress_never_drops_a_bound_or_a_better_plan():
    progress = Progress([np.ones(3, bool)], 10.0)
    progress.offer_bound(8.0)
    progress.offer_bound(7.0)  # a weaker bound from a later phase
    progress.offer_bound(None)
    assert progress.bound == 8.0
    assert not progress.offer_plan([np.zeros(3, bool)], 11.0) and progress.value == 10.0
    assert progress.offer_plan([np.zeros(3, bool)], 9.0) and progress.value == 9.0


# -- plans for mid-size layers ---------------------------------------------------------------------
def test_mid_size_layers_are_enumerated_and_proved_optimal():
    # 15-expert layers: the old fixed limit (12) left these to greedy with a large gap
    problem = build_problem(synth_scores(custom_shape(3, 15, 2), seed=5), 0.5, "redundancy")
    plan = solve(problem, "exact", time_limit=30)
    assert plan.status == "optimal" and plan.gap <= 1e-6
    assert plan.provenance["method"].startswith("exact per-layer curves")
    for name in ("greedy", "marginal", "uniform", "dp"):
        assert solve(problem, name).objective >= plan.objective - 1e-9 * plan.objective


def test_enumeration_is_chosen_by_size_and_time_limit():
    problem = build_problem(synth_scores(custom_shape(2, 16, 2)), 0.5, "redundancy")
    assert enumerated_layers(problem, 60.0) == {0, 1}
    assert enumerated_layers(problem, 0.5) == set()  # 2^16 subsets do not fit 25% of 0.5 s
    big = build_problem(synth_scores(custom_shape(1, 24, 2)), 0.5, "redundancy")
    assert enumerated_layers(big, 1e6) == set()  # above ENUMERATE_MAX, whatever the limit
    assert all(c.exact for c in build_curves(problem, 60.0))


# -- deadlines and determinism ---------------------------------------------------------------------
def test_exact_respects_its_time_limit_and_keeps_a_bound():
    # coverage on 36 x 128 experts takes ~10 s when it may; with 2 s it stops in time, with a bound
    problem = build_problem(synth_scores("gpt-oss-120b", seed=0), 0.5, "coverage")
    plan = solve(problem, "exact", time_limit=2.0)
    # + 1 s: the checker, and a shared CPU (unchecked, it takes ~10 s)
    assert plan.seconds <= 2.0 * 1.05 + 1.0
    assert plan.bound is not None and plan.gap < 0.1  # at least the cheap per-count bound


def test_same_solve_same_plan_and_bound_even_under_load():
    problem = build_problem(synth_scores(custom_shape(6, 32, 4), seed=2), 0.5, "redundancy")
    first = solve(problem, "exact", time_limit=60)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        again = solve(build_problem(synth_scores(custom_shape(6, 32, 4), seed=2), 0.5,
                                    "redundancy"), "exact", time_limit=60)
    finally:
        burner.kill()
        burner.wait()
    assert first.kept == again.kept
    assert first.bound == again.bound and first.objective == again.objective
    assert first.status == again.status and first.gap < 0.01


# -- the checker judges the bound itself -----------------------------------------------------------
def _small():
    rng = np.random.default_rng(0)
    layers = [Layer(i, rng.random(4), np.full(4, 10), 1) for i in range(2)]
    problem = Problem(layers, Budget("remove", 2), parse_objective("additive"), [MinKept()])
    return problem, solve(problem, "exact")


def _with(plan, **fields):
    data = {k: getattr(plan, k) for k in ("kept", "removed", "status", "objective", "bound", "gap")}
    return Plan(**{**data, **fields})


def test_checker_recomputes_the_gap_instead_of_trusting_it():
    problem, plan = _small()
    assert plan.status == "optimal" and check_plan(plan, problem) == []
    half = _with(plan, bound=plan.objective / 2, gap=0.0)  # claims optimal with a wide gap
    found = " ".join(check_plan(half, problem))
    assert "status optimal needs a bound within 1e-06" in found
    assert "gap 0.0 does not match" in found
    honest = _with(plan, bound=plan.objective / 2, gap=0.5, status="feasible")
    assert check_plan(honest, problem) == []


def test_checker_refuses_optimal_without_a_bound_and_bounds_above_the_objective():
    problem, plan = _small()
    found = " ".join(check_plan(_with(plan, bound=None, gap=None), problem))
    assert "status optimal needs a bound" in found and "no bound" in found
    scale = max(1.0, plan.objective)  # docs: bound <= objective within 1e-6 (relative, >= 1)
    above = plan.objective + 2e-6 * scale
    assert any("exceeds" in p for p in check_plan(_with(plan, bound=above, gap=0.0), problem))
    within = plan.objective + 5e-7 * scale
    assert check_plan(_with(plan, bound=within, gap=0.0), problem) == []


# -- the entropy guard: one tolerance everywhere ---------------------------------------------------
def _guarded(excess: float):
    """Two layers of 4; the objective wants counts (3, 1), whose entropy sits `excess` below the
    guard's floor (negative: above it)."""
    entropy = math.log(4) - 3 * math.log(3) / 4
    gamma = 1 - (entropy + excess) / math.log(2)
    layers = [
        Layer(0, [5.0, 5.0, 5.0, 0.1], np.full(4, 10), 1),
        Layer(1, [5.0, 0.01, 0.01, 0.01], np.full(4, 10), 1),
    ]
    return Problem(layers, Budget("remove", 4), parse_objective("additive"),
                   [MinKept(1), EntropyGuard(gamma)])


@pytest.mark.parametrize("excess", [0.0, 5e-8, -1e-9])
def test_an_allocation_at_the_entropy_floor_is_chosen_and_accepted(excess):
    # regression: the program row allowed 1e-7 * rhs, the checker 1e-9: chosen, then rejected
    problem = _guarded(excess)
    plan = solve(problem, "exact")  # raised PlanError before the fix
    assert plan.kept_counts() == {0: 3, 1: 1} and plan.status == "optimal"
    assert check_plan(plan, problem) == []


def test_an_allocation_below_the_entropy_floor_is_refused_by_program_and_checker_alike():
    problem = _guarded(1e-6)
    plan = solve(problem, "exact")
    assert plan.kept_counts() == {0: 2, 1: 2} and check_plan(plan, problem) == []
    guard = problem.constraints[-1]
    assert guard.count_violations(problem, np.array([3, 1]))  # the checker refuses (3, 1) too


def test_algorithm1_freezes_at_the_constraints_floor_with_unequal_layers():
    # layers of 4 and 8 experts: the paper's E_init (1 - gamma) = 0.605 lets layer 1 take all three
    # merges ([4, 5]); the constraint's floor (1 - gamma) log 2 = 0.658 freezes it after one
    # (entropy of [4, 7] is 0.656), then layer 0 ([3, 7]), restart, layer 1 again: [3, 6]
    def sim(n, value):
        d = np.full((n, n), value)
        np.fill_diagonal(d, 1.0)
        return d

    layers = [Layer(0, np.ones(4), np.full(4, 10), 1, sim(4, 0.1)),
              Layer(1, np.ones(8), np.full(8, 10), 1, sim(8, 0.9))]
    guard = EntropyGuard(0.05)
    problem = Problem(
        layers, Budget("remove", 3), parse_objective("redundancy"), [MinKept(1), guard]
    )
    masks, _ = grape_algorithm1(problem)
    assert [int(m.sum()) for m in masks] == [3, 6]
    assert guard.entropy_floor(problem) == pytest.approx(0.95 * math.log(2))


# -- coverage's Lagrangian LP bounds --------------------------------------------------------
@pytest.mark.parametrize("solver", ["highs", "scipy"])
def test_lagrangian_bound_equals_the_lp_at_the_solved_count(solver):
    # the duals' sign and the per-expert split are right: tight where solved, below elsewhere
    from solvers.constraints import LayerRule
    from solvers.objectives import Coverage
    from solvers.objectives.coverage_lp import LayerLP

    layer = build_problem(synth_scores(custom_shape(1, 40, 2), seed=4), 0.5, "coverage").layers[0]
    term, rule = Coverage(candidates=6), LayerRule.free(40)
    lp = LayerLP(*term._assignment(layer), rule)
    lp.row_lo[-1] = lp.row_hi[-1] = 17
    lam = lp._prices_scipy() if solver == "scipy" else lp.prices(17)
    bounds = term.lagrangian_bounds(layer, lam, rule)
    assert bounds[17] == pytest.approx(lp.value, rel=1e-7)
    assert np.all(bounds[:-1] <= term.lp_lower_bounds(layer, range(40))[:-1] + 1e-9)


def test_coverage_bounds_survive_another_highs_user_in_the_process():
    # regression: CVXPY's HiGHS started HiGHS's global thread pool first; asking the LP for one
    # thread then failed every solve and the bound fell back to the cheap one (gap 7% not 0%)
    script = (
        "from solvers.synth import synth_scores, custom_shape\n"
        "from solvers.problem import build_problem\n"
        "from solvers.solve import solve\n"
        "s = synth_scores(custom_shape(2, 40, 2), seed=1)\n"
        "solve(build_problem(s, 0.5, 'additive'), 'relaxation')\n"
        "p = build_problem(s, 0.5, 'coverage')\n"
        "term, layer, rule = p.objective.terms[0][1], p.layers[0], p.layer_rules()[0]\n"
        "bounds = term.lp_lower_bounds(layer, [17], rule)\n"
        "print((bounds[17] - term.lower_bounds(layer)[17]) / bounds[17])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) > 0.01  # the LP bound, not the cheap one
