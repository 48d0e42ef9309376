"""Registries that are used: constraints and objectives round-trip through their specs, solvers
declare what they accept and solve() refuses the rest in one place, names for choice lists."""

import json

import numpy as np
import pytest

import solvers.constraints as constraints_pkg
from solvers.constraints import (
    CONSTRAINTS,
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
    constraint_from_json,
    constraints_from_json,
)
from solvers.errors import SolverError, UserError
from solvers.objectives import TERMS, objective_from_json, parse_objective, term_from_json
from solvers.problem import Layer, Problem, build_problem
from solvers.registry import (
    SOLVERS,
    Outcome,
    Solver,
    constraint_names,
    objective_names,
    register_solver,
)
from solvers.solve import solve, solver_names
from solvers.synth import custom_shape, synth_scores

EXAMPLES = {
    "budget": [Budget("remove", 3), Budget("fraction", 0.25), Budget("keep_bytes", 4e9)],
    "min_kept": [MinKept(), MinKept(2)],
    "max_removed_fraction": [MaxRemovedFraction(0.5)],
    "multiple_of": [MultipleOf(4)],
    "routing_groups": [RoutingGroups(8, 4)],
    "must_keep": [MustKeep({3: [0, 5], 4: [1]})],
    "must_remove": [MustRemove({0: [2]})],
    "uniform": [Uniform()],
    "entropy_guard": [EntropyGuard(0.1)],
    "memory_cap": [
        MemoryCap.pipeline([0, 1, 2, 3], 2, 5e9),
        MemoryCap.expert_parallel({0: 4, 1: 4}, 2, 1e9),
        MemoryCap({"a": 1e9, "b": 2e9}, {"layers": {"a": [0], "b": [1]}}),
    ],
}


def test_every_registered_constraint_round_trips_through_its_spec():
    assert set(EXAMPLES) == set(CONSTRAINTS), "add an example for each registered constraint"
    for name, examples in EXAMPLES.items():
        for c in examples:
            spec = json.loads(json.dumps(c.to_json()))  # what a plan file holds
            again = constraint_from_json(spec)
            assert type(again) is CONSTRAINTS[name] and again == c, name
            assert again.to_json() == c.to_json()


def test_objectives_round_trip_through_their_spec():
    objective = parse_objective("redundancy + 0.5*additive + coverage + 2*curves")
    objective.terms[2][1].candidates = 7
    again = objective_from_json(json.loads(json.dumps(objective.to_json())))
    assert again == objective and again.terms[2][1].candidates == 7
    assert again.describe() == objective.describe()
    for name in TERMS:
        assert term_from_json({"name": name, "weight": 3.0}) == TERMS[name]()


def test_bad_specs_are_user_errors_naming_the_choices():
    with pytest.raises(UserError, match="unknown constraint spec 'nope'.*min_kept"):
        constraint_from_json({"name": "nope"})
    with pytest.raises(UserError, match="does not fit MultipleOf"):
        constraint_from_json({"name": "multiple_of", "k": 2})
    with pytest.raises(UserError, match="unknown objective term 'best'"):
        objective_from_json([{"name": "best", "weight": 1.0}])
    with pytest.raises(UserError, match="non-empty list"):
        objective_from_json([])


def test_a_plans_recorded_constraints_read_back():
    scores = synth_scores(custom_shape(4, 8, 2))
    problem = build_problem(
        scores, 0.25, "redundancy+0.5*additive", [MultipleOf(2), EntropyGuard(0.2)]
    )
    plan = solve(problem, "exact")
    assert constraints_from_json(plan.provenance["constraint_specs"]) == problem.constraints
    assert constraint_from_json(plan.provenance["budget_spec"]) == problem.budget
    assert objective_from_json(plan.provenance["objective_terms"]) == problem.objective


def test_the_package_exports_public_names_only():
    names = ("Constraint", "CountConstraint", "LayerRule", "parse_bytes", "format_bytes",
             "parse_min_kept", "over_cap", "precheck", "reachable_totals", "register_constraint")
    for name in names:
        assert hasattr(constraints_pkg, name), name
    # the 0.1 release re-exported the former single module's private helpers; they are gone
    assert not [n for n in constraints_pkg.__all__ if n.startswith("_")]
    for name in ("_kept_mask", "_counts", "_explain_bounds", "_most_even", "_ExpertList", "_UNITS"):
        assert not hasattr(constraints_pkg, name), name


# -- capabilities: declared by each solver, enforced in solve() ----------------------------
def _problem(constraints=(), objective="additive", sizes=(100, 100)):
    rng = np.random.default_rng(0)
    layers = [Layer(i, rng.random(6), np.full(6, b), 2, np.eye(6)) for i, b in enumerate(sizes)]
    objective = parse_objective(objective)
    return Problem(layers, Budget("remove", 4), objective, [MinKept(), *constraints])


def test_solve_refuses_what_a_solver_does_not_declare_naming_one_that_accepts_it():
    refusal = r"^dp does not handle entropy guard .*; use --solver exact$"
    with pytest.raises(SolverError, match=refusal):
        solve(_problem([EntropyGuard(0.5)]), "dp")
    cap = MemoryCap.expert_parallel({0: 6, 1: 6}, 2, 1e9)
    with pytest.raises(SolverError, match="dp does not handle memory cap"):
        solve(_problem([cap]), "dp")


def test_the_refusal_is_made_before_the_solver_runs():
    @register_solver
    class OnlyAdditive(Solver):
        name = "only_additive_test"
        accepts_terms = frozenset({"additive"})

        def run(self, problem):  # pragma: no cover - must never be reached
            raise AssertionError("solve() should have refused this problem")

    try:
        with pytest.raises(SolverError, match="only_additive_test does not handle objective "
                                              "redundancy; use --solver exact"):
            solve(_problem(objective="redundancy"), "only_additive_test")
        assert "only_additive_test" in solver_names()
    finally:
        del SOLVERS["only_additive_test"]


def test_dp_no_longer_hard_codes_byte_budgets_of_one_size():
    # per-layer equal sizes that differ between layers: dp's table works in gcd units
    problem = _problem(sizes=(100, 150))
    budget = Budget("keep_bytes", 700.0)
    problem = Problem(problem.layers, budget, problem.objective, problem.constraints)
    dp, exact = solve(problem, "dp"), solve(problem, "exact")
    assert dp.status == "optimal" and abs(dp.objective - exact.objective) <= 1e-9


def test_registry_names_for_choice_lists():
    assert solver_names() == sorted(SOLVERS)
    built_in = {"exact", "greedy", "grape", "marginal", "ranking", "relaxation", "uniform", "dp"}
    assert built_in <= set(solver_names())
    assert objective_names() == ["additive", "redundancy", "coverage", "curves"] == list(TERMS)
    assert constraint_names() == list(CONSTRAINTS) and "entropy_guard" in constraint_names()


def test_outcome_and_solver_contract_unchanged():
    assert Outcome([np.ones(2, bool)], "feasible").bound is None
    assert Solver.accepts_terms is None and Solver.accepts_constraints is None


def test_dp_takes_a_new_per_layer_count_constraint_for_free():
    from dataclasses import dataclass
    from typing import ClassVar

    from solvers.constraints import CountConstraint

    @dataclass(frozen=True)
    class AtMost(CountConstraint):  # a user's per-layer cap: allowed counts only, no rows
        most: int
        name: ClassVar[str] = "at_most_test"

        def count_bounds(self, problem, p):
            return 0, self.most

        def count_violations(self, problem, counts):
            return [f"layer {p} keeps {n}" for p, n in enumerate(counts) if n > self.most]

    class RowAdding(AtMost):  # the same, but through a row of the program: dp cannot see it
        name: ClassVar[str] = "row_adding_test"

        def count_bounds(self, problem, p):
            return None

        def add_to_model(self, form):
            for p in range(len(form.problem.layers)):
                form.mip.add_row(form.y[p], form.counts[p].astype(float), -np.inf, self.most)

    plan = solve(_problem([AtMost(4)]), "dp")
    assert max(plan.kept_counts().values()) <= 4 and plan.status == "optimal"
    with pytest.raises(SolverError, match="dp does not handle row_adding_test; use --solver exact"):
        solve(_problem([RowAdding(4)]), "dp")
    assert max(solve(_problem([RowAdding(4)]), "exact").kept_counts().values()) <= 4
