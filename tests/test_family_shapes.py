"""The `grape synth --shape` shapes of the families added for issue 24 (solvers/synth.py): each
builds synthetic scores of the published shape and solves exactly to a plan the checker accepts."""

import pytest

from solvers.check import check_plan
from solvers.problem import build_problem
from solvers.solve import solve
from solvers.synth import SHAPES, synth_scores

NEW_SHAPES = {  # name: (MoE layers, routed experts, top_k)
    "glm-4.5-air": (45, 128, 8),
    "minimax-m2": (62, 256, 8),
    "qwen3-next-80b-a3b": (48, 512, 10),
    "llama-4-scout": (48, 16, 1),
    "ernie-4.5-21b-a3b": (27, 64, 6),
    "deepseek-v3.2": (58, 256, 8),
}


@pytest.mark.parametrize("name", sorted(NEW_SHAPES))
def test_new_family_shape_builds_and_solves(name):
    layers, experts, top_k = NEW_SHAPES[name]
    shape = SHAPES[name]
    assert (len(shape.moe_layers), shape.experts, shape.top_k) == (layers, experts, top_k)
    scores = synth_scores(name)
    assert scores.model.model_type == shape.model_type
    problem = build_problem(scores, 0.25)
    plan = solve(problem, "exact")
    assert check_plan(plan, problem) == []
    assert plan.num_removed == layers * experts // 4
    assert all(len(kept) >= top_k for kept in plan.kept.values())
